"""LoRA's math as pure functions: the scale, ΔW for Linear and Conv layers in either grouped-conv
layout, the shapes of A and B, the useful rank, and A's initialisations.

The tests check each against the textbook formula; :mod:`visionlora.layers` applies them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from visionlora.errors import ConfigError

__all__ = [
    "AdaptableLayer",
    "ConvGroups",
    "InitFn",
    "conv_delta",
    "conv_transpose_delta",
    "gaussian_init",
    "is_transposed",
    "kaiming_init",
    "linear_delta",
    "lora_scale",
    "lora_shapes",
    "max_useful_rank",
    "rank_slice",
]

AdaptableLayer = (
    nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d
)
"""The layer types visionlora adapts (their subclasses included)."""

InitFn = Callable[[Tensor, int, "torch.Generator | None"], None]
"""Initialises A in place: ``init(a, rank, generator)``."""


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The branch multiplier: alpha / r, or alpha / sqrt(r) for rsLoRA (Kalajdzievski 2023).

    Example:
        >>> lora_scale(8, 4), lora_scale(8, 4, rslora=True)
        (2.0, 4.0)
    """
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def linear_delta(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """ΔW = scale · B @ A for a Linear layer.

    Args:
        a: A, shape ``(r, in)``.
        b: B, shape ``(out, r)``.
        scale: The branch multiplier.

    Returns:
        ΔW, shape ``(out, in)``, the shape of ``nn.Linear.weight``.
    """
    return (b @ a) * scale


def conv_delta(a: Tensor, b: Tensor, scale: float, groups: int) -> Tensor:
    """ΔW for a convolution, in the base kernel's exact shape, for either grouped-conv layout.

    Args:
        a: A as a conv weight: ``(groups · r, in / groups, *k)`` for the per-group layout (one A_j
            per group), or ``(r, in / groups, *k)`` for the shared layout (one A for all groups).
            With groups = 1 the two are the same.
        b: B as a 1×1 conv weight, shape ``(out, r, 1, …)``.
        scale: The branch multiplier.
        groups: The base conv's ``groups``.

    Returns:
        ΔW, shape ``(out, in / groups, *k)``: group j's block is scale · B_j @ A_j with A and the
        kernel flattened to ``(r, in / groups · prod(k))`` and B_j = B's rows of group j. Dilation
        does not enter ΔW; it enters when ΔW is applied through the base conv.
    """
    rank = b.shape[1]
    out = b.shape[0]
    a_groups = a.reshape(a.shape[0] // rank, rank, -1)  # (g or 1, r, in/g · prod(k))
    b_groups = b.reshape(groups, out // groups, rank)  # (g, out/g, r)
    return (torch.matmul(b_groups, a_groups) * scale).reshape(out, *a.shape[1:])


def conv_transpose_delta(a: Tensor, b: Tensor, scale: float, groups: int) -> Tensor:
    """ΔW for a transposed convolution, in its kernel's exact shape ``(in, out / groups, *k)``.

    Args:
        a: A as a transposed-conv weight, ``(in, r, *k)``: group j's inputs to its r channels.
        b: B as a grouped 1×1 conv weight, ``(out, r, 1, …)``.
        scale: The branch multiplier.
        groups: The base's ``groups``.

    Returns:
        ΔW with ΔW[i, o, k] = scale · Σ_t A[i, t, k] · B[o', t] for input channel i and output
        channel o' = j · out/g + o of the same group j: the weight whose transposed conv (with the
        base's stride, padding, output padding and dilation) equals A's followed by B's.
    """
    rank, out = b.shape[1], b.shape[0]
    a_groups = a.reshape(groups, a.shape[0] // groups, rank, -1)  # (g, in/g, r, prod(k))
    b_groups = b.reshape(groups, out // groups, rank)  # (g, out/g, r)
    delta = torch.einsum("gitk,got->giok", a_groups, b_groups) * scale
    return delta.reshape(a.shape[0], out // groups, *a.shape[2:])


def rank_slice(a: Tensor, b: Tensor, rank: int, keep: int, transposed: bool = False) -> tuple[Tensor, Tensor]:
    """A and B of a rank-``rank`` adapter cut to their first ``keep`` rank components: a rank-``keep``
    adapter in the same layout (per group for a grouped conv's A), whose ΔW is the full one's when
    B's other columns are zero.

    Example:
        >>> a, b = rank_slice(torch.ones(8, 4, 3, 3), torch.ones(16, 4, 1, 1), rank=4, keep=1)
        >>> tuple(a.shape), tuple(b.shape)  # groups=2, per group: 4 rows of A -> 1
        ((2, 4, 3, 3), (16, 1, 1, 1))
    """
    if keep >= rank:
        return a, b
    if transposed:  # (in, r, *k)
        return a[:, :keep], b[:, :keep]
    groups = a.shape[0] // rank  # (g · r or r, in/g, *k), or (r, in) for a Linear
    if groups == 1:
        return a[:keep], b[:, :keep]
    return a.unflatten(0, (groups, rank))[:, :keep].flatten(0, 1), b[:, :keep]


ConvGroups = Literal["per_group", "shared"]
"""Layout of a grouped conv's adapter: one rank-r pair per group, or one shared factorisation."""


def lora_shapes(
    base: AdaptableLayer, rank: int, conv_groups: ConvGroups = "per_group"
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of A and B for a rank-``rank`` adapter on ``base`` (an nn.Linear or nn.ConvNd).

    Example:
        >>> lora_shapes(nn.Conv2d(8, 16, 3, groups=2), 4), lora_shapes(nn.Conv2d(8, 16, 3, groups=2), 4, "shared")
        (((8, 4, 3, 3), (16, 4, 1, 1)), ((4, 4, 3, 3), (16, 4, 1, 1)))
    """
    if isinstance(base, nn.Linear):
        return (rank, base.in_features), (base.out_features, rank)
    kernel = tuple(base.weight.shape[2:])
    if is_transposed(base):  # per group: its inputs to r channels, then a grouped 1x1 conv
        if conv_groups == "shared" and base.groups > 1:
            raise ConfigError(
                f"conv_groups='shared' is for grouped convs; a grouped {type(base).__name__} takes the "
                "per_group layout only"
            )
        return (base.in_channels, rank, *kernel), (base.out_channels, rank, *(1 for _ in kernel))
    a_rows = rank if conv_groups == "shared" else base.groups * rank
    return (
        (a_rows, base.in_channels // base.groups, *kernel),
        (base.out_channels, rank, *(1 for _ in kernel)),
    )


def max_useful_rank(base: AdaptableLayer, conv_groups: ConvGroups = "per_group") -> int:
    """The rank above which ΔW cannot grow: min(out, in) of each factorised matrix, kernel included."""
    if isinstance(base, nn.Linear):
        return min(base.in_features, base.out_features)
    if is_transposed(base):  # per group an (in/g · prod(k)) x out/g factorisation
        per_group = base.in_channels // base.groups * math.prod(base.weight.shape[2:])
        return min(per_group, base.out_channels // base.groups)
    per_group_in = base.weight[0].numel()  # in/g · prod(k)
    out = base.out_channels if conv_groups == "shared" else base.out_channels // base.groups
    return min(out, per_group_in)


def is_transposed(layer: nn.Module) -> bool:
    """Whether ``layer`` is a transposed convolution (nn.ConvTranspose1d/2d/3d or a subclass)."""
    return isinstance(layer, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d)


def kaiming_init(a: Tensor, rank: int, generator: torch.Generator | None = None) -> None:
    """Kaiming-uniform with a = sqrt(5), the default init of nn.Linear / nn.Conv weights."""
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)


def gaussian_init(a: Tensor, rank: int, generator: torch.Generator | None = None) -> None:
    """Normal with std 1 / r."""
    nn.init.normal_(a, std=1.0 / rank, generator=generator)
