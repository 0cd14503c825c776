"""One optimizer step of a run: parameter groups, the LR schedule, gradient accumulation, clipping,
and the NaN/Inf guard that skips a step which would write non-finite weights."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionlora._deps import require
from visionlora.errors import ConfigError, TrainingError
from visionlora.state import lora_layers
from visionlora.train.checkpoint import latest_checkpoint
from visionlora.train.recipe import Train
from visionlora.train.sharding import clip_grad_norm, full_tensor, is_fsdp, local_tensor

__all__ = [
    "NonFiniteSteps",
    "accumulation",
    "cosine_with_warmup",
    "layer_ids",
    "optimizer_step",
    "param_groups",
    "total_steps",
    "warmup_steps",
]

logger = logging.getLogger(__name__)

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def cosine_with_warmup(warmup: int, total: int) -> Any:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def warmup_steps(train: Train, total: int) -> int:
    """Warm-up steps of a run of ``total`` steps: ``train.warmup_steps`` if set, else its fraction."""
    return train.warmup_steps if train.warmup_steps is not None else round(train.warmup_fraction * total)


def _no_decay(name: str, param: nn.Parameter, norms: set[str]) -> bool:
    """Biases, norm weights and other 1-D parameters (timm's rule; DoRA's magnitude, a vector stored as
    ``(out, 1, …)``, with them), never LoRA matrices."""
    return param.ndim <= 1 or name.endswith(".magnitude") or name.rsplit(".", 1)[0] in norms


def param_groups(
    model: nn.Module,
    train: Train,
    *,
    head: Sequence[str] = (),
    layer_decay: float | None = None,
    decay_norm_and_bias: bool = True,
) -> list[dict[str, Any]]:
    """AdamW groups of ``model``'s trained parameters: LoRA matrices and (without LoRA) the body at
    ``train.lr``, everything else (the ``head`` modules, ``trainable`` modules, biases) at ``train.head_lr``.

    With ``layer_decay`` each parameter's LR is also scaled by ``layer_decay ** (last - layer)``, the
    layer counted by :func:`layer_ids` (the head is the last); without ``decay_norm_and_bias``, biases
    and norm weights get no weight decay. Groups come in a fixed order, so a checkpoint's optimizer
    state fits the same run rebuilt.
    """
    lora_ids = {id(p) for _, layer in lora_layers(model) for p in layer.adapters.parameters()}
    norms = {n for n, m in model.named_modules() if isinstance(m, _NORMS)}
    layers = layer_ids(model) if layer_decay is not None else {}
    last = max(layers.values(), default=0)
    in_head = tuple(f"{h}." for h in head)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        body = id(param) in lora_ids or (not lora_ids and not name.startswith(in_head))
        lr = train.lr if body else train.head_lr
        if layer_decay is not None and not name.startswith(in_head):
            lr *= layer_decay ** (last - layers.get(name, last))
        decay = 0.0 if not decay_norm_and_bias and _no_decay(name, param, norms) else train.weight_decay
        groups.setdefault((lr, decay), []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Depth of each parameter, for layer-wise LR decay: timm's own grouping (``group_matcher``) for
    timm models; else each top-level module is one layer and each block of a top-level
    ``nn.Sequential``/``ModuleList`` (a ResNet stage's blocks) one more."""
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        grouped = require("timm.models").group_parameters(model, matcher(coarse=False))
        return {name: i for i, names in enumerate(grouped.values()) for name in names}
    ids: dict[str, int] = {}
    depth = 0
    for child_name, child in model.named_children():
        blocks = list(child.named_children()) if isinstance(child, (nn.Sequential, nn.ModuleList)) else []
        for block_name, block in blocks or [("", child)]:
            prefix = f"{child_name}.{block_name}." if block_name else f"{child_name}."
            names = [prefix + n for n, _ in block.named_parameters()]
            if names:
                ids.update(dict.fromkeys(names, depth))
                depth += 1
    for name, _ in model.named_parameters():  # the root's own (a ViT's cls_token): the first layer
        ids.setdefault(name, 0)
    return ids


def total_steps(train: Train, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: ``train.max_steps`` if set (as many epochs as that takes), else all epochs."""
    return train.max_steps if train.max_steps is not None else steps_per_epoch * train.epochs


def accumulation(index: int, batches: int, grad_accum: int) -> tuple[bool, int]:
    """For batch ``index`` of an epoch of ``batches``: whether an optimizer step follows it, and how many
    batches its accumulation group has (the last group of an epoch may be shorter)."""
    start = (index // grad_accum) * grad_accum
    end = min(batches, start + grad_accum)
    return index + 1 == end, end - start


@dataclass
class NonFiniteSteps:
    """Optimizer steps skipped in a row because their loss or gradients held NaN/Inf.

    A skipped step changes nothing: no optimizer update, no LR scheduler step, gradients zeroed.
    It does not count as a step of the run either, so the run still makes its ``max_steps``
    updates, and the step counter, the LR schedule and the checkpoint names stay in step (a
    resumed run starts a new count). After ``limit`` in a row :meth:`skip` raises TrainingError;
    every checkpoint written before holds weights of applied, finite steps only.
    """

    limit: int
    """``train.max_nonfinite_steps``."""
    out_dir: Path
    """The run folder, whose newest checkpoint the error names."""
    in_a_row: int = 0
    since: int = 0
    """The step at which the current run of skips began."""
    skipped: int = 0
    """Steps skipped in this process's run so far."""

    def skip(self, step: int, what: str, log: bool) -> None:
        """Record that ``step`` is skipped because ``what``; warn (if ``log``), and raise at the limit.

        Raises:
            TrainingError: the ``limit``-th skip in a row, naming the steps and the last good checkpoint.
        """
        if self.in_a_row == 0:
            self.since = step
        self.in_a_row += 1
        self.skipped += 1
        if log:
            logger.warning(
                "step %d: %s; nothing updated, the step is tried again on the next batch (%d in a row; stop at %d)",
                step,
                what,
                self.in_a_row,
                self.limit,
            )
        if self.in_a_row >= self.limit:
            try:
                kept = f"the last good checkpoint is at {latest_checkpoint(self.out_dir)}"
            except ConfigError:
                kept = f"no checkpoint was written under {self.out_dir / 'checkpoints'} (train.checkpoint_every)"
            raise TrainingError(
                f"{self.in_a_row} optimizer steps in a row had a NaN/Inf loss or gradients, since step "
                f"{self.since} (last: {what}); the run stopped (train.max_nonfinite_steps={self.limit}) and "
                f"{kept}. Lower train.lr, keep train.max_grad_norm set, or train in bf16/fp32 rather than fp16."
            )

    def applied(self) -> None:
        """An update was applied: the run of skips is over."""
        self.in_a_row = 0


def _finite_grads(accelerator: Any, params: Sequence[torch.Tensor]) -> bool:
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    finite = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
    if not is_fsdp(accelerator):
        return finite
    # Each process holds a part of every gradient: all must agree.
    count = accelerator.reduce(torch.tensor([float(finite)], device=accelerator.device), reduction="sum")
    return bool(count.item() == accelerator.num_processes)


def _clip(accelerator: Any, params: Sequence[torch.Tensor], max_grad_norm: float) -> torch.Tensor:
    """Unscale (fp16) and clip the gradients of ``params`` to ``max_grad_norm``; return their total norm."""
    if is_fsdp(accelerator):
        # accelerate's clip_grad_norm_ under FSDP expects every parameter of the model; given the trained
        # ones only, it unscales twice, which the fp16 grad scaler refuses.
        accelerator.unscale_gradients()
        return clip_grad_norm(params, max_grad_norm)
    return accelerator.clip_grad_norm_(params, max_grad_norm)  # unscales first under fp16


def optimizer_step(
    accelerator: Any,
    optimizer: Any,
    scheduler: Any,
    params: Sequence[torch.Tensor],
    max_grad_norm: float | None,
    losses: list[torch.Tensor],
    guard: NonFiniteSteps,
    step: int,
    averaged: Sequence[torch.Tensor] = (),
) -> float | None:
    """Clip, step, schedule and zero the gradients of step ``step``; return the group's loss averaged
    over processes, or None if the step was skipped for a NaN/Inf loss or gradient (see :class:`NonFiniteSteps`).

    Every process takes the same decision: the loss is averaged over processes and the gradients
    are already all-reduced (those of ``averaged``, parameters no wrapper syncs, are averaged here
    first). Under fp16 the grad scaler skips steps with overflowing gradients itself and lowers its
    scale; those still count as steps (the scheduler waits), as they are part of finding the scale,
    and count towards ``guard`` only once the scale is below 1.

    Raises:
        TrainingError: ``guard``'s limit of skips in a row is reached.
    """
    loss = float(accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item())
    for param in averaged:  # parameters of a model no wrapper syncs (see the style runner under FSDP)
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        param.grad = accelerator.reduce(grad, reduction="mean")
    log = accelerator.is_main_process
    if not math.isfinite(loss):  # checked before unscaling, so the grad scaler's state is untouched
        optimizer.zero_grad(set_to_none=True)
        guard.skip(step, f"the loss is {loss}", log)
        return None
    scaler = accelerator.scaler
    if max_grad_norm is not None:
        norm = float(full_tensor(_clip(accelerator, params, max_grad_norm)))
        finite = math.isfinite(norm)
    else:
        norm, finite = math.nan, scaler is not None or _finite_grads(accelerator, params)
    if scaler is None and not finite:
        optimizer.zero_grad(set_to_none=True)
        guard.skip(step, "the gradients hold NaN/Inf" + (f" (norm {norm})" if max_grad_norm else ""), log)
        return None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not accelerator.optimizer_step_was_skipped:
        scheduler.step()
        guard.applied()
    elif scaler.get_scale() < 1.0:  # fp16: the scaler skipped, and a smaller scale is no longer the cure
        guard.skip(step, f"the gradients overflow at grad-scaler scale {scaler.get_scale():g}", log)
        return None
    return loss
