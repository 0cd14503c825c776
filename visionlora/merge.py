"""Merge adapters into base weights, restore them exactly, or unload LoRA altogether."""

from __future__ import annotations

from torch import nn

from visionlora._tree import replace_module
from visionlora.errors import AdapterError
from visionlora.inject import forget_configs, lora_layers

__all__ = ["merge", "merge_and_unload", "unmerge"]


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
    new_weights = [layer.merged_weight() for _, layer in layers]
    for (_, layer), weight in zip(layers, new_weights, strict=True):
        layer.commit_merge(weight)
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
    forget_configs(model)
    return model
