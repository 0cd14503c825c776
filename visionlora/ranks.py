"""Per-layer rank and alpha allocation: explicit patterns, feature-map resolution, parameter budgets.

Ranks, for each targeted layer, by precedence:

1. ``rank_pattern``: a key equal to the layer's full name, else the first key (in the order
   written) whose pattern matches it;
2. ``rank_by_resolution``: the rank of the largest threshold <= the layer's resolution;
3. ``rank_budget``: the budget left after the layers fixed by step 1 is spread over the others,
   proportionally to resolution (evenly without a probe), each rank rounded down, at least 1 and
   at most what the layer can use, so the total never exceeds the budget;
4. ``rank``.

Alphas: ``alpha_pattern`` with the precedence of step 1, else ``alpha``.

A layer's *resolution* is min(spatial size) of the feature map it works on, measured by one probe
forward pass (:func:`probe_resolutions`):

- a conv: min(H, W) of its output;
- a Linear, from its own input: a vector (B, C), such as a classifier after pooling, is 1; a
  channels-last map (B, H, W, C), such as a ConvNeXt MLP, is min(H, W); tokens (B, N, C) take
  min(H, W) of the feature map, (B, C, H, W), entering the nearest enclosing module (below the
  model itself) that receives one. An attention block at a 64×64 latent is 64, cross-attention's
  to_k / to_v included, although their own inputs are text tokens. Tokens with no such module
  above them are floor(sqrt(N)) (patch tokens on a square grid: a ViT-B/16 at 224 px is 14).

A pattern key that selects none of the targeted layers is an error (it is almost always a typo).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import torch
from torch import nn

from visionlora.branches import param_count
from visionlora.config import Family, LoraConfig, pattern_matches
from visionlora.errors import ConfigError, TargetError
from visionlora.lora_math import AdaptableLayer, max_useful_rank

__all__ = ["allocate", "budget_ranks", "pattern_value", "probe_resolutions", "rank_for_resolution"]

V = TypeVar("V", int, float, str)


def pattern_value(name: str, patterns: Mapping[str, V], default: V) -> V:
    """The value for module ``name``: exact key, else first matching pattern, else ``default``.

    Example:
        >>> pattern_value("layer4.0.conv1", {"layer4.*": 8, "layer4.0.conv1": 16}, 4)
        16
    """
    if name in patterns:
        return patterns[name]
    for pattern, value in patterns.items():
        if pattern_matches(pattern, name):
            return value
    return default


def rank_for_resolution(resolution: int, thresholds: Mapping[int, int], default: int) -> int:
    """The rank of the largest threshold <= ``resolution``, or ``default`` below every threshold.

    Example:
        >>> rank_for_resolution(56, {32: 16, 0: 4}, 8), rank_for_resolution(7, {32: 16}, 8)
        (16, 8)
    """
    below = [t for t in thresholds if t <= resolution]
    return thresholds[max(below)] if below else default


def budget_ranks(
    costs: Mapping[str, Callable[[int], int]], weights: Mapping[str, float], caps: Mapping[str, int], budget: int
) -> dict[str, int]:
    """Ranks r_i = clamp(floor(t · w_i), 1, cap_i) with the largest t such that Σ cost_i(r_i) <= budget.

    Args:
        costs: The parameters each layer's adapter has at a given rank (r · (A and B per rank) for
            LoRA; see :func:`visionlora.branches.param_count` for the other families).
        weights: Positive weights (resolutions, or 1 for an even spread).
        caps: Largest useful rank of each layer.
        budget: Total parameters allowed.

    Raises:
        ConfigError: if rank 1 everywhere already exceeds the budget.
    """
    floor_cost = sum(c(1) for c in costs.values())
    if floor_cost > budget:
        raise ConfigError(
            f"rank_budget: {budget} parameters are fewer than the {floor_cost} that rank 1 on every target needs"
        )

    def ranks(t: float) -> dict[str, int]:
        return {n: max(1, min(caps[n], math.floor(t * weights[n]))) for n in costs}

    def cost(r: Mapping[str, int]) -> int:
        return sum(costs[n](r[n]) for n in costs)

    lo, hi = 0.0, max(caps.values()) / min(weights.values()) + 1.0
    for _ in range(64):  # cost(ranks(t)) is monotone in t: bisect for the largest affordable t
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(ranks(mid)) <= budget else (lo, mid)
    return ranks(lo)


def _feature_map_size(values: Sequence[Any]) -> int | None:
    """min(spatial size) of the first feature map, (B, C, H, W) or (B, C, D, H, W), among ``values``."""
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() >= 4:
            return min(value.shape[2:])
    return None


def _call(model: nn.Module, example_input: Any) -> None:
    if isinstance(example_input, Mapping):
        model(**example_input)
    elif isinstance(example_input, tuple):
        model(*example_input)
    else:
        model(example_input)


def probe_resolutions(
    model: nn.Module,
    layers: Mapping[str, AdaptableLayer],
    example_input: Any,
    *,
    modules: Mapping[str, nn.Module] | None = None,
) -> dict[str, int]:
    """The resolution of each of ``layers`` (name -> base layer), by one forward pass on ``example_input``.

    ``modules`` gives the module to observe for a name when it is not the base layer itself (a LoRA
    layer already wrapping it).

    ``example_input`` is a tensor, a tuple of positional arguments or a dict of keyword arguments.
    The pass runs in eval mode without gradients; training flags are restored and hooks removed,
    so parameters, buffers (BatchNorm statistics) and modes are exactly as before.

    Raises:
        TargetError: if a layer did not run during the pass.
        ConfigError: if the model's forward rejects ``example_input`` (the model is left as it was).
    """
    ran: dict[str, int] = {}  # conv -> resolution; Linear -> from its input (tokens: the fallback)
    tokens: set[str] = set()  # Linears that ran on tokens: their block's feature map decides
    maps: dict[str, int] = {}  # enclosing module -> size of the feature map it received

    def keep_largest(store: dict[str, int], name: str, size: int | None) -> None:
        if size is not None:  # a module run at several sizes keeps the largest
            store[name] = max(store.get(name, 0), size)

    def on_layer_output(name: str, is_conv: bool) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if is_conv:
                size = min(output.shape[2:]) if output.dim() >= 3 else 1
            elif x is not None and x.dim() == 3:  # tokens (B, N, C): a square grid unless a block says otherwise
                tokens.add(name)
                size = math.isqrt(x.shape[1])
            elif x is not None and x.dim() >= 4:  # channels-last map (B, H, W, C)
                size = min(x.shape[1:-1])
            else:  # a vector
                size = 1
            keep_largest(ran, name, size)

        return hook

    def on_block_input(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            keep_largest(maps, name, _feature_map_size([*args, *kwargs.values()]))

        return hook

    named = dict(model.named_modules())
    observed = {n: (modules or {}).get(n, layer) for n, layer in layers.items()}
    linears = [n for n, m in layers.items() if isinstance(m, nn.Linear)]
    handles = [observed[n].register_forward_hook(on_layer_output(n, n not in linears)) for n in layers]
    enclosing = {a for n in linears for a in _ancestors(n) if a}  # not the model itself: it takes the image
    handles += [named[a].register_forward_pre_hook(on_block_input(a), with_kwargs=True) for a in enclosing]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            _call(model, example_input)
    except Exception as exc:  # the model's own code rejected example_input
        raise ConfigError(
            f"example_input: the probe forward pass of {type(model).__name__} failed "
            f"({type(exc).__name__}: {exc}); give an input the model accepts"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    missing = [n for n in layers if n not in ran]
    if missing:
        raise TargetError(f"these layers did not run during the probe forward pass: {', '.join(missing[:5])}")
    out = {n: ran[n] for n in layers if n not in linears}
    for name in linears:
        block = next((maps[a] for a in _ancestors(name) if a in maps), None) if name in tokens else None
        out[name] = ran[name] if block is None else block
    return out


def _ancestors(name: str) -> list[str]:
    """Enclosing module names, nearest first, ending with the root ''."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]


def allocate(
    layers: Mapping[str, AdaptableLayer],
    cfg: LoraConfig,
    resolutions: Mapping[str, int] | None = None,
) -> dict[str, tuple[int, float, Family]]:
    """Rank, alpha and family for each targeted layer (name -> base layer), by the precedence in this
    module's docstring (families by ``family_pattern`` as alphas by ``alpha_pattern``).

    Raises:
        TargetError: if a ``rank_pattern`` or ``alpha_pattern`` key selects none of the layers.
        ConfigError: if ``rank_by_resolution`` is set without resolutions, or the budget is too small.
    """
    names: Sequence[str] = list(layers)
    patterns_of: tuple[tuple[str, Mapping[str, Any]], ...] = (
        ("rank_pattern", cfg.rank_pattern),
        ("alpha_pattern", cfg.alpha_pattern),
        ("family_pattern", cfg.family_pattern),
    )
    for field_name, patterns in patterns_of:
        for pattern in patterns:
            if not any(pattern_matches(pattern, n) for n in names):
                raise TargetError(
                    f"{field_name} key {pattern!r} selects none of the {len(names)} targeted layers "
                    f"(e.g. {', '.join(list(names)[:3])})"
                )
    if cfg.rank_by_resolution and resolutions is None:
        raise ConfigError(
            "rank_by_resolution needs the feature-map size of each layer: pass example_input= to apply_lora "
            "(a tensor, a tuple of positional arguments or a dict of keyword arguments)"
        )
    families = {n: cast(Family, pattern_value(n, cfg.family_pattern, cfg.family)) for n in names}
    fixed = {n for n in names if n in cfg.rank_pattern or any(pattern_matches(p, n) for p in cfg.rank_pattern)}
    ranks = {n: pattern_value(n, cfg.rank_pattern, cfg.rank) for n in names}
    free = [n for n in names if n not in fixed]
    if cfg.rank_by_resolution and resolutions is not None:
        ranks.update({n: rank_for_resolution(resolutions[n], cfg.rank_by_resolution, cfg.rank) for n in free})
    elif cfg.rank_budget is not None:
        costs = {n: functools.partial(param_count, layers[n], families[n], cfg=cfg) for n in names}
        spent = sum(costs[n](ranks[n]) for n in fixed)
        floor = sum(costs[n](1) for n in free)
        if spent + floor > cfg.rank_budget:
            raise ConfigError(
                f"rank_budget: {cfg.rank_budget} parameters are fewer than the {spent} that rank_pattern's ranks "
                f"take plus the {floor} that rank 1 on the other targets needs"
            )
        if free:
            weights = {n: float(max(resolutions[n], 1)) if resolutions else 1.0 for n in free}
            caps = {n: max_useful_rank(layers[n], cfg.conv_groups) for n in free}
            ranks.update(budget_ranks({n: costs[n] for n in free}, weights, caps, cfg.rank_budget - spent))
    return {n: (ranks[n], pattern_value(n, cfg.alpha_pattern, cfg.alpha), families[n]) for n in names}
