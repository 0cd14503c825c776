"""Merge adapters into base weights, restore them exactly, or unload LoRA altogether.

Merging writes W + ΔW into a layer's base weight and keeps W, so :func:`unmerge` restores it
bit for bit in any dtype. The sum is computed in float32 and checked before anything is written.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from visionlora._tree import replace_module
from visionlora.bnb import bnb_bits, float_weight
from visionlora.errors import AdapterError, MergeError
from visionlora.layers import LoraAdapter, LoraLayer
from visionlora.state import forget, lora_layers

__all__ = ["all_finite", "merge", "merge_and_unload", "merged_weight", "unmerge"]


def all_finite(t: Tensor) -> bool:
    """Whether every element of ``t`` is finite.

    One reduction: a NaN or Inf anywhere makes the float32 sum non-finite. Only a sum that
    overflows although every element is finite needs the element-wise check.
    """
    if not t.is_floating_point():
        return True
    return math.isfinite(t.sum(dtype=torch.float32).item()) or bool(torch.isfinite(t).all())


def merged_weight(layer: LoraLayer) -> Tensor:
    """W + Σ weight · ΔW over ``layer``'s active adapters, computed in float32 and cast to W's dtype.

    Raises:
        MergeError: if the result holds NaN or Inf (fp16 overflow included).
    """
    weight = float_weight(layer.base)
    new = weight.detach().float()
    for name, w in layer.active.items():
        adapter = layer.adapter(name)
        if isinstance(adapter, LoraAdapter) and adapter.plain:
            a, b = adapter.live_factors()
            new = layer.add_delta(new, a.float(), b.float(), w * adapter.scale)
        else:  # DoRA's decomposition is of the original W, as in forward
            new = new + w * adapter.delta(weight.detach(), layer.delta)
    new = new.to(weight.dtype)
    if not all_finite(new):
        raise MergeError(
            f"merging into {type(layer.base).__name__} weight {tuple(weight.shape)} ({weight.dtype}) "
            "gives NaN/Inf; the weights were left untouched"
        )
    return new


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapters (with their weights) into the base weights, in place.

    The math runs in float32 and the result is cast to each weight's dtype. Every new weight is
    computed and checked before any is written: if one would hold NaN/Inf (fp16 overflow
    included), :class:`~visionlora.MergeError` is raised and no weight changes. Layers that are
    already merged are left as they are. Forward then runs the base modules only.

    Example:
        >>> vl.merge(model); y = model(x); vl.unmerge(model)
    """
    layers = [(n, layer) for n, layer in lora_layers(model) if not layer.merged and layer.active]
    disabled = [n for n, layer in layers if layer.disabled]
    if disabled:
        raise AdapterError(
            f"adapters are disabled (e.g. {disabled[0]!r}); call vl.enable_adapters(model) before merging"
        )
    held = [(n, bits) for n, layer in layers if (bits := getattr(layer.base, "quantized_bits", bnb_bits(layer.base)))]
    if held:
        raise MergeError(
            f"{held[0][0]!r} holds its base in {held[0][1]} bits (vl.quantize_base or bitsandbytes): W + ΔW cannot be "
            "written into it without re-quantizing (lossy); use "
            "vl.export_merged(model, path, dtype=...) for a float merged checkpoint, or vl.dequantize_base(model) "
            "first"
        )
    new_weights = [merged_weight(layer) for _, layer in layers]
    for (_, layer), weight in zip(layers, new_weights, strict=True):
        layer.write_merged(weight)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore every merged base weight to its value before :func:`merge`, bit for bit."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and put the original modules back: no LoRA code is left.

    Every LoRA layer is replaced by its base module (of its original class) holding W + ΔW, so
    outputs are unchanged and inference has no overhead. Inactive adapters are discarded.
    Parameters keep their current ``requires_grad`` flags. Returns ``model``.
    """
    merge(model)
    for name, layer in lora_layers(model):
        layer._original_weight = None
        replace_module(model, name, layer.base)
    forget(model)
    return model
