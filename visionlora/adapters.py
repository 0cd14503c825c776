"""Several named adapters on one model: list, switch, weight, disable and delete them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from visionlora._tree import replace_module
from visionlora.config import is_finite_number
from visionlora.errors import AdapterError
from visionlora.state import activate, adapter_state, lora_layers, require_unmerged

__all__ = ["active_adapters", "delete_adapter", "disable_adapters", "enable_adapters", "list_adapters", "set_adapter"]


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added."""
    return list(adapter_state(model).configs)


def _known(model: nn.Module, names: Sequence[str]) -> None:
    available = list_adapters(model)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise AdapterError(f"unknown adapter(s) {unknown}; the model has {available or 'no adapters'}")


def set_adapter(model: nn.Module, adapters: str | Sequence[str] | Mapping[str, float]) -> nn.Module:
    """Choose the active adapter(s); a mapping gives each a weight (a weighted combination).

    The output becomes base + Σ weight · scale · B(A(x)) over the chosen adapters, and
    :func:`visionlora.merge` merges exactly that combination. Trainability is not changed.

    Example:
        >>> vl.set_adapter(model, {"style": 0.7, "detail": 0.3})
    """
    if isinstance(adapters, str):
        adapters = {adapters: 1.0}
    elif isinstance(adapters, Sequence):
        adapters = dict.fromkeys(adapters, 1.0)
    if not isinstance(adapters, Mapping):
        raise AdapterError(
            f"set_adapter: expected a name, a list of names or a name -> weight mapping, got {adapters!r}"
        )
    for n, w in adapters.items():
        if not isinstance(n, str) or not is_finite_number(w):
            raise AdapterError(f"set_adapter: {n!r} -> {w!r}; names are strings and weights finite numbers")
    weights = {n: float(w) for n, w in adapters.items()}
    if not weights:
        raise AdapterError("set_adapter: no adapter given; use vl.disable_adapters(model) to run the base model")
    _known(model, list(weights))
    require_unmerged(model, "change the active adapters")
    activate(model, weights)
    return model


def active_adapters(model: nn.Module) -> dict[str, float]:
    """The active adapters and their weights (the union over layers)."""
    out: dict[str, float] = {}
    for _, layer in lora_layers(model):
        out.update(layer.active)
    return out


def _set_disabled(model: nn.Module, disabled: bool) -> nn.Module:
    require_unmerged(model, "disable or enable adapters")
    for _, layer in lora_layers(model):
        layer.disabled = disabled
    return model


def disable_adapters(model: nn.Module) -> nn.Module:
    """Run the base model: every adapter is bypassed until :func:`enable_adapters`."""
    return _set_disabled(model, True)


def enable_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`disable_adapters`."""
    return _set_disabled(model, False)


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` everywhere; LoRA layers left with no adapter go back to their base module."""
    _known(model, [name])
    require_unmerged(model, "delete an adapter")
    for layer_name, layer in lora_layers(model):
        if name in layer.adapters:
            layer.delete_adapter(name)
        if not layer.adapters:
            replace_module(model, layer_name, layer.base)
    del adapter_state(model).configs[name]
    return model
