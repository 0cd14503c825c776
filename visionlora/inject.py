"""From a model and a :class:`LoraConfig` to LoRA layers: match, then wrap, then mark what trains.

1. **Match** (:func:`match_targets`) is a pure step: names, modules, ranks and alphas, before
   anything changes.
2. **Wrap** (:func:`attach`): each matched layer is wrapped once (:func:`wrap_layer`, which also
   picks its :mod:`~visionlora.fastpaths` form) and gets the named adapter; the config goes into
   the model's :class:`~visionlora.state.AdapterState`. :func:`apply_lora`,
   :func:`~visionlora.load_adapter` and :func:`~visionlora.extract_lora` all attach through it.
3. **Mark** (:func:`mark_trainable`): only the new adapter, its ``trainable`` modules and its
   biases keep ``requires_grad``.

Every check runs before the first change, so a refused call leaves the model as it was.

Selection: a pattern with a wildcard (or ``re:``) selects the adaptable layers among the modules
it matches (``layer4.*`` takes the convs, not the BatchNorms) and must select at least one; an
exact name must name an adaptable layer; ``exclude`` patterns and ``trainable`` modules (with
everything inside them) are never adapted by a wildcard; the root module is never a target;
``preset:<name>[:<n>]`` stands for the exact layer names the preset selects in this model.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from visionlora._tree import adaptable_kind, check_placement, is_under, iter_modules, replace_module
from visionlora.bnb import float_weight
from visionlora.branches import Adapter, adapter_shapes, adapter_tensors, check_family, new_adapter, param_count
from visionlora.config import Family, LoraConfig, is_exact_name, pattern_matches
from visionlora.errors import AdapterError, ConfigError, TargetError, UnsupportedModuleError
from visionlora.fastpaths import fast_path_for
from visionlora.growth import start_schedule
from visionlora.layers import LoraConv, LoraConvTranspose, LoraLayer, LoraLinear, base_layer, layer_kind
from visionlora.lora_math import InitFn, gaussian_init, is_transposed, kaiming_init, max_useful_rank
from visionlora.models.presets import expand_preset, presets_in_patterns
from visionlora.quantize import check_not_dynamic, release_trained
from visionlora.ranks import allocate, probe_resolutions
from visionlora.state import (
    activate,
    adapter_state,
    check_adapter_name,
    extra_parameters,
    lora_layers,
    original_buffers,
    original_parameters,
    require_unmerged,
    snapshot_buffers,
)

__all__ = [
    "Match",
    "apply_lora",
    "attach",
    "check_new_adapter",
    "check_selected",
    "check_wrappable",
    "mark_trainable",
    "match_targets",
    "warn_ranks",
    "wrap_layer",
]

_INITS: dict[str, InitFn] = {"kaiming": kaiming_init, "gaussian": gaussian_init}


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
    family: Family = "lora"
    """The adapter family the layer gets."""


def check_selected(model: nn.Module, selected: dict[str, nn.Module], adapter_name: str) -> None:
    """Refuse layers that are nested, shared or tied (see :func:`~visionlora._tree.check_placement`),
    or that already have ``adapter_name``."""
    check_placement(model, selected)
    for name, module in selected.items():
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
            if is_under(name, trainable):
                raise TargetError(
                    f"target {name!r} is also listed in trainable; a module is either adapted or trained in full"
                )
            selected[name] = module
            continue
        usable = [
            (n, m)
            for n, m in hits
            if adaptable_kind(n, m, by_name) in cfg.target_types and not is_under(n, trainable) and n not in excluded
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
    ranks = allocate(bases, presets_in_patterns(model, cfg), resolutions)
    matches = [
        Match(n, selected[n], layer_kind(selected[n]) or "", *ranks[n][:2], resolutions[n] if resolutions else None,
              ranks[n][2])
        for n in ordered
    ]  # fmt: skip
    check_wrappable(matches, cfg.dropout)
    return matches


def check_wrappable(matches: list[Match], dropout: float) -> None:
    """Raise now, before any change, for anything :func:`attach` would refuse."""
    for m in matches:
        layer = m.module if isinstance(m.module, LoraLayer) else wrap_layer(m.module, m.name)
        try:
            layer.check_dropout(dropout)
            check_family(layer.base, m.family)
        except ConfigError as exc:
            raise ConfigError(f"{m.name!r}: {exc}") from None


def warn_ranks(matches: list[Match], cfg: LoraConfig) -> None:
    """Warn (once per cause) about ranks a layer cannot use and adapters larger than their layer."""
    too_high, too_big = [], []
    for m in matches:
        base = base_layer(m.module)
        usable = max_useful_rank(base, cfg.conv_groups)
        if m.rank > usable:
            too_high.append(f"{m.name} (r={m.rank} > {usable})")
        if param_count(base, m.family, m.rank, cfg) > float_weight(base).numel():
            too_big.append(m.name)
    if too_high:
        warnings.warn(
            "rank above what the layer can use (ΔW cannot exceed min(out, in) per factorised matrix): "
            + "; ".join(too_high),
            stacklevel=3,  # the caller of apply_lora
        )
    if too_big:
        bases = [base_layer(m.module) for m in matches if m.name in too_big]
        grouped = any(getattr(b, "groups", 1) > 1 and not is_transposed(b) for b in bases)
        hint = " (for depthwise convs use conv_groups='shared')" if grouped and cfg.conv_groups == "per_group" else ""
        warnings.warn(
            f"adapter has more parameters than the layer it adapts{hint}: " + ", ".join(too_big),
            stacklevel=3,
        )


def wrap_layer(module: nn.Module, name: str = "") -> LoraLayer:
    """A :class:`~visionlora.LoraLinear` or :class:`~visionlora.LoraConv` around ``module``, with no
    adapters yet and the fast path of its class (:func:`visionlora.fastpaths.fast_path_for`).

    Raises:
        UnsupportedModuleError: for any other type, and for uninitialised (lazy) or
            parametrized layers, or layers with forward hooks; the message names ``name`` and the type.
    """
    label = f"{name!r} ({type(module).__name__})" if name else type(module).__name__
    kind = layer_kind(module)
    if kind is None:
        raise UnsupportedModuleError(
            f"{label}: visionlora adapts nn.Linear, nn.Conv1d/2d/3d and nn.ConvTranspose1d/2d/3d (and their "
            "subclasses), "
            f"not {type(module).__name__}"
        )
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        raise UnsupportedModuleError(f"{label}: lazy layer is not initialised; run one forward pass first")
    if parametrize.is_parametrized(module):
        raise UnsupportedModuleError(f"{label}: layers with torch parametrizations are not supported")
    if module._forward_pre_hooks or module._forward_hooks:
        raise UnsupportedModuleError(
            f"{label}: has forward hooks (old-style weight_norm and spectral_norm are hooks too); the LoRA branch "
            "would bypass them, so merged and unmerged outputs would differ. Remove the hooks before adapting"
        )
    base: Any = module
    cls = LoraLinear if kind == "Linear" else LoraConvTranspose if kind.startswith("ConvTranspose") else LoraConv
    wrapper = cls(base)
    wrapper.fast = fast_path_for(wrapper)
    return wrapper.train(module.training)  # a layer in eval mode stays in eval mode (no branch dropout)


def check_new_adapter(model: nn.Module, cfg: LoraConfig, adapter_name: str) -> LoraConfig:
    """Raise unless ``cfg`` can be added to ``model`` as ``adapter_name``; return a private copy of ``cfg``.

    Raises:
        ConfigError: ``cfg`` is not a LoraConfig.
        AdapterError: ``adapter_name`` is invalid, or the model is merged.
    """
    if not isinstance(cfg, LoraConfig):
        raise ConfigError(f"cfg: expected a visionlora.LoraConfig, got {type(cfg).__name__}")
    check_adapter_name(adapter_name)
    require_unmerged(model, "add an adapter")  # also refuses what is not an nn.Module
    check_not_dynamic(model)
    return dataclasses.replace(copy.deepcopy(cfg))  # our own copy, checked again in case it was edited


def attach(
    model: nn.Module,
    matches: list[Match],
    cfg: LoraConfig,
    adapter_name: str,
    *,
    generator: torch.Generator | None = None,
    values: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Give each matched layer adapter ``adapter_name`` (wrapping it once), record ``cfg``, make the
    adapter the active one and mark what trains. The caller has run every check.

    Without ``values``, A is drawn by ``cfg.init`` (from ``generator``) and B is zero. ``values``
    (by the un-adapted model's names: ``<layer>.lora_A.weight``, ``<layer>.lora_B.weight``, and
    any parameter or buffer that trains with the adapter) are copied in instead. Every wrapper and
    adapter tensor is built before the first one is attached, so a failure (out of memory, say)
    leaves the model unchanged. New wrappers take the model's disabled state.
    """
    if values is not None:
        _check_values(model, matches, values, cfg)
    init = None if values is not None else _INITS[cfg.init]
    disabled = any(layer.disabled for _, layer in lora_layers(model))
    built = []
    for m in matches:
        if isinstance(m.module, LoraLayer):
            layer = m.module
        else:
            layer = wrap_layer(m.module, m.name)
            layer.disabled = disabled
        built.append((m, layer, _new_adapter(layer, m, cfg, init, generator, values)))
    release_trained(model, cfg.trainable)  # an int8 module that trains in full is float again
    snapshot_buffers(model)  # before any value is copied in: what differs from it is saved with the adapter
    for m, layer, adapter in built:
        layer.adapters[adapter_name] = adapter
        if layer is not m.module:
            replace_module(model, m.name, layer)
    if values is not None:
        _copy_in(model, [(m.name, adapter) for m, _, adapter in built], values)
    adapter_state(model).configs[adapter_name] = cfg
    activate(model, {adapter_name: 1.0})
    mark_trainable(model, adapter_name)


def _new_adapter(
    layer: LoraLayer,
    m: Match,
    cfg: LoraConfig,
    init: InitFn | None,
    generator: torch.Generator | None,
    values: Mapping[str, torch.Tensor] | None,
) -> Adapter:
    """A new adapter for ``layer`` (ΔW = 0, or empty for ``values``), not yet attached to it."""
    layer.check_dropout(cfg.dropout)
    given = None if values is None else _given_shapes(values).get(m.name, {})
    adapter = new_adapter(layer.base, m.family, m.rank, m.alpha, cfg, init, generator, given)
    adapter.resolution = m.resolution
    if init is not None:  # a new adapter, not values copied in: it starts where its schedule does
        start_schedule(adapter, cfg.rank_schedule, m.name)
    return adapter


def _given_shapes(values: Mapping[str, torch.Tensor]) -> dict[str, dict[str, tuple[int, ...]]]:
    """The shapes of ``values``' adapter tensors by layer (``fc.lora_A.weight`` -> ``{"fc": {"lora_A.weight": …}}``)."""
    return {layer: {k: tuple(t.shape) for k, t in held.items()} for layer, held in adapter_tensors(values).items()}


def _check_values(model: nn.Module, matches: list[Match], values: Mapping[str, torch.Tensor], cfg: LoraConfig) -> None:
    """Refuse, before any change, values that miss a matched layer's A or B or name nothing in the model."""
    given = _given_shapes(values)
    lora = {
        f"{m.name}.{key}"
        for m in matches
        for key in adapter_shapes(base_layer(m.module), m.family, m.rank, cfg, given.get(m.name, {}))
    }
    missing, others = sorted(lora - set(values)), set(values) - lora
    unknown = sorted(others - set(original_parameters(model)) - set(original_buffers(model))) if others else []
    if missing or unknown:
        raise AdapterError(f"adapter values: missing {missing[:10]}, naming no tensor of the model {unknown[:10]}")


def _copy_in(model: nn.Module, adapters: list[tuple[str, Adapter]], values: Mapping[str, torch.Tensor]) -> None:
    """Copy ``values`` into the new adapters' tensors and the model's parameters and buffers."""
    tensors: dict[str, torch.Tensor] = {}
    for name, adapter in adapters:
        tensors.update({f"{name}.{key}": t for key, t in adapter.tensors().items()})
    if set(values) - set(tensors):  # trained modules, biases or buffers too: find them by their original names
        tensors.update({**original_parameters(model), **original_buffers(model), **tensors})
    with torch.no_grad():
        for key, value in values.items():
            tensors[key].copy_(value)


def mark_trainable(model: nn.Module, adapter_name: str) -> None:
    """Freeze everything except adapter ``adapter_name`` and its ``trainable`` modules and biases."""
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in lora_layers(model):
        if adapter_name in layer.adapters:
            layer.adapter(adapter_name).requires_grad_(True)
    for tensor in extra_parameters(model, adapter_name).values():
        tensor.requires_grad_(True)


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
    cfg = check_new_adapter(model, cfg, adapter_name)
    matches = match_targets(model, cfg, adapter_name=adapter_name, example_input=example_input)
    warn_ranks(matches, cfg)
    attach(model, matches, cfg, adapter_name, generator=generator)
    return model
