"""How a diffusion pipeline's text encoders condition its denoiser: SD 1.x/2.x, SDXL, Flux.1, SD3.

- SD 1.x/2.x: the text encoder's last hidden states.
- SDXL (as it was trained): both encoders' penultimate hidden states concatenated, the second
  encoder's pooled (projected) embedding, and per image the six micro-conditioning ids.
- Flux.1: the T5's last hidden states, and the CLIP's pooled embedding.
- SD3/3.5: both CLIPs' penultimate hidden states concatenated and zero-padded to the T5's width,
  then the T5's hidden states after them (along the tokens); both CLIPs' projected pooled
  embeddings concatenated.

Each is what the pipeline's own ``encode_prompt`` computes, so a run conditions its model as
inference will.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ENCODERS", "Conditioner", "Text", "pipeline_kind"]

ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
"""A pipeline's text encoders, in the order they are run."""
_COUNT = {"sd": 1, "sdxl": 2, "flux": 2, "sd3": 3}
_KINDS = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
}


def pipeline_kind(pipe: Any) -> str:
    """``sd``, ``sdxl``, ``flux`` or ``sd3`` for a pipeline object (by its class, or its parts)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in _KINDS:
            return _KINDS[cls.__name__]
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"


@dataclass
class Text:
    """Encoded captions: hidden states (N, tokens, dim) and, but for SD 1.x/2.x, the pooled embedding (N, dim)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def rows(self, indices: Sequence[int]) -> Text:
        pick = torch.tensor(list(indices), dtype=torch.long)
        return Text(self.hidden[pick], None if self.pooled is None else self.pooled[pick])

    def to(self, device: Any) -> Text:
        return Text(self.hidden.to(device), None if self.pooled is None else self.pooled.to(device))

    @staticmethod
    def stack(texts: Sequence[Text]) -> Text:
        pooled = [t.pooled for t in texts]
        return Text(
            torch.cat([t.hidden for t in texts]),
            None if any(p is None for p in pooled) else torch.cat(pooled),  # type: ignore[arg-type]
        )


class Conditioner:
    """A pipeline's tokenizers and text encoders, and what its denoiser takes from them.

    ``max_sequence_length`` caps the T5's tokens (Flux, SD3); a tokenizer's own maximum caps it too.
    """

    def __init__(self, pipe: Any, max_sequence_length: int = 512) -> None:
        self.kind = pipeline_kind(pipe)
        self.xl = self.kind == "sdxl"
        self.names = list(ENCODERS[: _COUNT[self.kind]])
        self.tokenizers = [getattr(pipe, n.replace("text_encoder", "tokenizer")) for n in self.names]
        t5 = {"flux": 1, "sd3": 2}.get(self.kind)
        self.lengths = [t.model_max_length for t in self.tokenizers]
        if t5 is not None:
            self.lengths[t5] = min(max_sequence_length, self.lengths[t5])
        self.max_sequence_length = self.lengths[t5] if t5 is not None else None

    def ids(self, captions: Sequence[str]) -> list[torch.Tensor]:
        """Each tokenizer's token ids of ``captions``, padded to its maximum length."""
        return [
            t(list(captions), padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
            for t, length in zip(self.tokenizers, self.lengths, strict=True)
        ]

    def encode(self, encoders: Sequence[nn.Module], ids: Sequence[torch.Tensor], trains: Sequence[bool]) -> Text:
        """The denoiser's text conditioning from each encoder (frozen ones run without gradients)."""
        outs = []
        for encoder, tokens, grad in zip(encoders, ids, trains, strict=True):
            with contextlib.nullcontext() if grad else torch.no_grad():
                device = next(encoder.parameters()).device
                outs.append(encoder(tokens.to(device), output_hidden_states=self.kind in ("sdxl", "sd3")))
        if self.kind == "sd":
            return Text(outs[0][0])
        if self.kind == "flux":  # the T5's last hidden states; the CLIP's pooled output
            return Text(outs[1][0], outs[0].pooler_output)
        clip = torch.cat([out.hidden_states[-2] for out in outs[:2]], dim=-1)
        if self.kind == "sdxl":
            return Text(clip, outs[1][0])  # the last encoder's projected pooled embedding
        t5 = outs[2][0]
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Text(torch.cat([clip, t5], dim=-2), torch.cat([outs[0][0], outs[1][0]], dim=-1))

    def unet_kwargs(self, text: Text, time_ids: torch.Tensor | None) -> dict[str, Any]:
        """The UNet's keyword arguments besides the noisy latents and timesteps."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": text.hidden}
        if self.xl:
            kwargs["added_cond_kwargs"] = {"text_embeds": text.pooled, "time_ids": time_ids}
        return kwargs
