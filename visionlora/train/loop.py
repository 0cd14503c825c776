"""What every recipe runner shares: the accelerator, the LR schedule, checkpoint writing and resuming."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionlora.errors import ConfigError
from visionlora.io.files import write_text
from visionlora.train.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from visionlora.train.recipe import Train, dump_recipe

__all__ = [
    "accumulation",
    "cosine_with_warmup",
    "make_accelerator",
    "optimizer_step",
    "param_groups",
    "restore",
    "start_run",
    "total_steps",
    "write_checkpoint",
]


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def make_accelerator(train: Train, out_dir: Path) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(
        cpu=not torch.cuda.is_available(),  # without it accelerate ignores torchrun's processes on a CPU machine
        mixed_precision=_mixed_precision(train.mixed_precision),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        log_with=train.log_with,
        project_dir=str(out_dir),
    )


def cosine_with_warmup(warmup: int, total: int) -> Any:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _resume_folder(resume: str, out_dir: Path) -> Path:
    if resume == "latest":
        return latest_checkpoint(out_dir)
    path = Path(resume)
    if (path / "state.json").is_file():
        return path
    if (path / "checkpoints").is_dir():
        return latest_checkpoint(path)
    raise ConfigError(f"--resume {resume}: not 'latest', a run folder with checkpoints/, or a checkpoint folder")


def param_groups(model: nn.Module, train: Train) -> list[dict[str, Any]]:
    """AdamW groups: the LoRA parameters at ``train.lr``, everything else that trains at ``train.head_lr``."""
    from visionlora.inject import lora_layers

    lora_ids = {id(p) for _, layer in lora_layers(model) for p in layer.adapters.parameters()}
    trained = [p for p in model.parameters() if p.requires_grad]
    lora = [p for p in trained if id(p) in lora_ids]
    other = [p for p in trained if id(p) not in lora_ids]
    groups = [{"params": lora, "lr": train.lr, "weight_decay": train.weight_decay}]
    if other:
        groups.append({"params": other, "lr": train.head_lr, "weight_decay": train.weight_decay})
    return groups


def total_steps(train: Train, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: ``train.max_steps`` if set (as many epochs as that takes), else all epochs."""
    return train.max_steps if train.max_steps is not None else steps_per_epoch * train.epochs


def accumulation(index: int, batches: int, grad_accum: int) -> tuple[bool, int]:
    """For batch ``index`` of an epoch of ``batches``: whether an optimizer step follows it, and how many
    batches its accumulation group has (the last group of an epoch may be shorter)."""
    start = (index // grad_accum) * grad_accum
    end = min(batches, start + grad_accum)
    return index + 1 == end, end - start


def optimizer_step(
    accelerator: Any,
    optimizer: Any,
    scheduler: Any,
    params: Sequence[torch.Tensor],
    max_grad_norm: float | None,
    losses: list[torch.Tensor],
) -> float:
    """Clip, step, schedule and zero the gradients; return the group's loss averaged over processes."""
    if max_grad_norm is not None:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # fp16: the grad scaler skipped a step with inf/NaN grads
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item())


def start_run(accelerator: Any, recipe: Any, out_dir: Path, total: int, step: int, progress: bool) -> Any:
    """Write the resolved recipe, start the trackers, and return the progress bar (main process only)."""
    from tqdm.auto import tqdm

    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "recipe.yaml", dump_recipe(recipe))
    if recipe.train.log_with:
        accelerator.init_trackers("visionlora")
    return tqdm(total=total, initial=step, disable=not (progress and accelerator.is_local_main_process), unit="step")


def restore(
    resume: str, out_dir: Path, accelerator: Any, model: nn.Module, optimizer: Any, scheduler: Any
) -> dict[str, Any]:
    """Load the checkpoint ``resume`` names into model, optimizer, scheduler, grad scaler and RNG; return its state."""
    folder = _resume_folder(resume, out_dir)
    state = load_checkpoint(folder, model=model, optimizer=optimizer.optimizer, rank=accelerator.process_index)
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    return state


def write_checkpoint(
    accelerator: Any,
    out_dir: Path,
    step: int,
    epoch: int,
    batch: int,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    history: list[dict[str, Any]],
    started: float,
    train: Train,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a resumable checkpoint (every process calls this) and prune old ones."""
    state = {
        "step": step,
        "epoch": epoch,
        "batch": batch,
        "history": history,
        "elapsed": time.perf_counter() - started,
        "scheduler": scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        **(extra or {}),
    }
    root = out_dir / "checkpoints"
    save_checkpoint(
        root,
        step,
        model=model,
        optimizer=optimizer.optimizer,
        state=state,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        barrier=accelerator.wait_for_everyone,
    )
    if accelerator.is_main_process:
        prune_checkpoints(root, train.keep_checkpoints, step)
