"""The one training loop every task runs: accumulation, clipping, NaN/Inf skipping, logging,
checkpoints, resume and the output folder's lock.

A task (:class:`Task`; the classifier and style tasks today) supplies only what differs: what it
builds (models with adapters, data, the batch order), the loss of a batch, what happens after a
step or an epoch (samples, validation), and what its results are. :func:`run_loop` does the rest:

1. take the output folder (:func:`~visionlora.train.lock.claim_output`), make the accelerator, seed;
2. ``task.build`` the models; give them one AdamW (LoRA parameters at ``train.lr``, the rest at
   ``train.head_lr``) and the cosine schedule, and ``accelerator.prepare`` them;
3. resume from a checkpoint if asked (:class:`RunState` says where the run was);
4. per batch: ``task.loss`` and backward (gradients accumulate over ``train.grad_accum`` batches);
   per group, one :func:`~visionlora.train.optim.optimizer_step`, skipped if NaN/Inf; a checkpoint
   every ``train.checkpoint_every`` steps; per epoch, ``task.after_epoch``;
5. ``task.finish``, then :func:`~visionlora.train.outputs.write_outputs` writes adapter, merged
   checkpoint, exports, metrics and report.
"""

from __future__ import annotations

import abc
import contextlib
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionlora._deps import require
from visionlora.config import is_finite_number
from visionlora.errors import AdapterFileError, ConfigError
from visionlora.io.files import write_text
from visionlora.train.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from visionlora.train.data import EpochBatches
from visionlora.train.lock import claim_output
from visionlora.train.optim import (
    NonFiniteSteps,
    accumulation,
    cosine_with_warmup,
    optimizer_step,
    param_groups,
    total_steps,
)
from visionlora.train.outputs import Outputs, check_outputs, write_outputs
from visionlora.train.recipe import dump_recipe
from visionlora.train.sharding import check_fsdp, is_fsdp, keep_whole, whole_model

__all__ = ["Built", "Prepared", "RunState", "Task", "is_main_process", "make_accelerator", "run_loop"]


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
        bad = [k for k, ok in checks.items() if k not in state or isinstance(state[k], bool) or not ok(state[k])]
        if bad:
            raise AdapterFileError(f"{where}/state.json: entries {bad} are missing or not what a run writes")
        return cls(**{f.name: state[f.name] for f in fields(cls)})


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


class Task(abc.ABC):
    """What one kind of training run supplies to :func:`run_loop`; the recipe's ``train`` and
    ``output`` sections are the loop's, everything else is the task's."""

    def __init__(self, recipe: Any) -> None:
        self.recipe = recipe

    @abc.abstractmethod
    def build(self, accelerator: Any) -> Built:
        """Load the model(s) and data and add the adapters (after the run is seeded)."""

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


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _cpu_only() -> bool:
    # Without cpu=True accelerate ignores torchrun's processes on a CPU machine.
    return not torch.cuda.is_available()


def is_main_process() -> bool:
    """Whether this is the main process of the (possibly multi-process) run, before any Accelerator exists."""
    return bool(require("accelerate").PartialState(cpu=_cpu_only()).is_main_process)


def make_accelerator(train: Any, out_dir: Path) -> Any:
    """The run's Accelerator: mixed precision as ``train`` says, batches split (not repeated) over processes."""
    accelerate = require("accelerate")
    return accelerate.Accelerator(
        cpu=_cpu_only(),
        mixed_precision=_mixed_precision(train.mixed_precision),
        dataloader_config=require("accelerate.utils").DataLoaderConfiguration(split_batches=True),
        log_with=train.log_with,
        project_dir=str(out_dir),
    )


def run_loop(
    task: Task,
    *,
    output: str | Path | None = None,
    resume: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train ``task`` and write its results to ``output`` (default: the recipe's ``output.dir``).

    Returns the final metrics (also in ``metrics.json``). Runs unchanged under ``accelerate launch``.

    Raises:
        TrainingError: another run holds the folder, or too many steps in a row had NaN/Inf.
        ConfigError: the folder holds an earlier run and neither ``resume`` nor ``overwrite`` is
            given, or the recipe does not fit this set-up (batch size, processes, FSDP).
    """
    out_dir = Path(output or task.recipe.output.dir)
    with claim_output(out_dir, main=is_main_process(), resume=resume, overwrite=overwrite):
        return _train(task, out_dir, resume, progress)


def _train(task: Task, out_dir: Path, resume: str | None, progress: bool) -> dict[str, Any]:
    recipe, train = task.recipe, task.recipe.train
    accelerator = make_accelerator(train, out_dir)
    require("accelerate.utils").set_seed(train.seed)
    batch_size, world = recipe.data.batch_size, accelerator.num_processes
    if batch_size % world:
        raise ConfigError(f"data.batch_size: {batch_size} does not split over {world} processes")
    built = task.build(accelerator)
    check_outputs(recipe.output, built.parts)
    kept = keep_whole(accelerator, next(iter(built.parts.values())))
    run = _prepare(accelerator, built, train, out_dir)
    total = total_steps(train, math.ceil(run.per_epoch / train.grad_accum))
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        run.optimizer.optimizer, cosine_with_warmup(train.warmup_steps, total)
    )
    saved = _saved(built)
    state = RunState()
    if resume is not None:
        stateful = {"scheduler": run.scheduler, "scaler": accelerator.scaler}  # checked with the rest first
        folder = _resume_folder(resume, out_dir)
        loaded = load_checkpoint(
            folder, model=saved, optimizer=run.optimizer.optimizer, rank=accelerator.process_index, stateful=stateful
        )
        state = RunState.from_checkpoint(loaded, folder)
    bar = _start(accelerator, recipe, out_dir, total, state.step, progress)
    started = time.perf_counter() - state.elapsed
    guard = NonFiniteSteps(train.max_nonfinite_steps, out_dir)
    seen = 0
    while state.step < total:
        run.batches.set_position(state.epoch, state.batch)
        for model in run.models:
            model.train()
        group: list[torch.Tensor] = []
        for index, batch in enumerate(task.batches(run, state.epoch), start=state.batch):
            boundary, group_size = accumulation(index, run.per_epoch, train.grad_accum)
            with contextlib.ExitStack() as syncing:
                if not boundary:
                    for model in run.synced:
                        syncing.enter_context(accelerator.no_sync(model))
                loss = task.loss(run, batch, state.epoch)
                accelerator.backward(loss / group_size)
            group.append(loss.detach())
            seen += batch_size
            if not boundary:
                continue
            step_loss = optimizer_step(
                accelerator,
                run.optimizer,
                run.scheduler,
                run.params,
                train.max_grad_norm,
                group,
                guard,
                state.step + 1,
                run.averaged,
            )
            group = []
            if step_loss is None:  # a NaN/Inf loss or gradient: skipped and not counted (see NonFiniteSteps)
                continue
            state.step, state.batch = state.step + 1, index + 1
            state.losses.append(step_loss)
            _log_step(run, bar, train, state.step, step_loss, seen / max(time.perf_counter() - started, 1e-9))
            task.after_step(run, state)
            if train.checkpoint_every and state.step % train.checkpoint_every == 0 and state.step < total:
                state.elapsed = time.perf_counter() - started
                _write_checkpoint(run, out_dir, state, saved, train.keep_checkpoints)
            if state.step >= total:
                break
        state.batch = 0
        entry = task.after_epoch(run, state)
        if entry is not None:
            state.history.append(entry)
            if train.log_with:
                accelerator.log({k: v for k, v in entry.items() if k not in ("epoch", "step")}, step=state.step)
        state.epoch += 1
    bar.close()
    seconds = time.perf_counter() - started
    outputs = task.finish(run, state)  # samples from a sharded model run on every process, before it is gathered
    main, *others = built.parts.items()
    parts = {main[0]: whole_model(main[1], kept), **dict(others)}
    metrics = {
        "steps": state.step,
        "seconds": seconds,
        "processes": accelerator.num_processes,
        "distributed": str(accelerator.distributed_type.value),  # NO, MULTI_GPU, MULTI_CPU, FSDP, ...
        **outputs.metrics,
    }
    write_outputs(accelerator, out_dir, recipe.output, parts, outputs, metrics)
    if train.log_with:
        accelerator.end_training()
    return metrics


def _prepare(accelerator: Any, built: Built, train: Any, out_dir: Path) -> Prepared:
    """One AdamW over every model's groups, and ``accelerator.prepare`` (the scheduler comes after)."""
    models = built.models()
    check_fsdp(accelerator, models[0])
    groups = [param_groups(model, train) for model in models]
    averaged: list[torch.Tensor] = []
    if len(models) > 1 and is_fsdp(accelerator):
        # accelerate's FSDP2 shards one model per prepare, with an optimizer over that model only. The
        # main model is sharded; the others (a text encoder: small) stay whole on every process, their
        # groups join the optimizer afterwards and their gradients are averaged by hand, as DDP would.
        if accelerator.mixed_precision == "fp16":  # the grad scaler cannot unscale sharded and whole at once
            first, *others = built.parts
            raise ConfigError(
                f"train.mixed_precision: fp16 (or auto on a GPU without bf16) cannot train the {' and '.join(others)} "
                f"adapter beside the sharded {first} under FSDP; use bf16 or no, train under DDP (accelerate launch "
                "without --use_fsdp), or adapt the main model alone"
            )
        first, optimizer, *loaders = accelerator.prepare(models[0], torch.optim.AdamW(groups[0]), *built.loaders)
        for group in (g for model_groups in groups[1:] for g in model_groups):
            optimizer.optimizer.add_param_group(group)
        wrapped, synced = [first, *models[1:]], [first]
        averaged = [p for model in models[1:] for p in model.parameters() if p.requires_grad]
    else:
        optimizer = torch.optim.AdamW([g for model_groups in groups for g in model_groups])
        prepared = accelerator.prepare(*models, optimizer, *built.loaders)
        wrapped, optimizer, loaders = (
            list(prepared[: len(models)]),
            prepared[len(models)],
            list(prepared[len(models) + 1 :]),
        )
        synced = wrapped
    # After prepare: FSDP puts new (sharded) parameters in the modules, which are the ones that get gradients.
    params = [p for model in models for p in model.parameters() if p.requires_grad]
    per_epoch = len(built.batches)  # at position 0: a whole epoch
    return Prepared(
        accelerator, out_dir, wrapped, loaders, optimizer, None, params, synced, averaged, built.batches, per_epoch
    )


def _saved(built: Built) -> nn.Module:
    """What a checkpoint holds the trained tensors of: the one part, or all of them by part name."""
    return next(iter(built.parts.values())) if len(built.parts) == 1 else nn.ModuleDict(built.parts)


def _resume_folder(resume: str, out_dir: Path) -> Path:
    if resume == "latest":
        return latest_checkpoint(out_dir)
    path = Path(resume)
    if (path / "state.json").is_file():
        return path
    if (path / "checkpoints").is_dir():
        return latest_checkpoint(path)
    raise ConfigError(f"--resume {resume}: not 'latest', a run folder with checkpoints/, or a checkpoint folder")


def _start(accelerator: Any, recipe: Any, out_dir: Path, total: int, step: int, progress: bool) -> Any:
    """Write the resolved recipe, start the trackers, and return the progress bar (main process only)."""
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "recipe.yaml", dump_recipe(recipe))
    if recipe.train.log_with:
        accelerator.init_trackers("visionlora")
    tqdm = require("tqdm.auto").tqdm
    return tqdm(total=total, initial=step, disable=not (progress and accelerator.is_local_main_process), unit="step")


def _log_step(run: Prepared, bar: Any, train: Any, step: int, loss: float, images_per_second: float) -> None:
    """Show step ``step``'s loss on the progress bar, and log it (and the LR) to the trackers."""
    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_second:.1f}")
    bar.update(1)
    if train.log_with:
        run.accelerator.log({"train_loss": loss, "lr": run.scheduler.get_last_lr()[0]}, step=step)


def _write_checkpoint(run: Prepared, out_dir: Path, state: RunState, saved: nn.Module, keep: int) -> None:
    """A resumable checkpoint of step ``state.step`` (every process calls this); older ones pruned to ``keep``."""
    accelerator = run.accelerator
    scaler = accelerator.scaler
    payload = {**asdict(state), "scheduler": run.scheduler.state_dict(), "scaler": scaler and scaler.state_dict()}
    root = out_dir / "checkpoints"
    save_checkpoint(
        root,
        state.step,
        model=saved,
        optimizer=run.optimizer.optimizer,
        state=payload,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        barrier=accelerator.wait_for_everyone,
    )
    if accelerator.is_main_process:
        prune_checkpoints(root, keep, state.step)
