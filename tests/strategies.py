"""Hypothesis strategies over every convolution configuration torch accepts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


@dataclass(frozen=True)
class ConvCase:
    """Constructor arguments of an nn.ConvNd plus a rank and an input size."""

    dims: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Any
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    padding_mode: str
    rank: int
    alpha: float
    size: tuple[int, ...]
    conv_groups: str = "per_group"

    def kwargs(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
            "groups": self.groups,
            "bias": self.bias,
            "padding_mode": self.padding_mode,
        }


@st.composite
def conv_cases(draw: st.DrawFn, dims: int = 2) -> ConvCase:
    groups = draw(st.sampled_from([1, 1, 2, 3, 4]))
    depthwise = draw(st.booleans()) and dims == 2
    in_per_group = 1 if depthwise else draw(st.integers(1, 3))
    out_per_group = draw(st.integers(1, 3))  # > 1 with depthwise: a channel multiplier
    if depthwise:
        groups = draw(st.integers(2, 6))
    ints = st.integers
    kernel = tuple(draw(ints(1, 4)) for _ in range(dims))
    dilation = tuple(draw(ints(1, 3)) for _ in range(dims))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if padding_kind == "same":
        stride = (1,) * dims  # torch refuses 'same' with stride > 1
        padding: Any = "same"
    else:
        stride = tuple(draw(ints(1, 3)) for _ in range(dims))
        padding = {"int": draw(ints(0, 3)), "tuple": tuple(draw(ints(0, 3)) for _ in range(dims)), "valid": "valid"}[
            padding_kind
        ]
    span = max((k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True))
    size = tuple(draw(ints(max(span, 7), max(span, 7) + 4)) for _ in range(dims))
    return ConvCase(
        dims=dims,
        in_channels=groups * in_per_group,
        out_channels=groups * out_per_group,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(PADDING_MODES)),
        rank=draw(ints(1, 6)),
        alpha=draw(st.sampled_from([1.0, 3.0, 8.0, 16.0])),
        size=size,
        conv_groups=draw(st.sampled_from(["per_group", "shared"])),
    )
