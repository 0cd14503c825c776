"""Split an adapted model into its frozen prefix and its trainable rest.

When adapters sit only in the last blocks, everything before the first trainable block computes
the same features for an image at every step (with augmentation off and the prefix in eval mode).
:func:`split_frozen_prefix` cuts the model there, so a training loop can compute those features
once and train the rest on them:

    x ──▶ prefix (frozen, eval mode, no autograd) ──▶ features ──▶ rest (adapters, head) ──▶ logits

The cut is found by tracing the model's forward with ``torch.fx`` at block granularity: the root's
forward and every ``nn.Sequential``/``nn.ModuleList`` are traced through, every other module is one
call. A call belongs to the prefix when it depends on the input only through other prefix calls and
its module holds no trainable parameter. The prefix must hand exactly one tensor to the rest.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from visionlora.errors import ConfigError

__all__ = ["FrozenSplit", "frozen_batchnorms", "recalibrate_batchnorm", "split_frozen_prefix"]


@dataclass
class FrozenSplit:
    """``rest(prefix(x)) == model(x)`` with the prefix in eval mode; both share the model's modules."""

    prefix: nn.Module
    """Input to features; holds no trainable parameter. Run it in eval mode under ``torch.no_grad``."""
    rest: nn.Module
    """Features to output; holds every trainable parameter the forward uses."""
    boundary: str
    """The traced name of the value handed from prefix to rest (e.g. ``layer3_1``)."""
    prefix_calls: int
    """How many traced calls (blocks, functions) moved into the prefix."""

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The prefix's output for ``x``, computed in eval mode (BatchNorm on running statistics, no dropout)."""
        was_training = self.prefix.training
        self.prefix.eval()
        try:
            out = self.prefix(x)
        finally:
            self.prefix.train(was_training)
        if not isinstance(out, torch.Tensor):
            raise ConfigError(f"data.cache_features: the frozen prefix returns {type(out).__name__}, not a tensor")
        return out

    @torch.no_grad()
    def recalibrate_batchnorm(self, batches: Iterable[torch.Tensor]) -> int:
        """Re-estimate the prefix's BatchNorm running statistics on ``batches``; return how many layers.

        Each statistic becomes the average over all batches (as AdaBN does), which is where an
        uncached run's running statistics drift to when it trains on the same images. Use it before
        :meth:`features` when the images differ from what the network was trained on.
        """
        return recalibrate_batchnorm(self.prefix, batches)


def frozen_batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """``model``'s BatchNorm layers that keep running statistics and have no trainable parameter."""
    return [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and not any(p.requires_grad for p in m.parameters())
    ]


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate the running statistics of ``model``'s frozen BatchNorms (:func:`frozen_batchnorms`)
    as their average over ``batches`` (AdaBN), with every other layer in eval mode and no autograd;
    return how many layers. Each layer's mode and momentum are restored afterwards."""
    norms = frozen_batchnorms(model)
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        for module, mode in modes.items():
            module.train(mode)
    return len(norms)


class _BlockTracer(fx.Tracer):
    """Traces the root and containers; every other module is a single call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _is_frozen(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return not _trainable(root.get_submodule(str(node.target)))
    if node.op == "get_attr":
        value = _attr(root, str(node.target))
        return not (isinstance(value, torch.Tensor) and value.requires_grad)
    return node.op in ("call_function", "call_method")


def _attr(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _defaults(model: nn.Module) -> dict[str, Any]:
    """Optional forward arguments (masks, flags) fixed at their defaults, so only the image is traced."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _copy(nodes: list[fx.Node], graph: fx.Graph, env: dict[fx.Node, fx.Node]) -> None:
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])


def split_frozen_prefix(model: nn.Module) -> FrozenSplit:
    """Cut ``model`` after its longest frozen prefix (see the module docstring).

    Raises:
        ConfigError: if the forward cannot be traced, nothing before the first trainable block is
            frozen, nothing is trainable, or the prefix hands more than one value to the rest.
    """
    name = type(model).__name__
    try:
        graph = _BlockTracer().trace(model, concrete_args=_defaults(model))
    except Exception as exc:  # fx raises many types on untraceable Python control flow
        raise ConfigError(
            f"data.cache_features: {name}'s forward cannot be traced by torch.fx at block level ({exc}); "
            "set data.cache_features: false"
        ) from None
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"][:1]
    fixed = {n for n in nodes if n.op == "placeholder"} - set(inputs)  # defaults, checked by asserts
    for node in nodes:
        if node.op != "placeholder" and node.all_input_nodes and all(s in fixed for s in node.all_input_nodes):
            fixed.add(node)
    if not inputs or any(u not in fixed for n in fixed for u in n.users):
        raise ConfigError(f"data.cache_features: {name}'s forward needs more than one image batch as input")
    nodes = [n for n in nodes if n not in fixed]
    prefix: set[fx.Node] = set(inputs)
    for node in nodes:
        if node.op in ("placeholder", "output"):
            continue
        sources = node.all_input_nodes
        from_input = any(s in prefix for s in sources)
        if from_input and _is_frozen(node, model) and all(s in prefix or s.op == "get_attr" for s in sources):
            prefix.add(node)
    handed = [n for n in nodes if n in prefix and any(u not in prefix for u in n.users)]
    if any(u.op == "output" for n in handed for u in n.users):
        raise ConfigError(f"data.cache_features: {name} has no trainable parameter after its frozen layers")
    if handed == inputs:
        raise ConfigError(
            f"data.cache_features: {name}'s first block is already trainable, so there is no frozen prefix to cache"
        )
    if len(handed) != 1:
        names = ", ".join(n.name for n in handed)
        raise ConfigError(
            f"data.cache_features: {name}'s frozen prefix hands {len(handed)} values to the trainable layers "
            f"({names}); only a single feature tensor can be cached"
        )
    cut = handed[0]
    head_nodes = [n for n in nodes if n in prefix or (n.op == "get_attr" and any(u in prefix for u in n.users))]
    first: fx.Graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    _copy(head_nodes, first, env)
    first.output(env[cut])

    second: fx.Graph = fx.Graph()
    env = {cut: second.placeholder(cut.name)}
    _copy([n for n in nodes if n not in prefix], second, env)
    calls = sum(1 for n in prefix if n.op != "placeholder")
    return FrozenSplit(fx.GraphModule(model, first), fx.GraphModule(model, second), cut.name, calls)
