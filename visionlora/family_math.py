"""The math of the adapter families beyond LoRA, as pure functions.

- **DoRA** (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): a learned magnitude
  m per output channel times the direction of W + ΔW,
  ``W' = m · (W + ΔW) / ‖W + ΔW‖``, with ΔW a LoRA's s·B·A. The norm is taken per output channel
  over everything else (PEFT, and LyCORIS' default ``wd_on_out=True``) or per input channel
  (LyCORIS' ``wd_on_out=False``, older LyCORIS files); it is treated as a constant in backward,
  as PEFT does (the paper's §4.3).
- **LoHa** (Hyeon-Woo et al. 2022, FedPara; LyCORIS' layout): ``ΔW = s · (W1a W1b) ⊙ (W2a W2b)``,
  each product a rank-r matrix of the kernel's shape (out × in/g·prod(k)); with a Tucker core per
  pair for a conv with a spatial kernel.
- **LoKr** (Edalati et al. 2022, KronA; LyCORIS' layout): ``ΔW = s · W1 ⊗ W2`` with out = a·b and
  in/g = c·d split by :func:`factorization`; W1 (a × c) full or a rank-r product, W2 (b × d·prod(k))
  full, a rank-r product, or a Tucker core with two factors.

s = alpha / r (alpha / sqrt(r) with rsLoRA), and 1 for a LoKr whose two halves are both full
matrices (LyCORIS' convention). The tests check each function against the textbook formula and
against LyCORIS' and PEFT's own modules on the same weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from visionlora.config import FAMILIES, Family

__all__ = [
    "FAMILIES",
    "Family",
    "KronLayout",
    "NormAxis",
    "along",
    "channel_norm",
    "decompose",
    "factorization",
    "hadamard_delta",
    "kron_layout",
    "kronecker_delta",
    "loha_shapes",
    "lokr_shapes",
    "tucker_rebuild",
]

NormAxis = Literal["out", "in"]
"""Which channels DoRA's norm and magnitude are per: output (PEFT, LyCORIS' default) or input."""


def channel_norm(weight: Tensor, axis: NormAxis = "out") -> Tensor:
    """The L2 norm of ``weight`` per output channel (dim 0) or per input channel (dim 1), a 1-D tensor."""
    if axis == "out":
        return weight.reshape(weight.shape[0], -1).norm(dim=1)
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)


def along(vector: Tensor, dims: int, axis: NormAxis) -> Tensor:
    """A per-channel vector shaped to broadcast over a weight with ``dims`` dimensions."""
    shape = [1] * dims
    shape[0 if axis == "out" else 1] = -1
    return vector.reshape(shape)


def decompose(weight: Tensor, delta: Tensor, magnitude: Tensor, axis: NormAxis = "out") -> Tensor:
    """DoRA's weight ``m · (W + ΔW) / ‖W + ΔW‖``, the norm per ``axis`` channel and detached.

    Args:
        weight: W, the base weight.
        delta: ΔW of the adapter (LoRA's s·B·A, or LoHa's or LoKr's ΔW), W's shape.
        magnitude: m, one value per ``axis`` channel, shaped to broadcast over W: ``(out, 1, …)``
            or ``(1, in, 1, …)`` (LyCORIS' ``dora_scale`` layout).
        axis: ``"out"`` (PEFT) or ``"in"``.
    """
    combined = weight + delta
    norm = channel_norm(combined.detach(), axis)
    return combined * (magnitude / along(norm, combined.dim(), axis))


def tucker_rebuild(core: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """``W[o, c, k] = Σ_ij core[i, j, k] · wa[i, o] · wb[j, c]``: core ``(r, r, *k)``, wa ``(r, out)``,
    wb ``(r, in)`` to a kernel ``(out, in, *k)``."""
    return torch.einsum("ij...,io,jc->oc...", core, wa, wb)


def hadamard_delta(
    w1a: Tensor,
    w1b: Tensor,
    w2a: Tensor,
    w2b: Tensor,
    scale: float,
    shape: torch.Size | tuple[int, ...],
    t1: Tensor | None = None,
    t2: Tensor | None = None,
) -> Tensor:
    """LoHa's ΔW = scale · (W1a W1b) ⊙ (W2a W2b), reshaped to the kernel's ``shape``.

    Without cores: w1a, w2a ``(out, r)``; w1b, w2b ``(r, in/g · prod(k))``. With Tucker cores t1,
    t2 ``(r, r, *k)``: w1a, w2a ``(r, out)``; w1b, w2b ``(r, in/g)`` (see :func:`tucker_rebuild`).
    """
    if t1 is None or t2 is None:
        return (_Hadamard.apply(w1a, w1b, w2a, w2b) * scale).reshape(shape)
    first, second = tucker_rebuild(t1, w1a, w1b), tucker_rebuild(t2, w2a, w2b)
    return (first * second * scale).reshape(shape)


class _Hadamard(torch.autograd.Function):
    """(W1a W1b) ⊙ (W2a W2b) keeping the four thin factors for backward, not the two kernel-sized
    products (recomputed there): half the memory a LoHa layer holds for backward."""

    @staticmethod
    def forward(ctx: Any, w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        return (w1a @ w1b) * (w2a @ w2b)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # type: ignore[override]
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        g1, g2 = grad * (w2a @ w2b), grad * (w1a @ w1b)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2


def kronecker_delta(w1: Tensor, w2: Tensor, scale: float, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """LoKr's ΔW = scale · W1 ⊗ W2 as a kernel of ``shape`` ``(a·b, c·d, *k)``.

    Args:
        w1: ``(a, c)``.
        w2: ``(b, d, *k)`` or ``(b, d · prod(k))``: the kernel's taps stay inside W2's columns, so
            input channel c_i · d + d_j and tap t sit at column (c_i · d + d_j) · prod(k) + t.
    """
    return (torch.kron(w1, w2.reshape(w2.shape[0], -1)) * scale).reshape(shape)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into m · n with m <= n, as LyCORIS' LoKr does.

    With ``factor`` > 0 dividing ``dimension``: (factor, dimension / factor), smaller first.
    Otherwise m is the largest divisor of ``dimension`` that is at most sqrt(dimension) and, with
    ``factor`` > 0, at most ``factor``.

    Example:
        >>> factorization(128), factorization(128, 4), factorization(127), factorization(360, 8)
        ((8, 16), (4, 32), (1, 127), (8, 45))
    """
    if factor > 0 and dimension % factor == 0:
        other = dimension // factor
        return (min(factor, other), max(factor, other))
    limit = math.isqrt(dimension)
    if factor > 0:
        limit = min(limit, factor)
    m = max(d for d in range(1, limit + 1) if dimension % d == 0)
    return m, dimension // m


@dataclass(frozen=True)
class KronLayout:
    """How a LoKr adapter's two halves are stored: out = a·b, in/g = c·d.

    ``w1``: ``"full"`` (a × c) or ``"lora"`` (w1_a (a, r) · w1_b (r, c)); ``w2``: ``"full"``
    (b, d, *k), ``"lora"`` (w2_a (b, r) · w2_b (r, d·prod(k))) or ``"tucker"`` (t2 (r, r, *k),
    w2_a (r, b), w2_b (r, d)).
    """

    out: tuple[int, int]
    in_: tuple[int, int]
    w1: Literal["full", "lora"]
    w2: Literal["full", "lora", "tucker"]


def kron_layout(
    shape: torch.Size | tuple[int, ...], rank: int, factor: int = -1, decompose_both: bool = False, tucker: bool = False
) -> KronLayout:
    """LyCORIS' choice of LoKr layout for a kernel of ``shape`` ``(out, in/g, *k)``.

    W1 is a rank-r product only with ``decompose_both`` and r < max(a, c) / 2; W2 is full when
    r >= max(b, d) / 2, else a Tucker product with ``tucker`` and a kernel larger than 1, else a
    rank-r product.
    """
    out, inn, *kernel = shape
    a, b = factorization(out, factor)
    c, d = factorization(inn, factor)
    w1: Literal["full", "lora"] = "lora" if decompose_both and rank < max(a, c) / 2 else "full"
    w2: Literal["full", "lora", "tucker"]
    if rank >= max(b, d) / 2:
        w2 = "full"
    elif tucker and any(k != 1 for k in kernel):
        w2 = "tucker"
    else:
        w2 = "lora"
    return KronLayout((a, b), (c, d), w1, w2)


def lokr_shapes(shape: torch.Size | tuple[int, ...], rank: int, layout: KronLayout) -> dict[str, tuple[int, ...]]:
    """The LoKr tensors (LyCORIS' names) of ``layout`` for a kernel of ``shape`` and rank ``rank``."""
    (a, b), (c, d), kernel = layout.out, layout.in_, tuple(shape[2:])
    shapes: dict[str, tuple[int, ...]] = {}
    if layout.w1 == "full":
        shapes["lokr_w1"] = (a, c)
    else:
        shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (a, rank), (rank, c)
    if layout.w2 == "full":
        shapes["lokr_w2"] = (b, d, *kernel)
    elif layout.w2 == "tucker":
        shapes["lokr_t2"], shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (rank, rank, *kernel), (rank, b), (rank, d)
    else:
        shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (b, rank), (rank, d * math.prod(kernel))
    return shapes


def loha_shapes(shape: torch.Size | tuple[int, ...], rank: int, tucker: bool = False) -> dict[str, tuple[int, ...]]:
    """The LoHa tensors (LyCORIS' names) for a kernel of ``shape`` and rank ``rank``; Tucker cores
    only with ``tucker`` and a kernel larger than 1."""
    out, inn, *kernel = shape
    if tucker and any(k != 1 for k in kernel):
        core, wa, wb = (rank, rank, *kernel), (rank, out), (rank, inn)
        return {"hada_w1_a": wa, "hada_w1_b": wb, "hada_t1": core, "hada_w2_a": wa, "hada_w2_b": wb, "hada_t2": core}
    wa, wb = (out, rank), (rank, inn * math.prod(kernel))
    return {"hada_w1_a": wa, "hada_w1_b": wb, "hada_w2_a": wa, "hada_w2_b": wb}
