"""Shared helpers: textbook reference formulas and tiny models. Nothing here calls visionlora."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def reference_conv_delta(a: Tensor, b: Tensor, scale: float, groups: int) -> Tensor:
    """ΔW written out group by group: block j = scale · B_j @ A_j, reshaped to the kernel.

    A_j is A's rows j·r .. (j+1)·r (per-group layout), or all of A when A has r rows (shared layout).
    """
    rank = b.shape[1]
    out_per_group = b.shape[0] // groups
    shared = a.shape[0] == rank
    blocks = []
    for j in range(groups):
        a_j = (a if shared else a[j * rank : (j + 1) * rank]).reshape(rank, -1)
        b_j = b[j * out_per_group : (j + 1) * out_per_group].reshape(out_per_group, rank)
        blocks.append((scale * (b_j @ a_j)).reshape(out_per_group, *a.shape[1:]))
    return torch.cat(blocks, dim=0)


def reference_conv(conv: nn.Module, x: Tensor, weight: Tensor, with_bias: bool = True) -> Tensor:
    """The base conv's geometry applied with another weight, written with F.pad + F.convNd."""
    fn = _CONV_FN[weight.dim() - 2]
    bias = conv.bias if with_bias else None
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        return fn(x, weight, bias, conv.stride, 0, conv.dilation, conv.groups)
    return fn(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def assert_rel_close(actual: Tensor, expected: Tensor, tol: float = 1e-5, magnitude: float = 0.0) -> None:
    """max|actual - expected| <= tol · max(max|expected|, magnitude).

    ``magnitude`` is the size of the terms summed into the output (Σ|w|·|x|), the scale float
    rounding is relative to; it matters where those terms cancel to a tiny output.
    """
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), magnitude, 1e-12)
    assert err <= tol * scale, f"relative error {err / scale:.3e} > {tol:.0e}"


def conv_magnitude(conv: nn.Module, x: Tensor, weight_magnitude: Tensor) -> float:
    """max over outputs of Σ|w|·|x| (plus |bias|) for the base conv's geometry."""
    terms = reference_conv(conv, x.abs(), weight_magnitude.abs(), with_bias=False).max().item()
    return terms + (0.0 if conv.bias is None else conv.bias.abs().max().item())


def randomize_lora(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every LoRA A and B random non-zero values, as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A" in name or ".lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


class TinyNet(nn.Module):
    """Conv stem, grouped and depthwise convs, BatchNorm, a Linear head."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, padding_mode="reflect"),
            nn.ReLU(),
            nn.Conv2d(8, 32, 3, padding="same", groups=8, padding_mode="circular"),  # depthwise, multiplier 4
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block(torch.relu(self.bn(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def tiny_net(seed: int = 0, num_classes: int = 5) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(num_classes).eval()


@pytest.fixture
def net() -> TinyNet:
    return tiny_net()
