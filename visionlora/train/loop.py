"""The one training loop every task runs: accumulation, clipping, NaN/Inf skipping, logging,
checkpoints, resume and the output folder's lock.

A task (:class:`~visionlora.train.task.Task`; the classifier and style tasks today) supplies
only what differs: what it builds (models with adapters, data, the batch order), the loss of a
batch, what happens after a step or an epoch (samples, validation), and what its results are.
:func:`run_loop` does the rest:

1. take the output folder (:func:`~visionlora.train.lock.claim_output`), make the accelerator, seed;
2. ``task.build`` the models; give them one AdamW (LoRA parameters at ``train.lr``, the rest at
   ``train.head_lr``) and the cosine schedule, and ``accelerator.prepare`` them;
3. resume from a checkpoint if asked (its :class:`~visionlora.train.task.RunState` says where);
4. per batch: ``task.loss`` and backward (gradients accumulate over ``train.grad_accum`` batches);
   per group, one :func:`~visionlora.train.optim.optimizer_step`, skipped if NaN/Inf; a checkpoint
   every ``train.checkpoint_every`` steps; per epoch, ``task.after_epoch``;
5. ``task.finish``, then :func:`~visionlora.train.outputs.write_outputs` writes adapter, merged
   checkpoint, exports, metrics and report.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionlora._deps import require
from visionlora.errors import AdapterFileError, ConfigError
from visionlora.growth import check_schedules, current_ranks, end_schedules, first_difference, grow_ranks, rank_plan
from visionlora.io.files import write_text
from visionlora.train.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from visionlora.train.lock import claim_output
from visionlora.train.optim import (
    NonFiniteSteps,
    accumulation,
    cosine_with_warmup,
    optimizer_step,
    total_steps,
    warmup_steps,
)
from visionlora.train.outputs import check_outputs, write_outputs
from visionlora.train.recipe import dump_recipe
from visionlora.train.sharding import check_fsdp, is_fsdp, keep_whole, whole_model
from visionlora.train.task import Built, Prepared, RunState, Task

__all__ = ["is_main_process", "make_accelerator", "run_loop"]


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
    check_fsdp(accelerator, built.models()[0])  # before anything is copied or sharded
    kept = keep_whole(accelerator, next(iter(built.parts.values())))
    run = _prepare(task, accelerator, built, train, out_dir)
    saved = _saved(built)
    state = RunState()
    if resume is not None:
        folder = _resume_folder(resume, out_dir)
        loaded = load_checkpoint(
            folder,
            model=saved,
            optimizer=run.optimizer.optimizer,
            rank=accelerator.process_index,
            stateful={"scheduler": run.scheduler, "scaler": accelerator.scaler},  # checked with the rest first
            check_state=lambda found: _check_ranks(RunState.from_checkpoint(found, folder), built, run.total, folder),
        )
        state = RunState.from_checkpoint(loaded, folder)
    total = run.total
    for model in built.parts.values():
        check_schedules(model, total)
    growing = _grow(built, state, total)  # the ranks at this step (a resumed run's are checked above)
    bar = _start(accelerator, recipe, out_dir, total, state.step, progress)
    started = time.perf_counter() - state.elapsed
    guard = NonFiniteSteps(train.max_nonfinite_steps, out_dir)
    seen = 0
    while state.step < total:
        run.batches.set_position(state.epoch, state.batch)
        task.train_mode(run)
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
            if growing:
                _grow(built, state, total)
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
        if entry is not None and task.should_stop(state):
            break
    bar.close()
    seconds = time.perf_counter() - started
    outputs = task.finish(run, state)  # samples from a sharded model run on every process, before it is gathered
    main, *others = built.parts.items()
    parts = {main[0]: whole_model(main[1], kept), **dict(others)}
    for model in parts.values():  # what is written holds each adapter at its final rank (no change to outputs)
        grow_ranks(model, state.step, total_steps=total)  # FSDP's whole copy was made at step 0's ranks
        end_schedules(model)
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


def _prepare(task: Task, accelerator: Any, built: Built, train: Any, out_dir: Path) -> Prepared:
    """One AdamW over every model's groups, the cosine schedule, and ``accelerator.prepare``."""
    models = built.models()
    groups = [task.param_groups(model) for model in models]
    per_epoch = len(built.batches)  # at position 0: a whole epoch
    total = total_steps(train, math.ceil(per_epoch / train.grad_accum))
    schedule = cosine_with_warmup(warmup_steps(train, total), total)
    averaged: list[torch.Tensor] = []
    if len(models) > 1 and is_fsdp(accelerator):
        # accelerate's FSDP2 shards one model per prepare, with an optimizer over that model only. The
        # main model is sharded; the others (a text encoder: small) stay whole on every process, their
        # groups join the optimizer afterwards and their gradients are averaged by hand, as DDP would.
        if accelerator.mixed_precision == "fp16":  # the grad scaler cannot unscale sharded and whole at once
            first, *others = built.parts
            keys = " and ".join(built.sections.get(part, part) for part in others)
            raise ConfigError(
                f"train.mixed_precision: fp16 (or auto on a GPU without bf16) cannot train the {' and '.join(others)} "
                f"adapter ({keys}) beside the sharded {first} under FSDP; use bf16 or no, train under DDP "
                f"(accelerate launch without --use_fsdp), or leave {keys} out"
            )
        first, optimizer, *loaders = accelerator.prepare(models[0], torch.optim.AdamW(groups[0]), *built.loaders)
        for group in (g for model_groups in groups[1:] for g in model_groups):
            optimizer.optimizer.add_param_group(group)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, schedule)  # after every group is in
        wrapped, synced = [first, *models[1:]], [first]
        averaged = [p for model in models[1:] for p in model.parameters() if p.requires_grad]
    else:
        raw = torch.optim.AdamW([g for model_groups in groups for g in model_groups])
        scheduler = torch.optim.lr_scheduler.LambdaLR(raw, schedule)  # as accelerate's examples: before prepare
        prepared = accelerator.prepare(*models, raw, *built.loaders)
        n = len(models)
        wrapped, optimizer, loaders = list(prepared[:n]), prepared[n], list(prepared[n + 1 :])
        synced = wrapped
    # After prepare: FSDP puts new (sharded) parameters in the modules, which are the ones that get gradients.
    params = [p for model in models for p in model.parameters() if p.requires_grad]
    return Prepared(
        accelerator=accelerator,
        out_dir=out_dir,
        models=wrapped,
        loaders=loaders,
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        synced=synced,
        averaged=averaged,
        batches=built.batches,
        per_epoch=per_epoch,
        total=total,
    )


def _grow(built: Built, state: RunState, total: int) -> bool:
    """Grow the adapters that rank schedules grow to their ranks at ``state.step`` and record them in
    ``state``; whether there are any."""
    for model in built.parts.values():
        grow_ranks(model, state.step, total_steps=total)
    state.ranks = {part: ranks for part, model in built.parts.items() if (ranks := current_ranks(model))}
    return bool(state.ranks)


def _check_ranks(state: RunState, built: Built, total: int, folder: Path) -> None:
    """Refuse a checkpoint whose adapters' ranks are not those this run's rank schedules give at its step."""
    for part, model in built.parts.items():
        expected, found = rank_plan(model, state.step, total), state.ranks.get(part, {})
        if found != expected:
            raise AdapterFileError(
                f"{folder}: its {part} adapters' ranks at step {state.step} are not what this recipe's rank "
                f"schedule gives (first: {first_difference(found, expected)}); resume with the recipe the run "
                "started with"
            )
    if set(state.ranks) - set(built.parts):
        raise AdapterFileError(f"{folder}: ranks of parts {sorted(state.ranks)} this run does not have")


def _saved(built: Built) -> nn.Module:
    """What a checkpoint holds the trained tensors of: the one part, or all of them (and the task's
    ``kept`` state) by name."""
    if len(built.parts) == 1 and not built.kept:
        return next(iter(built.parts.values()))
    return nn.ModuleDict({**built.parts, **built.kept})


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
