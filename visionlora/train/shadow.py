"""Copies of a model's trained tensors kept beside it: an exponential moving average (EMA) of the
weights, and the weights of the best validation epoch. Both are modules of persistent buffers, so
checkpoints hold them and a resumed run continues them bit for bit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["Shadow", "ema_decay_at"]


def _key(name: str) -> str:
    return name.replace(".", "-")  # buffer names cannot hold dots


def tracked(model: nn.Module, with_norm_stats: bool) -> dict[str, torch.Tensor]:
    """The tensors a shadow copies: trained parameters, and the running statistics of BatchNorms
    (``with_norm_stats``: when training changes them)."""
    out: dict[str, torch.Tensor] = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if with_norm_stats:
        for name, module in model.named_modules():
            if isinstance(module, _BatchNorm) and module.running_mean is not None:
                prefix = f"{name}." if name else ""
                out[prefix + "running_mean"] = module.running_mean
                out[prefix + "running_var"] = module.running_var  # type: ignore[assignment]
    return out


class Shadow(nn.Module):
    """A copy of ``tensors`` (a name -> tensor mapping of a live model) that can be updated, averaged
    and swapped into the model."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.names = list(tensors)
        self._live = tensors
        for name, tensor in tensors.items():
            self.register_buffer(_key(name), tensor.detach().clone())

    def _pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for name in self.names:
            yield getattr(self, _key(name)), self._live[name]

    @torch.no_grad()
    def copy_from_model(self) -> None:
        """Make the copy equal to the model's tensors now."""
        for kept, live in self._pairs():
            kept.copy_(live)

    @torch.no_grad()
    def average(self, decay: float) -> None:
        """``kept = decay * kept + (1 - decay) * live`` for floating-point tensors (others copied)."""
        for kept, live in self._pairs():
            if kept.is_floating_point():
                kept.lerp_(live.to(kept.dtype), 1.0 - decay)
            else:
                kept.copy_(live)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Put the copy into the model (its own values are lost)."""
        for kept, live in self._pairs():
            live.copy_(kept)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the model holds the copy; afterwards its own tensors again."""
        saved = [live.detach().clone() for _, live in self._pairs()]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, live), value in zip(self._pairs(), saved, strict=True):
                    live.copy_(value)


def ema_decay_at(decay: float, step: int) -> float:
    """The EMA decay used after optimizer step ``step`` (1-based): timm's warm-up ``(1 + s) / (10 + s)``
    caps it early on, so the average is not dominated by the first weights in short runs."""
    return min(decay, (1 + step) / (10 + step))
