"""Faster forms of the LoRA forward, each used only where it was measured to pay.

:mod:`visionlora.layers` is the reference: ``base(x) + s · B(A(x))``. A layer gets one of the
functions below as its ``fast`` path when it is wrapped (:func:`fast_path_for`); its forward calls
it once and runs the reference wherever it returns None. Each function computes the reference's
output and gradients, to rounding (``tests/test_fastpaths.py`` checks each against the reference,
in float64 to 1e-12). Measured on CPU, 2 threads, torch 2.14 (oneDNN and MKL); no GPU figures yet,
so on a GPU only the Linear path runs, whose saving (fewer kernels) does not depend on the device.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionlora.bnb import bnb_bits
from visionlora.layers import FastPath, LoraAdapter, LoraConv, LoraLayer, LoraLinear, conv_apply

__all__ = ["conv_gemm", "fast_path_for", "linear_fast"]

_EXACT_DTYPES = (torch.float32, torch.float64)


def fast_path_for(layer: LoraLayer) -> FastPath | None:
    """The fast path for ``layer``'s class: :func:`linear_fast` or :func:`conv_gemm`."""
    if isinstance(layer, LoraLinear):
        return linear_fast
    if isinstance(layer, LoraConv):
        return conv_gemm
    return None


# ---------------------------------------------------------------------------------------------
# Linear: one GEMM on W + Σ s·B·A, with a backward of its own


def linear_fast(layer: LoraLayer, x: Tensor) -> Tensor | None:
    """y = x (W + Σ sᵢ Bᵢ Aᵢ)ᵀ + bias, with the gradients of the two-GEMM LoRA formula; where that
    cannot run, base(x) with each branch added into it by one ``addmm`` (:func:`_linear_added`).

    The merged-weight form (:class:`_LinearLora`) runs in float32/float64 without active dropout
    or torch.func transforms (which need a ``setup_context`` Function). Forming W + s·B·A costs
    out·r·in, far less than the two thin GEMMs over every token that x Aᵀ Bᵀ needs. Measured on
    the benchmark's UNet (56 LoRA Linears, batch 4 at 32×32): the training step went from 1.10
    to 1.026 of the floor (no weight gradients) with this form, and to 1.015 with its backward's
    token sums split over threads (:func:`_tall_t_mm`) and the combined ``forward(ctx)`` form,
    since torch binds a ``setup_context`` Function's arguments through ``inspect.signature`` on
    every call (13 µs per layer, as much as the GEMMs of a small layer). In fp16/bf16 the branch
    is added to the output instead, so an update too small to show in a low-precision W still
    shows in y. Under autocast, or with inputs or adapters in another dtype, the reference runs.
    """
    weight = layer.base.weight
    dtype = weight.dtype
    if x.dtype != dtype or torch.is_autocast_enabled(x.device.type) or bnb_bits(layer.base) is not None:
        return None
    adapters = _lora_adapters(layer)
    if adapters is None or any(ad.lora_A.dtype != dtype or ad.lora_B.dtype != dtype for ad, _ in adapters):
        return None
    dropout = any(ad.dropout and layer.training for ad, _ in adapters)
    if dtype not in _EXACT_DTYPES or dropout or torch._C._are_functorch_transforms_active():
        return _linear_added(layer, x, adapters)
    scales = tuple(w * ad.scale for ad, w in adapters)
    ab = [t for ad, _ in adapters for t in ad.live_factors()]
    return _LinearLora.apply(x, weight, layer.base.bias, scales, *ab)


def _linear_added(layer: LoraLayer, x: Tensor, adapters: list[tuple[Any, float]]) -> Tensor | None:
    """base(x) + s · (x Aᵀ) Bᵀ with the branch's product added into the output by one ``addmm``: one
    rounding of the sum where the reference rounds the branch and then the sum, and one kernel over
    the output fewer (on CPU in fp16/bf16 it measured the same time as the reference, 0.99–1.00)."""
    if x.dim() < 2:
        return None
    y = layer.base(x)
    for adapter, w in adapters:
        h = F.dropout(x, adapter.dropout, True) if adapter.dropout and layer.training else x
        a, b = adapter.live_factors()
        u = F.linear(h, a)
        b_t, scale = b.t(), w * adapter.scale
        y = torch.addmm(y.reshape(-1, y.shape[-1]), u.reshape(-1, u.shape[-1]), b_t, alpha=scale).view(y.shape)
    return y


class _LinearLora(torch.autograd.Function):
    """The merged-weight form of :func:`linear_fast`.

    With g the output gradient and u = x Aᵀ, v = g B, the backward needs no weight gradient of
    the base:

        ∂x = g (W + Σ sBA),   ∂A = s vᵀ x,   ∂B = s gᵀ u,   ∂W = gᵀ x (only if W trains),

    each thin product in the layout BLAS runs fastest (the small matrix on the right,
    transposed). The backward is itself made of differentiable ops, so double backward works.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, scales: tuple[float, ...], *ab: Tensor
    ) -> Tensor:
        ctx.save_for_backward(x, weight, *ab)
        ctx.scales = scales
        ctx.has_bias = bias is not None
        return F.linear(x, _effective_weight(weight, scales, ab), bias)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, *ab = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = (g2 @ _effective_weight(weight, ctx.scales, ab)).view(x.shape) if needs[0] else None
        grad_w = (g2.t() @ x2) if needs[1] else None
        grad_bias = g2.sum(0) if ctx.has_bias and needs[2] else None
        grads: list[Tensor | None] = []
        for i, scale in enumerate(ctx.scales):
            a, b = ab[2 * i], ab[2 * i + 1]
            grad_a = grad_b = None
            if needs[4 + 2 * i]:
                bs_t = b.t().contiguous()  # (r, out): g (s B) runs with a transposed B on the right
                bs_t = bs_t * scale if scale != 1.0 else bs_t
                grad_a = _tall_t_mm(g2 @ bs_t.t(), x2)  # s (g B)ᵀ x
            if needs[5 + 2 * i]:
                grad_b = _tall_t_mm(x2 @ a.t(), g2).t()  # (uᵀ g)ᵀ
                grad_b = grad_b * scale if scale != 1.0 else grad_b
            grads += [grad_a, grad_b]
        return (grad_x, grad_w, grad_bias, None, *grads)


def _tall_t_mm(p: Tensor, q: Tensor) -> Tensor:
    """pᵀ q for p (N, m) and q (N, n) with N, the summed dimension, long.

    In float32, CPU BLAS runs such a product (small output, long inner dimension) on one thread
    (measured: 36 µs on 1 or 2 threads for N=4096, 21 µs split); so in eager mode on CPU with
    several threads, slices of N run as one batched product and their results are summed. The
    sum's rounding then depends on the thread count (about 1e-7 relative in float32).
    """
    n, parts = p.shape[0], 1
    if p.device.type == "cpu" and not torch.compiler.is_compiling() and p.is_contiguous() and q.is_contiguous():
        parts = min(torch.get_num_threads(), n // 512)
        while parts > 1 and n % parts:
            parts -= 1
    if parts < 2:
        return p.t() @ q
    return torch.bmm(p.view(parts, n // parts, -1).transpose(1, 2), q.view(parts, n // parts, -1)).sum(0)


def _effective_weight(weight: Tensor, scales: tuple[float, ...], ab: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
    """W + Σ sᵢ Bᵢ Aᵢ (one addmm per adapter)."""
    for i, scale in enumerate(scales):
        weight = torch.addmm(weight, ab[2 * i + 1], ab[2 * i], alpha=scale)
    return weight


# ---------------------------------------------------------------------------------------------
# Conv: the thin products as batched GEMMs (CPU)

# Measured on CPU (2 threads, oneDNN and MKL): the convs with r channels on one side, forward and
# backward, run several times slower than GEMMs on few samples (1×1 from 1024 to 8 channels on 8×8
# maps, batch 8: 2.2 ms as a conv, 0.25 ms as GEMMs) and on pointwise convs with many positions
# per sample; with many samples of few positions each, the per-sample weight gradients that the
# GEMM form sums cost more than the convs (batch 128 on 6×6 maps: 1.65× slower).
_GEMM_MAX_BATCH = 16
_GEMM_MIN_POSITIONS = 49


def conv_gemm(layer: LoraLayer, x: Tensor) -> Tensor | None:
    """base(x) + Σ s·B(A(x)), with B (and A, for a pointwise conv) run as batched GEMMs.

    Per sample, B is an (out × r) matrix on h's (r × positions), and so is A on x's
    (in × positions) when the conv is pointwise (1×…×1, stride 1, unpadded) and x is contiguous;
    B's product is added into the base output by one ``baddbmm``, with B's matrix a stride-0 view
    per sample (nothing is copied). Other geometries run A through the base's own geometry
    (:func:`conv_apply`). Forward and backward of B on 4×4 maps, batch 8: 8 → 2048 channels 408 µs
    as a conv, 341 µs as a GEMM; 8 → 512 channels 182 vs 89 µs. The resnet50 benchmark step went
    from 0.99–1.00 of PEFT's to 0.97–0.98 with it, saving the same tensors for backward.

    Runs only on CPU, for ungrouped convs (a grouped GEMM would copy the weights per sample and
    keep the copies for backward) on batched, non-empty input in the adapters' dtype without
    autocast, with at most 16 samples, or pointwise with at least 49 positions per sample
    (:data:`_GEMM_MAX_BATCH`, :data:`_GEMM_MIN_POSITIONS`). A strided pointwise conv keeps the
    conv: the GEMM would keep a strided copy of x for backward, where the conv keeps x. Where the
    base output is not contiguous (channels-last), the branches are added the reference way.
    """
    base = cast(nn.Conv1d | nn.Conv2d | nn.Conv3d, layer.base)
    if base.groups != 1 or x.device.type != "cpu" or x.dim() != base.weight.dim() or x.numel() == 0:
        return None
    pointwise = _pointwise(base) and x.is_contiguous()
    few = x.shape[0] <= _GEMM_MAX_BATCH or (pointwise and math.prod(x.shape[2:]) >= _GEMM_MIN_POSITIONS)
    if not few or torch.is_autocast_enabled("cpu"):
        return None
    adapters = _lora_adapters(layer)
    if adapters is None or any(ad.lora_A.dtype != x.dtype or ad.lora_B.dtype != x.dtype for ad, _ in adapters):
        return None
    y = base(x)
    if y.dtype != x.dtype or not y.is_contiguous():  # channels-last: no per-sample matrix view of y
        return layer.add_branches(y, x)
    n = y.shape[0]
    for adapter, w in adapters:
        a, b = adapter.live_factors()
        h = F.dropout(x, adapter.dropout, True) if adapter.dropout and layer.training else x
        if pointwise:
            ha = torch.bmm(_per_sample(a, n), h.view(n, h.shape[1], -1))
        else:
            ha = conv_apply(base, h, a).reshape(n, a.shape[0], -1)
        y = torch.baddbmm(y.view(n, y.shape[1], -1), _per_sample(b, n), ha, alpha=w * adapter.scale).view(y.shape)
    return y


def _lora_adapters(layer: LoraLayer) -> list[tuple[LoraAdapter, float]] | None:
    """The active adapters with their weights, or None unless every one is plain LoRA."""
    adapters = [(layer.adapter(name), w) for name, w in layer.active.items()]
    plain = [(ad, w) for ad, w in adapters if isinstance(ad, LoraAdapter) and ad.plain]
    return plain if len(plain) == len(adapters) else None


def _pointwise(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> bool:
    """Whether the conv is a 1×…×1 kernel with stride 1 and no padding: a matrix on each position."""
    padding = conv.padding
    unpadded = isinstance(padding, str) or not any(padding)
    return all(k == 1 for k in conv.kernel_size) and all(s == 1 for s in conv.stride) and unpadded


def _per_sample(weight: Tensor, n: int) -> Tensor:
    """A pointwise conv weight (out, in, 1, …) as n views of its (out × in) matrix (no copy)."""
    return weight.reshape(1, weight.shape[0], -1).expand(n, -1, -1)
