"""The classifier recipe: new head + LoRA, trained with accelerate, validated every epoch, reported."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from visionlora._deps import require
from visionlora.errors import ConfigError
from visionlora.inject import apply_lora
from visionlora.io import export_adapter, export_merged, save_adapter
from visionlora.io.files import write_text
from visionlora.io.weights import load_base
from visionlora.models.heads import replace_head
from visionlora.models.loading import build_model
from visionlora.prefix import split_frozen_prefix
from visionlora.train.data import EpochBatches, classifier_datasets, classifier_transforms, set_epoch
from visionlora.train.loop import (
    NonFiniteSteps,
    accumulation,
    checkpoint_due,
    cosine_with_warmup,
    log_step,
    make_accelerator,
    optimizer_step,
    param_groups,
    restore,
    start_run,
    total_steps,
    write_checkpoint,
)
from visionlora.train.recipe import ClassifierData, ClassifierModel, ClassifierRecipe
from visionlora.train.report import confusion_matrix, macro_f1, plot_confusion, plot_curves
from visionlora.train.sharding import check_fsdp, keep_whole, whole_model

__all__ = ["build_classifier", "run_classifier"]

_MERGED_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_classifier(spec: ClassifierModel) -> nn.Module:
    """The base network of a classifier recipe, with the weights ``spec.weights`` asks for."""
    if spec.weights == "pretrained":
        return build_model(spec.name, pretrained=True, kwargs=spec.kwargs)
    if spec.weights == "none":
        return build_model(spec.name, pretrained=False, kwargs=spec.kwargs)
    if not Path(spec.weights).is_file():
        raise ConfigError(f"model.weights: {spec.weights!r} is not 'pretrained', 'none' or an existing weights file")
    return load_base(spec.weights, arch=spec.name, kwargs=spec.kwargs)


def _cache_features(
    network: nn.Module, train_set: Dataset[Any], val_set: Dataset[Any], data: ClassifierData, accelerator: Any
) -> tuple[nn.Module, TensorDataset, TensorDataset]:
    """The layers after ``network``'s frozen prefix, and both datasets as that prefix's outputs."""
    split = split_frozen_prefix(network)
    split.prefix.to(accelerator.device)
    started = time.perf_counter()

    def images(dataset: Dataset[Any]) -> Any:
        for x, y in DataLoader(dataset, batch_size=data.batch_size, num_workers=data.num_workers):
            yield x.to(accelerator.device), y

    # What an uncached run's BatchNorms would drift to on these images (AdaBN); then fixed features.
    split.recalibrate_batchnorm(x for x, _ in images(train_set))
    cached = []
    for dataset in (train_set, val_set):
        features, labels = [], []
        for x, y in images(dataset):
            features.append(split.features(x).cpu())
            labels.append(y)
        cached.append(TensorDataset(torch.cat(features), torch.cat(labels)))
    size = sum(d.tensors[0].numel() * d.tensors[0].element_size() for d in cached)
    accelerator.print(
        f"cached the frozen prefix ({split.prefix_calls} calls, up to {split.boundary}): "
        f"{size / 2**20:.1f} MiB in {time.perf_counter() - started:.1f} s"
    )
    return split.rest, cached[0], cached[1]


@torch.no_grad()
def _validate(model: nn.Module, loader: DataLoader[Any], accelerator: Any, num_classes: int) -> dict[str, Any]:
    model.eval()
    losses, preds, targets = [], [], []
    for x, y in loader:
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="none")
        loss, pred, y = accelerator.gather_for_metrics((loss, logits.argmax(1), y))
        losses.append(loss.cpu())
        preds.append(pred.cpu())
        targets.append(y.cpu())
    pred, target = torch.cat(preds), torch.cat(targets)
    confusion = confusion_matrix(pred, target, num_classes)
    return {
        "val_loss": torch.cat(losses).mean().item(),
        "val_accuracy": (pred == target).float().mean().item(),
        "val_macro_f1": macro_f1(confusion),
        "confusion": confusion,
    }


def run_classifier(
    recipe: ClassifierRecipe, *, output: str | Path | None = None, resume: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train ``recipe``; write adapter, merged checkpoint, exports, metrics.json, recipe.yaml and report/.

    Returns the final metrics (also in ``metrics.json``). Runs unchanged under ``accelerate launch``.
    """
    out_dir = Path(output or recipe.output.dir)
    train = recipe.train
    accelerator = make_accelerator(train, out_dir)
    require("accelerate.utils").set_seed(train.seed)
    if recipe.data.batch_size % accelerator.num_processes:
        raise ConfigError(
            f"data.batch_size: {recipe.data.batch_size} does not split over {accelerator.num_processes} processes"
        )
    model = build_classifier(recipe.model)
    train_set, val_set, classes = classifier_datasets(
        recipe.data, classifier_transforms(model, recipe.data.image_size, recipe.data.augment), train.seed
    )
    size_of_train = len(train_set)  # type: ignore[arg-type]  # image-folder datasets are sized
    heads = replace_head(model, len(classes))
    cfg = dataclasses.replace(recipe.lora, trainable=sorted({*recipe.lora.trainable, *heads}))
    probe = cfg.rank_by_resolution or cfg.rank_budget is not None
    size = recipe.data.image_size
    apply_lora(model, cfg, example_input=torch.zeros(1, 3, size, size) if probe else None)
    network = model  # the whole classifier; ``model`` is what runs in the loop
    if recipe.data.cache_features:
        model, train_set, val_set = _cache_features(network, train_set, val_set, recipe.data, accelerator)

    batches = EpochBatches(
        size_of_train, recipe.data.batch_size, train.seed, drop_last=size_of_train >= recipe.data.batch_size
    )
    loader_gen = torch.Generator().manual_seed(train.seed)  # keeps DataLoader seeding off the global RNG
    train_loader = DataLoader(
        train_set, batch_sampler=batches, num_workers=recipe.data.num_workers, generator=loader_gen
    )
    val_loader = DataLoader(val_set, batch_size=recipe.data.batch_size, num_workers=recipe.data.num_workers)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        # One global batch, as with one process: BatchNorm statistics over all of it (GPU only in torch).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.AdamW(param_groups(model, train))
    batches_per_epoch = len(batches)
    steps_per_epoch = math.ceil(batches_per_epoch / train.grad_accum)
    total = total_steps(train, steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(train.warmup_steps, total))
    check_fsdp(accelerator, model)
    kept = keep_whole(accelerator, network)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)

    step, epoch, start_batch, history, elapsed, epoch_losses = 0, 0, 0, [], 0.0, []
    if resume is not None:
        state = restore(resume, out_dir, accelerator, network, optimizer, scheduler)
        step, epoch, start_batch = state["step"], state["epoch"], state["batch"]
        history, elapsed, epoch_losses = state["history"], state["elapsed"], state["epoch_losses"]
    bar = start_run(accelerator, recipe, out_dir, total, step, progress)
    started = time.perf_counter() - elapsed
    trainable = [p for p in model.parameters() if p.requires_grad]
    guard = NonFiniteSteps(train.max_nonfinite_steps, out_dir)
    last_val: dict[str, Any] | None = None
    images = 0
    while step < total:
        batches.set_position(epoch, start_batch)
        set_epoch(train_set, epoch)
        model.train()
        group: list[torch.Tensor] = []
        for index, (x, y) in enumerate(train_loader, start=start_batch):
            boundary, group_size = accumulation(index, batches_per_epoch, train.grad_accum)
            with contextlib.nullcontext() if boundary else accelerator.no_sync(model):
                loss = F.cross_entropy(model(x).float(), y)
                accelerator.backward(loss / group_size)
            group.append(loss.detach())
            images += len(y) * accelerator.num_processes
            if not boundary:
                continue
            step_loss = optimizer_step(
                accelerator, optimizer, scheduler, trainable, train.max_grad_norm, group, guard, step + 1
            )
            group = []
            if step_loss is None:  # a NaN/Inf loss or gradient: skipped and not counted (see NonFiniteSteps)
                continue
            step += 1
            epoch_losses.append(step_loss)
            rate = images / max(time.perf_counter() - started, 1e-9)
            log_step(accelerator, bar, scheduler, train, step, step_loss, img_s=f"{rate:.1f}")
            if checkpoint_due(train, step, total):
                write_checkpoint(
                    accelerator,
                    out_dir,
                    step,
                    epoch,
                    index + 1,
                    network,
                    optimizer,
                    scheduler,
                    history,
                    started,
                    train,
                    extra={"epoch_losses": epoch_losses},
                )
            if step >= total:
                break
        start_batch = 0
        last_val = _validate(model, val_loader, accelerator, len(classes))
        entry = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": sum(epoch_losses) / max(1, len(epoch_losses)),
            **{k: v for k, v in last_val.items() if k != "confusion"},
        }
        history.append(entry)
        if train.log_with:
            accelerator.log({k: v for k, v in entry.items() if k not in ("epoch", "step")}, step=step)
        epoch += 1
        epoch_losses = []
    bar.close()
    if last_val is None:  # resumed from a checkpoint taken after the last step
        last_val = _validate(model, val_loader, accelerator, len(classes))
    seconds = time.perf_counter() - started
    metrics = _finish(accelerator, recipe, out_dir, network, kept, history, last_val, classes, seconds, step)
    if train.log_with:
        accelerator.end_training()
    return metrics


def _finish(
    accelerator: Any,
    recipe: ClassifierRecipe,
    out_dir: Path,
    model: nn.Module,
    kept: nn.Module | None,
    history: list[dict[str, Any]],
    last_val: dict[str, Any],
    classes: list[str],
    seconds: float,
    step: int,
) -> dict[str, Any]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    metrics = {
        "steps": step,
        "epochs": len(history),
        "val_loss": last_val["val_loss"],
        "val_accuracy": last_val["val_accuracy"],
        "val_macro_f1": last_val["val_macro_f1"],
        "trainable_parameters": trainable,
        "trainable_percent": 100.0 * trainable / total,
        "seconds": seconds,
        "processes": accelerator.num_processes,
        "distributed": str(accelerator.distributed_type.value),  # NO, MULTI_GPU, MULTI_CPU, FSDP, ...
        "classes": classes,
        "history": history,
        "confusion": last_val["confusion"].tolist(),
    }
    model = whole_model(model, kept)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model.eval()
        # The run holds its folder (see train/lock.py), so it replaces its own earlier outputs.
        save_adapter(model, out_dir / "adapter.safetensors", overwrite=True)
        merged_dtype = _MERGED_DTYPES[recipe.output.merged_dtype]
        export_merged(model, out_dir / "merged.safetensors", dtype=merged_dtype, overwrite=True)
        for fmt in recipe.output.export:
            name = f"adapter-{fmt}" + ("" if fmt == "peft" else ".safetensors")
            export_adapter(model, out_dir / name, format=fmt, overwrite=True)
        if history:
            plot_curves(history, out_dir / "report" / "curves.png")
        plot_confusion(last_val["confusion"], classes, out_dir / "report" / "confusion.png")
        write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1))
    accelerator.wait_for_everyone()
    return metrics
