"""The contract between the training loop and a task: what a task builds (:class:`Built`), what it
gets back once accelerate has prepared it (:class:`Prepared`), where a run is (:class:`RunState`),
and the hooks it implements (:class:`Task`). :func:`visionlora.train.loop.run_loop` runs it."""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionlora.config import is_finite_number
from visionlora.errors import AdapterFileError
from visionlora.train.data import EpochBatches
from visionlora.train.optim import param_groups
from visionlora.train.outputs import Outputs

__all__ = ["Built", "Prepared", "RunState", "Task"]


@dataclass
class RunState:
    """Where a run is and what it has logged: saved in every checkpoint, restored on resume."""

    step: int = 0
    """Optimizer steps applied (a step skipped for NaN/Inf does not count)."""
    epoch: int = 0
    batch: int = 0
    """Batches of ``epoch`` already consumed."""
    elapsed: float = 0.0
    """Seconds spent training, as of the last checkpoint."""
    losses: list[float] = field(default_factory=list)
    """The loss of each applied step, averaged over processes."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One entry per epoch that a task validated after (``task.after_epoch``)."""
    ranks: dict[str, Any] = field(default_factory=dict)
    """The rank in use of each adapter a rank schedule grows: part -> adapter -> layer -> rank ({} without)."""

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], where: Path) -> RunState:
        """The run state a checkpoint's ``state.json`` holds.

        Raises:
            AdapterFileError: an entry is missing or of the wrong type.
        """
        checks = {
            "step": lambda v: isinstance(v, int) and v >= 0,
            "epoch": lambda v: isinstance(v, int) and v >= 0,
            "batch": lambda v: isinstance(v, int) and v >= 0,
            "elapsed": lambda v: is_finite_number(v) and v >= 0,
            "losses": lambda v: isinstance(v, list) and all(is_finite_number(x) for x in v),
            "history": lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
        }
        state = {"ranks": {}, **state}  # written since rank schedules came; {} before
        checks["ranks"] = _is_ranks
        bad = [k for k, ok in checks.items() if k not in state or isinstance(state[k], bool) or not ok(state[k])]
        if bad:
            raise AdapterFileError(f"{where}/state.json: entries {bad} are missing or not what a run writes")
        return cls(**{f.name: state[f.name] for f in fields(cls)})


def _is_ranks(value: Any) -> bool:
    """Whether ``value`` is part -> adapter -> layer -> rank (positive ints)."""

    def nested(v: Any, depth: int) -> bool:
        if depth == 0:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1
        return isinstance(v, dict) and all(isinstance(k, str) and nested(x, depth - 1) for k, x in v.items())

    return nested(value, 3)


@dataclass
class Built:
    """A task's models and data, built and adapted but not yet prepared by accelerate."""

    parts: dict[str, nn.Module]
    """Each adapted model by part name, the main one first (``model``; or ``unet``, ``text_encoder``).
    Checkpoints hold their trained tensors and the run's results are written from them."""
    batches: EpochBatches
    """The order of the global batches (each process takes its share)."""
    loaders: list[Any] = field(default_factory=list)
    """DataLoaders accelerate splits over the processes (with ``batches`` as the first's batch sampler)."""
    runs: nn.Module | None = None
    """What runs in place of the main part, e.g. its layers after a cached frozen prefix."""
    kept: dict[str, nn.Module] = field(default_factory=dict)
    """State beside the models that checkpoints hold and resume restores (an EMA of the weights, the
    best epoch's weights), as persistent buffers; names must differ from the parts'."""
    sections: dict[str, str] = field(default_factory=dict)
    """The recipe section that configures each part's adapter, where it is not the part's name (errors name it)."""

    def models(self) -> list[nn.Module]:
        """The models that train, as they run: the main one (or ``runs``) first."""
        first, *others = self.parts.values()
        return [self.runs if self.runs is not None else first, *others]


@dataclass
class Prepared:
    """The run as accelerate prepared it; what a task's loss and hooks work with."""

    accelerator: Any
    out_dir: Path
    models: list[nn.Module]
    """:meth:`Built.models` as accelerate wrapped them (DDP, FSDP), in the same order."""
    loaders: list[Any]
    optimizer: Any
    scheduler: Any
    params: list[nn.Parameter]
    """Every parameter that trains."""
    synced: list[nn.Module]
    """The wrapped models whose gradients accelerate syncs (``no_sync`` while accumulating)."""
    averaged: list[torch.Tensor]
    """Parameters no wrapper syncs: their gradients are averaged over processes at each step."""
    batches: EpochBatches
    per_epoch: int
    """Batches in a whole epoch."""
    total: int
    """Optimizer steps of the whole run."""


class Task(abc.ABC):
    """What one kind of training run supplies to :func:`run_loop`; the recipe's ``train`` and
    ``output`` sections (and ``data.batch_size``, the global batch) are the loop's, everything else
    is the task's."""

    def __init__(self, recipe: Any) -> None:
        self.recipe = recipe

    @abc.abstractmethod
    def build(self, accelerator: Any) -> Built:
        """Load the model(s) and data and add the adapters (after the run is seeded)."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """AdamW groups of ``model``'s trained parameters (default: LoRA at ``train.lr``, the rest at ``head_lr``)."""
        return param_groups(model, self.recipe.train)

    def train_mode(self, run: Prepared) -> None:
        """Put the models in training mode at the start of an epoch (a task may keep some parts in eval mode)."""
        for model in run.models:
            model.train()

    def should_stop(self, state: RunState) -> bool:
        """Whether to end the run after the epoch ``state.history`` ends with (early stopping)."""
        return False

    @abc.abstractmethod
    def batches(self, run: Prepared, epoch: int) -> Iterable[Any]:
        """The batches of ``epoch`` (``run.batches`` is already positioned after those done)."""

    @abc.abstractmethod
    def loss(self, run: Prepared, batch: Any, epoch: int) -> torch.Tensor:
        """This process's loss on its share of ``batch`` (a scalar that backward runs from)."""

    def after_step(self, run: Prepared, state: RunState) -> None:  # noqa: B027 (optional hook)
        """Called after each applied optimizer step (e.g. sample grids every N steps)."""

    def after_epoch(self, run: Prepared, state: RunState) -> dict[str, Any] | None:
        """Called at the end of each epoch; an entry returned goes into ``state.history`` and the logs."""
        return None

    @abc.abstractmethod
    def finish(self, run: Prepared, state: RunState) -> Outputs:
        """The task's own metrics, report plots and merged-checkpoint target, after the last step."""
