"""The classifier task: a new head for the dataset's classes plus LoRA, validated every epoch, reported.

It plugs into :func:`~visionlora.train.loop.run_loop`, which owns the training loop itself.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from visionlora.errors import ConfigError
from visionlora.inject import apply_lora
from visionlora.io.weights import load_base
from visionlora.models.heads import replace_head
from visionlora.models.loading import build_model
from visionlora.prefix import split_frozen_prefix
from visionlora.train.data import EpochBatches, classifier_datasets, classifier_transforms, set_epoch
from visionlora.train.outputs import Outputs
from visionlora.train.recipe import ClassifierData, ClassifierModel, ClassifierRecipe
from visionlora.train.report import confusion_matrix, macro_f1, plot_confusion, plot_curves
from visionlora.train.task import Built, Prepared, RunState, Task

__all__ = ["ClassifierTask", "build_classifier"]


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


class ClassifierTask(Task):
    """Fine-tune an image classifier (:class:`~visionlora.train.recipe.ClassifierRecipe`)."""

    recipe: ClassifierRecipe

    def build(self, accelerator: Any) -> Built:
        recipe, data = self.recipe, self.recipe.data
        network = build_classifier(recipe.model)
        transforms = classifier_transforms(network, data.image_size, data.augment)
        train_set, val_set, self.classes = classifier_datasets(data, transforms, recipe.train.seed)
        heads = replace_head(network, len(self.classes))
        cfg = dataclasses.replace(recipe.lora, trainable=sorted({*recipe.lora.trainable, *heads}))
        probe = cfg.rank_by_resolution or cfg.rank_budget is not None
        size = data.image_size
        apply_lora(network, cfg, example_input=torch.zeros(1, 3, size, size) if probe else None)
        model = network  # what runs in the loop: the whole classifier, or its layers after a cached prefix
        if data.cache_features:
            model, train_set, val_set = _cache_features(network, train_set, val_set, data, accelerator)
        self.network, self.train_set = network, train_set
        self.last_val: dict[str, Any] | None = None
        count = len(train_set)  # type: ignore[arg-type]  # image-folder datasets are sized
        batches = EpochBatches(count, data.batch_size, recipe.train.seed, drop_last=count >= data.batch_size)
        loader_gen = torch.Generator().manual_seed(recipe.train.seed)  # keeps DataLoader seeding off the global RNG
        train_loader = DataLoader(train_set, batch_sampler=batches, num_workers=data.num_workers, generator=loader_gen)
        val_loader = DataLoader(val_set, batch_size=data.batch_size, num_workers=data.num_workers)
        if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
            # One global batch, as with one process: BatchNorm statistics over all of it (GPU only in torch).
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        runs = model if model is not network else None
        return Built({"model": network}, batches, [train_loader, val_loader], runs)

    def batches(self, run: Prepared, epoch: int) -> Any:
        set_epoch(self.train_set, epoch)
        return run.loaders[0]

    def loss(self, run: Prepared, batch: Any, epoch: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(run.models[0](x).float(), y)

    def after_epoch(self, run: Prepared, state: RunState) -> dict[str, Any]:
        self.last_val = _validate(run.models[0], run.loaders[1], run.accelerator, len(self.classes))
        since = state.history[-1]["step"] if state.history else 0  # one loss per step: this epoch's
        losses = state.losses[since:]
        return {
            "epoch": state.epoch + 1,
            "step": state.step,
            "train_loss": sum(losses) / max(1, len(losses)),
            **{k: v for k, v in self.last_val.items() if k != "confusion"},
        }

    def finish(self, run: Prepared, state: RunState) -> Outputs:
        last = self.last_val
        if last is None:  # resumed from a checkpoint taken after the last step
            last = _validate(run.models[0], run.loaders[1], run.accelerator, len(self.classes))
        params = list(self.network.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        metrics = {
            "epochs": len(state.history),
            "val_loss": last["val_loss"],
            "val_accuracy": last["val_accuracy"],
            "val_macro_f1": last["val_macro_f1"],
            "trainable_parameters": trainable,
            "trainable_percent": 100.0 * trainable / sum(p.numel() for p in params),
            "classes": self.classes,
            "history": state.history,
            "confusion": last["confusion"].tolist(),
        }
        plots = {"confusion.png": functools.partial(plot_confusion, last["confusion"], self.classes)}
        if state.history:
            plots["curves.png"] = functools.partial(plot_curves, state.history)
        return Outputs(metrics, "merged.safetensors", plots=plots)
