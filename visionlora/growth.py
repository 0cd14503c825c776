"""Rank schedules: adapters that start at a low rank and grow to their own while training.

An adapter made with ``LoraConfig.rank_schedule`` holds A and B at its final rank from the start.
While the schedule holds it at a lower rank r', forward, ΔW and merge use A's first r' rows and B's
first r' columns only (:meth:`~visionlora.branches.LoraAdapter.live_factors`); the rest take part
in nothing, so their gradients are exactly zero, and therefore:

- B's held-back columns stay zero (B starts at zero; a zero gradient gives zero Adam moments and a
  zero update, and weight decay keeps zero at zero): growing changes no output at the step it happens;
- A's held-back rows keep the values drawn with the rest of A when the adapter was made (AdamW's
  decoupled weight decay, which scales every row of A alike, aside);
- their optimizer moments stay exactly zero, under the parameter's own step count.

Growing from r' to r'' is thus the same as appending r'' − r' rows to A (initialised as A was) and
zero columns to B, with zero moments and the same step count for the new slices, while nothing
changes shape: the optimizer, the LR schedule, DDP's buckets and FSDP's shards stay as they are,
and a checkpoint holds the tensors at their final shape. The training loop calls
:func:`grow_ranks` after every optimizer step and :func:`end_schedules` before writing its
outputs; files hold each adapter at its final rank (B's columns beyond the rank reached are
zero), with the schedule in the native file's config.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from visionlora.branches import Adapter, LoraAdapter
from visionlora.config import schedule_in_fractions
from visionlora.errors import AdapterError, ConfigError
from visionlora.state import lora_layers

__all__ = [
    "check_schedules",
    "current_ranks",
    "end_schedules",
    "first_difference",
    "grow_ranks",
    "rank_plan",
    "schedule_steps",
    "scheduled_rank",
    "start_schedule",
]

Ranks = dict[str, dict[str, int]]
"""Ranks of scheduled adapters: adapter name -> layer name -> rank."""


def schedule_steps(schedule: Mapping[float, int], total_steps: int | None = None) -> list[tuple[int, int]]:
    """A schedule's (step, rank) pairs in step order; a fraction f of the run becomes step ⌊f · total_steps⌋.

    Raises:
        ConfigError: the schedule is in fractions and ``total_steps`` is not given.

    Example:
        >>> schedule_steps({0: 2, 0.5: 16}, total_steps=300)
        [(0, 2), (150, 16)]
    """
    if not schedule_in_fractions(schedule):
        return sorted((int(k), r) for k, r in schedule.items())
    if total_steps is None:
        raise ConfigError(
            f"rank_schedule {dict(schedule)}: in fractions of the run, so the run's length is needed (total_steps)"
        )
    return sorted((math.floor(k * total_steps + 1e-9), r) for k, r in schedule.items())


def scheduled_rank(schedule: Mapping[float, int], rank: int, step: int, total_steps: int | None = None) -> int:
    """The rank an adapter of final rank ``rank`` has after ``step`` optimizer steps under ``schedule``:
    the entry of the last key reached, capped at ``rank``.

    Example:
        >>> scheduled_rank({0: 2, 500: 8, 1000: 16}, rank=4, step=600)
        4
    """
    reached = [r for s, r in schedule_steps(schedule, total_steps) if s <= step]
    return min(reached[-1], rank)


def start_schedule(adapter: Adapter, schedule: Mapping[float, int], layer: str) -> None:
    """Give a new adapter ``schedule`` (if any), held at its rank at step 0.

    Raises:
        ConfigError: the schedule ends below the adapter's rank, so the layer would never reach it.
    """
    if not schedule:
        return
    last = schedule[max(schedule)]
    if not isinstance(adapter, LoraAdapter) or adapter.rank > last:
        what = f"rank {adapter.rank}" if isinstance(adapter, LoraAdapter) else f"{adapter.family} adapter"
        raise ConfigError(
            f"rank_schedule ends at rank {last}, and {layer} has {what}: end the schedule at the largest rank of "
            "any layer or above (each layer stops at its own rank)"
        )
    adapter.schedule = dict(schedule)
    _hold(adapter, min(schedule[0], adapter.rank))


def _hold(adapter: LoraAdapter, rank: int) -> None:
    adapter.held_rank = None if rank >= adapter.rank else rank


def _scheduled(model: nn.Module) -> Iterator[tuple[str, str, LoraAdapter]]:
    """(layer, adapter name, adapter) of every adapter with a rank schedule."""
    for name, layer in lora_layers(model):
        for adapter_name in layer.adapters:
            adapter = layer.adapter(adapter_name)
            if isinstance(adapter, LoraAdapter) and adapter.schedule:
                yield name, adapter_name, adapter


def current_ranks(model: nn.Module) -> Ranks:
    """The rank in use of every adapter with a rank schedule: adapter name -> layer -> rank ({} without schedules)."""
    ranks: Ranks = {}
    for name, adapter_name, adapter in _scheduled(model):
        ranks.setdefault(adapter_name, {})[name] = adapter.current_rank
    return ranks


def rank_plan(model: nn.Module, step: int, total_steps: int | None = None) -> Ranks:
    """The ranks :func:`grow_ranks` gives ``model``'s scheduled adapters at ``step`` (nothing changes)."""
    ranks: Ranks = {}
    for name, adapter_name, adapter in _scheduled(model):
        ranks.setdefault(adapter_name, {})[name] = scheduled_rank(adapter.schedule, adapter.rank, step, total_steps)
    return ranks


def grow_ranks(model: nn.Module, step: int, *, total_steps: int | None = None) -> Ranks:
    """Grow every scheduled adapter of ``model`` to its rank after ``step`` optimizer steps; return the
    ones that grew (adapter name -> layer -> new rank).

    Call it after each optimizer step (the training loop does), with ``total_steps`` when the
    schedule is in fractions of the run. Outputs are unchanged by it and nothing is reallocated;
    the next step trains the new rank components.

    Raises:
        AdapterError: ``step`` is earlier than the ranks already reached (ranks never shrink; see
            :func:`~visionlora.extract.resize_adapter`).
        ConfigError: a schedule in fractions without ``total_steps``.

    Example:
        >>> model = vl.apply_lora(net, vl.LoraConfig(targets="layer4.*", rank=16, rank_schedule={0: 2, 500: 16}))
        >>> vl.grow_ranks(model, 500)  # {"default": {"layer4.0.conv1": 16, ...}}
    """
    planned = [  # one walk of the model: this runs after every optimizer step
        (name, adapter_name, adapter, scheduled_rank(adapter.schedule, adapter.rank, step, total_steps))
        for name, adapter_name, adapter in _scheduled(model)
    ]
    for name, adapter_name, adapter, rank in planned:
        if rank < adapter.current_rank:
            raise AdapterError(
                f"grow_ranks: {name} ({adapter_name}) is at rank {adapter.current_rank}, and step {step} of its "
                f"schedule gives {rank}; ranks never shrink (resize_adapter cuts an adapter down)"
            )
    grown: Ranks = {}
    for name, adapter_name, adapter, rank in planned:
        if rank != adapter.current_rank:
            _hold(adapter, rank)
            grown.setdefault(adapter_name, {})[name] = rank
    return grown


def check_schedules(model: nn.Module, total_steps: int) -> None:
    """Refuse a schedule that names a step a run of ``total_steps`` optimizer steps never reaches (its
    rank components would never train, yet files would hold them).

    Raises:
        ConfigError: naming the step, the rank and the run's length.
    """
    for name, _, adapter in _scheduled(model):
        late = [(s, r) for s, r in schedule_steps(adapter.schedule, total_steps) if s >= total_steps]
        if late:
            step, rank = late[0]
            raise ConfigError(
                f"rank_schedule {adapter.schedule}: grows {name} to rank {rank} at step {step}, and the run has "
                f"{total_steps} optimizer steps; name steps before the last (or fractions of the run)"
            )


def first_difference(found: Ranks, expected: Ranks) -> str:
    """The first adapter and layer whose ranks differ between two :data:`Ranks` records, in words."""
    for adapter in sorted({*found, *expected}):
        a, b = found.get(adapter, {}), expected.get(adapter, {})
        for layer in sorted({*a, *b}):
            if a.get(layer) != b.get(layer):
                return f"{layer} ({adapter}) at rank {a.get(layer, 'none')}, expected {b.get(layer, 'none')}"
    return "none"


def end_schedules(model: nn.Module) -> None:
    """Put every scheduled adapter at its final rank and drop its schedule: the plain adapter that files
    and merged checkpoints hold. Outputs are unchanged, as B's held-back columns are zero.

    Raises:
        AdapterError: B's held-back columns of some adapter are not zero (written from outside), so
            ending its schedule would change the outputs; nothing is changed.
    """
    held = list(_scheduled(model))
    for name, adapter_name, adapter in held:
        rank = adapter.held_rank
        if rank is not None and _nonzero(adapter.lora_B.detach(), rank):
            raise AdapterError(
                f"{name} ({adapter_name}): B's columns beyond rank {rank}, held back by the rank schedule, are not "
                "zero; they were written from outside the schedule, and the adapter at its full rank would differ"
            )
    for _, _, adapter in held:
        adapter.held_rank, adapter.schedule = None, {}


def _nonzero(b: torch.Tensor, rank: int) -> bool:
    local = b.to_local() if hasattr(b, "to_local") else b  # an FSDP shard holds all of B's columns
    return bool(local[:, rank:].count_nonzero().item())
