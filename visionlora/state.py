"""What a model carries about its adapters, in one place: configs, a buffer snapshot, names.

The LoRA layers themselves hold the adapters' tensors (see :mod:`visionlora.layers`). Beside them
each adapted model keeps one :class:`AdapterState` (an attribute of the model object, so
``copy.deepcopy`` copies it and ``state_dict()`` never sees it):

- ``configs``: the :class:`~visionlora.LoraConfig` each named adapter was applied or loaded with,
  in the order they were added; the names of a model's adapters are its keys;
- ``buffers_before``: the persistent buffers (BatchNorm statistics) as they were when the first
  adapter was added, so that what training changed can be saved with the adapter.

Everything else here answers questions about an adapted model under the names of the un-adapted
one (``layer4.0.conv1.weight``, not ``layer4.0.conv1.base.weight``): its parameters, buffers and
state dict, and the tensors that train with an adapter besides its A and B.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from visionlora._tree import is_under, iter_modules, require_module
from visionlora.config import LoraConfig, pattern_matches
from visionlora.errors import AdapterError
from visionlora.layers import LoraLayer

__all__ = [
    "AdapterState",
    "activate",
    "adapter_state",
    "changed_buffers",
    "check_adapter_name",
    "extra_parameters",
    "forget",
    "lora_layers",
    "original_buffers",
    "original_parameters",
    "original_state_dict",
    "require_unmerged",
    "snapshot_buffers",
    "trained_extras",
]

_ATTR = "_visionlora_state"
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


@dataclass
class AdapterState:
    """What visionlora records about one model's adapters (see the module docstring)."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    """Adapter name -> the config it was applied or loaded with, in the order they were added."""
    buffers_before: dict[str, torch.Tensor] | None = None
    """The persistent buffers, by original name, as they were when the first adapter was added."""


def adapter_state(model: nn.Module) -> AdapterState:
    """The :class:`AdapterState` of ``model`` (an empty one before any adapter is added).

    Raises:
        UnsupportedModuleError: if ``model`` is not an ``nn.Module``.
    """
    require_module(model)
    state = model.__dict__.get(_ATTR)
    if not isinstance(state, AdapterState):
        state = AdapterState()
        model.__dict__[_ATTR] = state
    return state


def forget(model: nn.Module) -> None:
    """Drop ``model``'s :class:`AdapterState` (once its LoRA layers are unloaded)."""
    model.__dict__.pop(_ATTR, None)


def check_adapter_name(adapter_name: str) -> None:
    """Raise :class:`AdapterError` unless ``adapter_name`` can name an adapter."""
    if not isinstance(adapter_name, str) or not _ADAPTER_NAME.fullmatch(adapter_name):
        raise AdapterError(f"adapter name {adapter_name!r} is invalid; use letters, digits, '_' and '-' only")
    if hasattr(nn.ModuleDict(), adapter_name):
        raise AdapterError(f"adapter name {adapter_name!r} is reserved by torch.nn.ModuleDict; choose another")


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """Every LoRA layer in ``model`` with its (first) full name."""
    seen: set[int] = set()
    out = []
    for name, module in iter_modules(model):
        if isinstance(module, LoraLayer) and id(module) not in seen:
            seen.add(id(module))
            out.append((name, module))
    return out


def activate(model: nn.Module, weights: dict[str, float]) -> None:
    """Set the active adapters and weights of every LoRA layer (layers lacking a name skip it)."""
    for _, layer in lora_layers(model):
        layer.set_active(weights)


def require_unmerged(model: nn.Module, action: str) -> None:
    """Raise :class:`AdapterError` naming ``action`` if any LoRA layer is merged."""
    merged = [n for n, layer in lora_layers(model) if layer.merged]
    if merged:
        raise AdapterError(
            f"cannot {action} while adapters are merged (e.g. {merged[0]!r}); call vl.unmerge(model) first"
        )


def _original_named(model: nn.Module, named: Iterator[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    layers = {n for n, _ in lora_layers(model)}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in named:
        parts = name.split(".")
        # The LoRA layer the tensor sits in, if any (shortest first: a layer's own modules are not layers).
        owner = next((i for i in range(1, len(parts)) if ".".join(parts[:i]) in layers), None)
        if owner is None:
            out[name] = tensor
        elif parts[owner] == "base":
            out[".".join(parts[:owner] + parts[owner + 1 :])] = tensor
    return out


def original_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every non-LoRA parameter under the name it has in the un-adapted model."""
    return _original_named(model, model.named_parameters())


def original_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` under the un-adapted model's keys, without the adapters' tensors."""
    return _original_named(model, iter(model.state_dict().items()))


def original_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every persistent buffer (e.g. BatchNorm running statistics) under its un-adapted name."""
    persistent = set(model.state_dict(keep_vars=True))
    return _original_named(model, ((n, b) for n, b in model.named_buffers() if n in persistent))


def snapshot_buffers(model: nn.Module) -> None:
    """Remember the buffers as they are now (once per model), so training's changes can be saved."""
    state = adapter_state(model)
    if state.buffers_before is None:
        state.buffers_before = {n: b.detach().clone() for n, b in original_buffers(model).items()}


_INT8_WEIGHTS = (".weight_int8", ".weight_scale")


def changed_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that differ from the snapshot taken when LoRA was first added (all of them without one)."""
    before = adapter_state(model).buffers_before or {}
    return {
        n: b
        for n, b in original_buffers(model).items()
        if not n.endswith(_INT8_WEIGHTS)  # a base held in int8 (visionlora.quantize): weights, not training state
        and (n not in before or before[n].shape != b.shape or not torch.equal(before[n], b.to(before[n].device)))
    }


def extra_parameters(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Non-LoRA parameters that train and are saved with adapter ``adapter_name``, by original name.

    These are the parameters of ``trainable`` modules plus the biases chosen by ``bias``.
    """
    adapted = {n for n, layer in lora_layers(model) if adapter_name in layer.adapters}
    return trained_extras(model, adapter_state(model).configs[adapter_name], adapted)


def trained_extras(model: nn.Module, cfg: LoraConfig, adapted: set[str]) -> dict[str, torch.Tensor]:
    """The ``trainable`` modules' parameters and the biases ``cfg.bias`` chooses, by original name,
    for a config whose adapted layers are ``adapted`` (before or after they are wrapped)."""
    params = original_parameters(model)
    modules = [n for n, _ in iter_modules(model)]
    roots = {n for n in modules for p in cfg.trainable if pattern_matches(p, n)}
    chosen = {n: p for n, p in params.items() if is_under(n.rpartition(".")[0], roots)}
    if cfg.bias == "all":
        chosen.update({n: p for n, p in params.items() if n.rpartition(".")[2] == "bias"})
    elif cfg.bias == "lora_only":
        chosen.update({f"{n}.bias": params[f"{n}.bias"] for n in adapted if f"{n}.bias" in params})
    return dict(sorted(chosen.items()))
