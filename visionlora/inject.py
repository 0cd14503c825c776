"""Target selection, wrapping and trainability: from a model and a :class:`LoraConfig` to LoRA layers.

Matching is a pure step (:func:`match_targets` returns names, modules and ranks before anything
changes); :func:`apply_lora` validates everything first and only then replaces modules.

Selection rules:

- a pattern with a wildcard (or ``re:``) selects the adaptable layers among the modules it
  matches (``layer4.*`` takes the convs, not the BatchNorms); it must select at least one;
- an exact name must name an adaptable layer; naming any other module is an error;
- ``exclude`` patterns, and modules listed in ``trainable`` (and everything inside them), are
  never adapted by a wildcard;
- the root module itself is never a target;
- ``preset:<name>[:<n>]`` stands for the exact layer names the preset selects in this model
  (see :mod:`visionlora.models.presets`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from visionlora._tree import iter_modules, replace_module, require_module
from visionlora.config import LoraConfig, is_exact_name, pattern_matches
from visionlora.errors import AdapterError, ConfigError, TargetError, UnsupportedModuleError
from visionlora.layers import (
    InitFn,
    LoraLayer,
    base_layer,
    gaussian_init,
    kaiming_init,
    layer_kind,
    lora_shapes,
    max_useful_rank,
    wrap_layer,
)
from visionlora.models.presets import expand_preset
from visionlora.ranks import allocate, probe_resolutions

__all__ = [
    "Match",
    "adaptable_kind",
    "adapter_configs",
    "apply_lora",
    "changed_buffers",
    "check_adapter_name",
    "check_selected",
    "check_wrappable",
    "extra_parameters",
    "forget_configs",
    "iter_modules",
    "lora_layers",
    "mark_trainable",
    "match_targets",
    "original_buffers",
    "original_parameters",
    "original_state_dict",
    "snapshot_buffers",
    "trained_extras",
]

_INITS: dict[str, InitFn] = {"kaiming": kaiming_init, "gaussian": gaussian_init}
_CONFIGS_ATTR = "_visionlora_configs"
_BUFFERS_ATTR = "_visionlora_buffers"
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


@dataclass(frozen=True)
class Match:
    """One layer a config selects: its full name, the module, and the rank and alpha it gets."""

    name: str
    module: nn.Module
    kind: str
    rank: int
    alpha: float
    resolution: int | None = None
    """min(H, W) of the feature map the layer works on, when measured (see visionlora.ranks)."""


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """Every LoRA layer in ``model`` with its (first) full name."""
    seen: set[int] = set()
    out = []
    for name, module in iter_modules(model):
        if isinstance(module, LoraLayer) and id(module) not in seen:
            seen.add(id(module))
            out.append((name, module))
    return out


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The config each named adapter of ``model`` was applied with (empty before :func:`apply_lora`)."""
    require_module(model)
    return model.__dict__.setdefault(_CONFIGS_ATTR, {})


def forget_configs(model: nn.Module) -> None:
    """Drop what visionlora recorded on ``model`` (configs, buffer snapshot) once LoRA is unloaded."""
    model.__dict__.pop(_CONFIGS_ATTR, None)
    model.__dict__.pop(_BUFFERS_ATTR, None)


# Parents that read their children's weights directly (fused or fast paths) instead of calling them.
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def adaptable_kind(name: str, module: nn.Module, by_name: dict[str, nn.Module]) -> str | None:
    """The layer kind of ``module`` if visionlora can adapt it where it sits in the model, else None."""
    parent = by_name.get(name.rpartition(".")[0]) if "." in name else None
    if isinstance(parent, _READS_CHILD_WEIGHTS):
        return None
    return layer_kind(module)


def check_selected(model: nn.Module, selected: dict[str, nn.Module], adapter_name: str) -> None:
    """Refuse layers that are shared, whose weight is tied to another parameter, or that have ``adapter_name``."""
    paths: defaultdict[int, list[str]] = defaultdict(list)
    for name, module in iter_modules(model):
        paths[id(module)].append(name)
    owners: defaultdict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)].append(name)
    for name, module in selected.items():
        outer = [o for o in selected if name.startswith(o + ".")]
        if outer:
            raise TargetError(f"{name!r} lies inside {outer[0]!r}, which is adapted too; adapt one of them")
        others = [p for p in paths[id(module)] if p != name]
        if others:
            raise TargetError(
                f"{name!r} is the same module object as {others[0]!r}; a shared module cannot be adapted "
                "under one name only (the other path would run without the adapter)"
            )
        weight = base_layer(module).weight
        if len(owners[id(weight)]) > 1:
            tied = [o for o in owners[id(weight)] if not o.startswith(name + ".")] or owners[id(weight)]
            raise TargetError(
                f"{name!r}: its weight is tied to {tied[-1]!r}; merging would change both, so tied weights "
                "cannot be adapted"
            )
        if isinstance(module, LoraLayer) and adapter_name in module.adapters:
            raise AdapterError(
                f"{name!r} already has adapter {adapter_name!r}; pass adapter_name='<new name>' to add another adapter"
            )


def _near_names(pattern: str, names: list[str]) -> str:
    literal = pattern[3:] if pattern.startswith("re:") else pattern.split("*")[0].split("?")[0]
    near = difflib.get_close_matches(literal or pattern, names, n=5, cutoff=0.3) or names[:5]
    return ", ".join(near)


def _matching(patterns: list[str], names: list[str], field_name: str) -> set[str]:
    selected: set[str] = set()
    for pattern in patterns:
        hits = {n for n in names if pattern_matches(pattern, n)}
        if not hits:
            raise TargetError(
                f"{field_name} pattern {pattern!r} matches no module; near names: {_near_names(pattern, names)}"
            )
        selected |= hits
    return selected


def _under(name: str, roots: set[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def match_targets(
    model: nn.Module, cfg: LoraConfig, *, adapter_name: str = "default", example_input: Any = None
) -> list[Match]:
    """The layers ``cfg`` selects in ``model``, in model order, with their ranks and alphas.

    With ``example_input`` (a tensor, a tuple of positional arguments or a dict of keyword
    arguments), one probe forward pass measures each layer's resolution (see
    :mod:`visionlora.ranks`), used by ``rank_by_resolution`` and ``rank_budget``.

    Changes nothing (the probe restores every mode and touches no parameter or buffer). Raises
    :class:`TargetError` for a pattern that selects no adaptable layer (listing near module names),
    :class:`UnsupportedModuleError` for an exact name of a module that cannot be adapted, and
    :class:`AdapterError` if a layer already has ``adapter_name``.

    Example:
        >>> [m.name for m in match_targets(resnet, LoraConfig(targets="layer4.0.conv*"))]
        ['layer4.0.conv1', 'layer4.0.conv2', 'layer4.0.conv3']
    """
    modules = list(iter_modules(model))
    names = [n for n, _ in modules]
    by_name = dict(modules)
    trainable = _matching(cfg.trainable, names, "trainable")
    excluded = _matching(cfg.exclude, names, "exclude")
    selected: dict[str, nn.Module] = {}
    targets = [n for t in cfg.targets for n in (expand_preset(model, t) if t.startswith("preset:") else [t])]
    for pattern in targets:
        hits = [(n, m) for n, m in modules if pattern_matches(pattern, n)]
        if is_exact_name(pattern):
            if not hits:
                raise TargetError(
                    f"target {pattern!r}: no module of that name; near names: {_near_names(pattern, names)}"
                )
            name, module = hits[0]
            kind = adaptable_kind(name, module, by_name)
            if kind is None:
                hint = f"; to adapt the layers inside it use '{name}.*'" if any(True for _ in module.children()) else ""
                if isinstance(module, nn.Linear):
                    hint = (
                        "; its parent (MultiheadAttention or TransformerEncoderLayer) reads the weight directly "
                        "in its fast path, so an adapter there would be skipped"
                    )
                raise UnsupportedModuleError(
                    f"target {name!r} is a {type(module).__name__}, which visionlora cannot adapt "
                    f"(it adapts nn.Linear and nn.Conv1d/2d/3d){hint}"
                )
            if _under(name, trainable):
                raise TargetError(
                    f"target {name!r} is also listed in trainable; a module is either adapted or trained in full"
                )
            selected[name] = module
            continue
        usable = [
            (n, m)
            for n, m in hits
            if adaptable_kind(n, m, by_name) in cfg.target_types and not _under(n, trainable) and n not in excluded
        ]
        if not usable:
            found = sorted({type(m).__name__ for _, m in hits})
            what = f"only modules of type {', '.join(found)}" if hits else "no module"
            raise TargetError(
                f"target {pattern!r} selects no adaptable layer of types {cfg.target_types}: it matches {what}; "
                f"near names: {_near_names(pattern, names)}"
            )
        selected.update(usable)
    check_selected(model, selected, adapter_name)
    order = {n: i for i, n in enumerate(names)}
    ordered = sorted(selected, key=order.__getitem__)
    bases = {n: base_layer(selected[n]) for n in ordered}
    resolutions = None if example_input is None else probe_resolutions(model, bases, example_input, modules=selected)
    ranks = allocate(bases, cfg, resolutions)
    matches = [
        Match(n, selected[n], layer_kind(selected[n]) or "", *ranks[n], resolutions[n] if resolutions else None)
        for n in ordered
    ]
    check_wrappable(matches, cfg.dropout)
    return matches


def check_wrappable(matches: list[Match], dropout: float) -> None:
    """Raise now, before any change, for anything :func:`add_adapters` would refuse."""
    for m in matches:
        layer = m.module if isinstance(m.module, LoraLayer) else wrap_layer(m.module, m.name)
        try:
            layer.check_dropout(dropout)
        except ConfigError as exc:
            raise ConfigError(f"{m.name!r}: {exc}") from None


def check_adapter_name(adapter_name: str) -> None:
    """Raise :class:`AdapterError` unless ``adapter_name`` can name an adapter."""
    if not isinstance(adapter_name, str) or not _ADAPTER_NAME.fullmatch(adapter_name):
        raise AdapterError(f"adapter name {adapter_name!r} is invalid; use letters, digits, '_' and '-' only")
    if hasattr(nn.ModuleDict(), adapter_name):
        raise AdapterError(f"adapter name {adapter_name!r} is reserved by torch.nn.ModuleDict; choose another")


def _warn_ranks(matches: list[Match], cfg: LoraConfig) -> None:
    too_high, too_big = [], []
    for m in matches:
        base = base_layer(m.module)
        usable = max_useful_rank(base, cfg.conv_groups)
        if m.rank > usable:
            too_high.append(f"{m.name} (r={m.rank} > {usable})")
        a_shape, b_shape = lora_shapes(base, m.rank, cfg.conv_groups)
        if torch.Size(a_shape).numel() + torch.Size(b_shape).numel() > base.weight.numel():
            too_big.append(m.name)
    if too_high:
        warnings.warn(
            "rank above what the layer can use (ΔW cannot exceed min(out, in) per factorised matrix): "
            + "; ".join(too_high),
            stacklevel=3,
        )
    if too_big:
        grouped = any(getattr(base_layer(m.module), "groups", 1) > 1 for m in matches if m.name in too_big)
        hint = " (for depthwise convs use conv_groups='shared')" if grouped and cfg.conv_groups == "per_group" else ""
        warnings.warn(
            f"adapter has more parameters than the layer it adapts{hint}: " + ", ".join(too_big),
            stacklevel=3,
        )


def add_adapters(
    model: nn.Module,
    matches: list[Match],
    cfg: LoraConfig,
    adapter_name: str,
    generator: torch.Generator | None = None,
    init: InitFn | None = None,
) -> None:
    """Wrap each matched layer (once) and give it adapter ``adapter_name``; no activation.

    Every wrapper and adapter tensor is built before the first one is attached, so a failure
    (out of memory, say) leaves the model unchanged. ``init`` overrides ``cfg.init``. New wrappers
    take the model's disabled state (see :func:`visionlora.disable_adapters`).
    """
    init = init or _INITS[cfg.init]
    disabled = any(layer.disabled for _, layer in lora_layers(model))
    built = []
    for m in matches:
        if isinstance(m.module, LoraLayer):
            layer = m.module
        else:
            layer = wrap_layer(m.module, m.name)
            layer.disabled = disabled
        adapter = layer.new_adapter(
            m.rank,
            m.alpha,
            rslora=cfg.rslora,
            dropout=cfg.dropout,
            init=init,
            generator=generator,
            conv_groups=cfg.conv_groups,
        )
        adapter.resolution = m.resolution
        built.append((m, layer, adapter))
    for m, layer, adapter in built:
        layer.adapters[adapter_name] = adapter
        if layer is not m.module:
            replace_module(model, m.name, layer)


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
    if _BUFFERS_ATTR not in model.__dict__:
        model.__dict__[_BUFFERS_ATTR] = {n: b.detach().clone() for n, b in original_buffers(model).items()}


def changed_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that differ from the snapshot taken when LoRA was first added (all of them without one)."""
    before = model.__dict__.get(_BUFFERS_ATTR, {})
    return {
        n: b
        for n, b in original_buffers(model).items()
        if n not in before or before[n].shape != b.shape or not torch.equal(before[n], b.to(before[n].device))
    }


def extra_parameters(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Non-LoRA parameters that train and are saved with adapter ``adapter_name``, by original name.

    These are the parameters of ``trainable`` modules plus the biases chosen by ``bias``.
    """
    adapted = {n for n, layer in lora_layers(model) if adapter_name in layer.adapters}
    return trained_extras(model, adapter_configs(model)[adapter_name], adapted)


def trained_extras(model: nn.Module, cfg: LoraConfig, adapted: set[str]) -> dict[str, torch.Tensor]:
    """The ``trainable`` modules' parameters and the biases ``cfg.bias`` chooses, by original name,
    for a config whose adapted layers are ``adapted`` (before or after they are wrapped)."""
    params = original_parameters(model)
    modules = [n for n, _ in iter_modules(model)]
    roots = {n for n in modules for p in cfg.trainable if pattern_matches(p, n)}
    chosen = {n: p for n, p in params.items() if _under(n.rpartition(".")[0], roots)}
    if cfg.bias == "all":
        chosen.update({n: p for n, p in params.items() if n.rpartition(".")[2] == "bias"})
    elif cfg.bias == "lora_only":
        chosen.update({f"{n}.bias": params[f"{n}.bias"] for n in adapted if f"{n}.bias" in params})
    return dict(sorted(chosen.items()))


def mark_trainable(model: nn.Module, adapter_name: str) -> None:
    """Freeze everything except adapter ``adapter_name`` and its ``trainable`` modules and biases."""
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in lora_layers(model):
        if adapter_name in layer.adapters:
            layer.adapter(adapter_name).requires_grad_(True)
    for tensor in extra_parameters(model, adapter_name).values():
        tensor.requires_grad_(True)


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


def apply_lora(
    model: nn.Module,
    cfg: LoraConfig,
    *,
    adapter_name: str = "default",
    generator: torch.Generator | None = None,
    example_input: Any = None,
) -> nn.Module:
    """Add LoRA adapters to the layers ``cfg`` selects, in place, and return ``model``.

    The new adapter becomes the active one; only its parameters, the ``trainable`` modules and
    the biases chosen by ``cfg.bias`` keep ``requires_grad``. B starts at zero, so outputs are
    unchanged until training. Nothing changes if any check fails.

    Args:
        model: Any ``nn.Module``.
        cfg: What to adapt and how.
        adapter_name: Name of this adapter; give a new one to add a second adapter to a model.
        generator: Random source for the initialisation of A.
        example_input: Input for one probe forward pass that measures each layer's feature-map
            resolution (needed by ``rank_by_resolution``; used by ``rank_budget``): a tensor, a
            tuple of positional arguments or a dict of keyword arguments.

    Raises:
        TargetError, UnsupportedModuleError: the targets do not fit the model.
        AdapterError: ``adapter_name`` is invalid or already used, or the model is merged.

    Example:
        >>> model = vl.apply_lora(torchvision.models.resnet18(), vl.LoraConfig(targets="layer4.*", rank=4))
    """
    if not isinstance(cfg, LoraConfig):
        raise ConfigError(f"cfg: expected a visionlora.LoraConfig, got {type(cfg).__name__}")
    cfg = dataclasses.replace(copy.deepcopy(cfg))  # our own copy, checked again in case it was edited
    check_adapter_name(adapter_name)
    require_unmerged(model, "add an adapter")
    matches = match_targets(model, cfg, adapter_name=adapter_name, example_input=example_input)
    _warn_ranks(matches, cfg)
    snapshot_buffers(model)
    add_adapters(model, matches, cfg, adapter_name, generator)
    adapter_configs(model)[adapter_name] = cfg
    activate(model, {adapter_name: 1.0})
    mark_trainable(model, adapter_name)
    return model
