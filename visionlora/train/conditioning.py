"""How a Stable Diffusion pipeline's text encoders condition its UNet: SD 1.x/2.x and SDXL.

SD 1.x/2.x: the text encoder's last hidden states. SDXL (as it was trained): both encoders'
penultimate hidden states concatenated, the second encoder's pooled (projected) embedding, and
per image the six micro-conditioning ids (original size, crop top-left, target size).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ENCODERS", "Conditioner", "Text"]

ENCODERS = ("text_encoder", "text_encoder_2")
"""A pipeline's text encoders, in the order their hidden states are concatenated."""


@dataclass
class Text:
    """Encoded captions: hidden states (N, tokens, dim) and, for SDXL, the pooled embedding (N, dim)."""

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
    """A pipeline's tokenizers and text encoders, and what the UNet takes from them."""

    def __init__(self, pipe: Any) -> None:
        self.xl = getattr(pipe, "text_encoder_2", None) is not None
        self.names = list(ENCODERS[: 2 if self.xl else 1])
        self.tokenizers = [pipe.tokenizer, *([pipe.tokenizer_2] if self.xl else [])]

    def ids(self, captions: Sequence[str]) -> list[torch.Tensor]:
        """Each tokenizer's token ids of ``captions``, padded to its maximum length."""
        return [
            t(
                list(captions),
                padding="max_length",
                max_length=t.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for t in self.tokenizers
        ]

    def encode(self, encoders: Sequence[nn.Module], ids: Sequence[torch.Tensor], trains: Sequence[bool]) -> Text:
        """The UNet's text conditioning from each encoder (frozen ones run without gradients)."""
        hidden, pooled = [], None
        for encoder, tokens, grad in zip(encoders, ids, trains, strict=True):
            with contextlib.nullcontext() if grad else torch.no_grad():
                device = next(encoder.parameters()).device
                if not self.xl:
                    return Text(encoder(tokens.to(device))[0])
                out = encoder(tokens.to(device), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled = out[0]  # the last encoder's projected pooled embedding (CLIPTextModelWithProjection)
        return Text(torch.cat(hidden, dim=-1), pooled)

    def unet_kwargs(self, text: Text, time_ids: torch.Tensor | None) -> dict[str, Any]:
        """The UNet's keyword arguments besides the noisy latents and timesteps."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": text.hidden}
        if self.xl:
            kwargs["added_cond_kwargs"] = {"text_embeds": text.pooled, "time_ids": time_ids}
        return kwargs
