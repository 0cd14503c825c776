"""A readable table of the LoRA layers in a model."""

from __future__ import annotations

from torch import nn

from visionlora.bnb import held_numel
from visionlora.branches import Adapter
from visionlora.layers import layer_kind
from visionlora.state import lora_layers

__all__ = ["summary"]


def summary(model: nn.Module) -> str:
    """A table of the LoRA layers (layer, adapter, kind, in/out, kernel, groups, resolution, rank, alpha,
    family, params) with totals. Resolution is "-" where no probe measured it; a rank that a rank schedule
    holds lower reads ``2 of 16``; params are every value the adapter trains (DoRA's magnitude, LoHa's and
    LoKr's factors included).

    Example:
        >>> print(vl.summary(model))
    """
    header = (
        "layer", "adapter", "kind", "in/out", "kernel", "groups", "resolution", "rank", "alpha", "family", "LoRA params"
    )  # fmt: skip
    rows = []
    lora_total = 0
    for name, layer in lora_layers(model):
        base = layer.base
        kind = layer_kind(base) or ""
        if type(base).__name__ != kind:
            kind = f"{kind} ({type(base).__name__})"
        if isinstance(base, nn.Linear):
            in_out, kernel, groups = f"{base.in_features}/{base.out_features}", "-", "-"
        else:
            in_out = f"{base.in_channels}/{base.out_channels}"
            kernel, groups = "x".join(str(k) for k in base.weight.shape[2:]), str(base.groups)
        for adapter_name in layer.adapters:
            adapter = layer.adapter(adapter_name)
            count = adapter.num_params()
            lora_total += count
            mark = "" if adapter_name in layer.active else " (inactive)"
            rows.append(
                (
                    name,
                    adapter_name + mark,
                    kind,
                    in_out,
                    kernel,
                    groups,
                    "-" if adapter.resolution is None else str(adapter.resolution),
                    _rank(adapter),
                    f"{adapter.alpha:g}",
                    adapter.family,
                    f"{count:,}",
                )
            )
    total = sum(held_numel(p) for p in model.parameters())  # a packed 4-bit weight: its unpacked count
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    pct = 100.0 * trainable / total if total else 0.0
    lines.append("")
    lines.append(f"LoRA layers: {len(lora_layers(model))}   LoRA params: {lora_total:,}")
    lines.append(f"trainable params: {trainable:,} of {total:,} ({pct:.2f}%)")
    return "\n".join(lines)


def _rank(adapter: Adapter) -> str:
    """The rank, with the rank in use when a rank schedule holds it lower (``2 of 16``)."""
    held = getattr(adapter, "held_rank", None)
    return str(adapter.rank) if held is None else f"{held} of {adapter.rank}"
