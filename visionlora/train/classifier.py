"""The classifier task: a new head for the dataset's classes plus LoRA (or the head alone, or every
weight), validated every epoch, with the usual fine-tuning options, reported.

It plugs into :func:`~visionlora.train.loop.run_loop`, which owns the training loop itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from visionlora._deps import require
from visionlora.bnb import held_numel
from visionlora.classify import ClassifierInfo, confusion_matrix, macro_f1
from visionlora.errors import ConfigError
from visionlora.inject import apply_lora
from visionlora.io.weights import load_base
from visionlora.models.heads import replace_head
from visionlora.models.loading import build_model
from visionlora.prefix import frozen_batchnorms, recalibrate_batchnorm, split_frozen_prefix
from visionlora.preprocess import Augment, resolve_preprocess
from visionlora.train.data import EpochBatches, class_weights, classifier_datasets, set_epoch, targets_of
from visionlora.train.optim import param_groups
from visionlora.train.outputs import Outputs
from visionlora.train.recipe import ClassifierData, ClassifierModel, ClassifierRecipe
from visionlora.train.report import plot_confusion, plot_curves, plot_worst
from visionlora.train.sections import quantize_frozen
from visionlora.train.shadow import Shadow, ema_decay_at, tracked
from visionlora.train.task import Built, Prepared, RunState, Task

__all__ = ["ClassifierTask", "build_classifier"]

_WORST = 16  # images in the report's grid of the worst-classified
_METRICS = ("val_loss", "val_accuracy", "val_macro_f1")


def build_classifier(spec: ClassifierModel) -> nn.Module:
    """The base network of a classifier recipe, with the weights ``spec.weights`` asks for."""
    if spec.weights == "pretrained":
        return build_model(spec.name, pretrained=True, kwargs=spec.kwargs)
    if spec.weights == "none":
        return build_model(spec.name, pretrained=False, kwargs=spec.kwargs)
    if not Path(spec.weights).is_file():
        raise ConfigError(f"model.weights: {spec.weights!r} is not 'pretrained', 'none' or an existing weights file")
    return load_base(spec.weights, arch=spec.name, kwargs=spec.kwargs)


def _images(dataset: Dataset[Any], data: ClassifierData, device: Any) -> Any:
    for x, y in DataLoader(dataset, batch_size=data.batch_size, num_workers=data.num_workers):
        yield x.to(device), y


def _cache_features(
    network: nn.Module, datasets: list[Dataset[Any]], data: ClassifierData, accelerator: Any, recalibrate: bool
) -> tuple[nn.Module, TensorDataset, TensorDataset]:
    """The layers after ``network``'s frozen prefix, and both datasets as that prefix's outputs."""
    split = split_frozen_prefix(network)
    split.prefix.to(accelerator.device)
    started = time.perf_counter()
    if recalibrate:  # what an uncached run's BatchNorms would drift to (or be recalibrated to) on these images
        split.recalibrate_batchnorm(x for x, _ in _images(datasets[0], data, accelerator.device))
    cached = []
    for dataset in datasets:
        features, labels = [], []
        for x, y in _images(dataset, data, accelerator.device):
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
    losses, preds, targets, confidences = [], [], [], []
    for x, y in loader:
        logits = model(x).float()
        loss = F.cross_entropy(logits, y, reduction="none")
        confidence, pred = logits.softmax(-1).max(1)
        loss, pred, y, confidence = accelerator.gather_for_metrics((loss, pred, y, confidence))
        losses.append(loss.cpu())
        preds.append(pred.cpu())
        targets.append(y.cpu())
        confidences.append(confidence.cpu())
    loss, pred, target, confidence = torch.cat(losses), torch.cat(preds), torch.cat(targets), torch.cat(confidences)
    confusion = confusion_matrix(pred, target, num_classes)
    wrong = (pred != target).nonzero().flatten()
    worst = wrong[loss[wrong].argsort(descending=True)][:_WORST]
    return {
        "val_loss": loss.mean().item(),
        "val_accuracy": (pred == target).float().mean().item(),
        "val_macro_f1": macro_f1(confusion),
        "confusion": confusion,
        "worst": [(int(i), int(target[i]), int(pred[i]), float(confidence[i])) for i in worst],
    }


def best_epoch(history: list[dict[str, Any]], metric: str, min_delta: float) -> int:
    """Index in ``history`` of the best epoch: the first to beat every earlier one by more than ``min_delta``."""
    sign = -1.0 if metric == "val_loss" else 1.0
    best = 0
    for i, entry in enumerate(history[1:], start=1):
        if sign * (entry[metric] - history[best][metric]) > min_delta:
            best = i
    return best


class ClassifierTask(Task):
    """Fine-tune an image classifier (:class:`~visionlora.train.recipe.ClassifierRecipe`)."""

    recipe: ClassifierRecipe

    def build(self, accelerator: Any) -> Built:
        recipe, data, train = self.recipe, self.recipe.data, self.recipe.train
        network = build_classifier(recipe.model)
        size = data.image_size
        self.preprocess = resolve_preprocess(network, size, mean=data.mean, std=data.std, crop_pct=data.crop_pct)
        scale = (data.crop_scale[0], data.crop_scale[1])
        augment = Augment(data.augment, scale, data.auto_augment, data.random_erasing)
        transforms = (self.preprocess.train_transform(augment), self.preprocess.eval_transform())
        train_set, val_set, self.classes = classifier_datasets(data, transforms, train.seed)
        self.val_images = val_set
        heads = replace_head(network, len(self.classes))
        self.heads = heads
        if train.mode == "lora":
            cfg = dataclasses.replace(recipe.lora, trainable=sorted({*recipe.lora.trainable, *heads}))
            probe = cfg.rank_by_resolution or cfg.rank_budget is not None
            apply_lora(network, cfg, example_input=torch.zeros(1, 3, size, size) if probe else None)
            quantize_frozen(network, recipe.model.quantize, accelerator.device)  # the head, lora.trainable: float
        else:
            in_head = tuple(f"{h}." for h in heads)
            for name, param in network.named_parameters():
                param.requires_grad_(train.mode == "full" or name.startswith(in_head))
        self.frozen_norms = [] if train.batchnorm == "train" else frozen_batchnorms(network)
        weights = class_weights(targets_of(train_set)) if data.balanced else None
        model = network  # what runs in the loop: the whole classifier, or its layers after a cached prefix
        if data.cache_features:
            model, train_set, val_set = _cache_features(
                network, [train_set, val_set], data, accelerator, recalibrate=train.batchnorm != "frozen"
            )
        elif train.batchnorm == "recalibrate":
            network.to(accelerator.device)
            recalibrate_batchnorm(network, (x for x, _ in _images(train_set, data, accelerator.device)))
        if train.channels_last == "always" or (train.channels_last == "auto" and accelerator.device.type == "cuda"):
            model.to(memory_format=torch.channels_last)
            self.memory_format = torch.channels_last
        else:
            self.memory_format = torch.contiguous_format
        self.network, self.train_set = network, train_set
        self.last_val: dict[str, Any] | None = None
        self.mixup = None
        if train.mixup > 0 or train.cutmix > 0:
            Mixup = require("timm.data").Mixup
            self.mixup = Mixup(
                mixup_alpha=train.mixup,
                cutmix_alpha=train.cutmix,
                label_smoothing=train.label_smoothing,
                num_classes=len(self.classes),
            )
        count = len(train_set)  # type: ignore[arg-type]  # image-folder datasets are sized
        batches = EpochBatches(count, data.batch_size, train.seed, drop_last=count >= data.batch_size, weights=weights)
        loader_gen = torch.Generator().manual_seed(train.seed)  # keeps DataLoader seeding off the global RNG
        train_loader = DataLoader(train_set, batch_sampler=batches, num_workers=data.num_workers, generator=loader_gen)
        val_loader = DataLoader(val_set, batch_size=data.batch_size, num_workers=data.num_workers)
        if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
            # One global batch, as with one process: BatchNorm statistics over all of it (GPU only in torch).
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        runs = model if model is not network else None
        if train.compile:
            runs = torch.compile(model)  # type: ignore[assignment]
        norm_stats = train.mode == "full" or train.batchnorm == "train"
        kept: dict[str, nn.Module] = {}
        self.ema = self.best = None
        if train.ema_decay is not None:
            self.ema = kept["ema"] = Shadow(tracked(network, norm_stats))
        if recipe.output.keep_best:
            self.best = kept["best"] = Shadow(tracked(network, norm_stats))
        return Built({"model": network}, batches, [train_loader, val_loader], runs, kept=kept)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        train = self.recipe.train
        return param_groups(
            model,
            train,
            head=self.heads,
            layer_decay=train.layer_decay,
            decay_norm_and_bias=train.decay_norm_and_bias,
        )

    def train_mode(self, run: Prepared) -> None:
        super().train_mode(run)
        for norm in self.frozen_norms:
            norm.eval()

    def batches(self, run: Prepared, epoch: int) -> Any:
        set_epoch(self.train_set, epoch)
        return run.loaders[0]

    def loss(self, run: Prepared, batch: Any, epoch: int) -> torch.Tensor:
        x, y = batch
        if x.ndim == 4:
            x = x.contiguous(memory_format=self.memory_format)
        if self.mixup is not None:  # its random draws come from NumPy's global RNG, which checkpoints hold
            x, soft = self.mixup(x, y)
            logits = run.models[0](x).float()
            return torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(run.models[0](x).float(), y, label_smoothing=self.recipe.train.label_smoothing)

    def after_step(self, run: Prepared, state: RunState) -> None:
        if self.ema is not None:
            self.ema.average(ema_decay_at(self.recipe.train.ema_decay or 0.0, state.step))

    def _exported(self) -> contextlib.AbstractContextManager[Any]:
        """A context in which the model holds the weights the run exports: the EMA when on."""
        return self.ema.swapped() if self.ema is not None else contextlib.nullcontext()

    def _watched(self) -> tuple[str, float]:
        stop = self.recipe.train.early_stopping
        return (stop.metric, stop.min_delta) if stop is not None else ("val_accuracy", 0.0)

    def after_epoch(self, run: Prepared, state: RunState) -> dict[str, Any]:
        with self._exported():
            self.last_val = _validate(run.models[0], run.loaders[1], run.accelerator, len(self.classes))
        since = state.history[-1]["step"] if state.history else 0  # one loss per step: this epoch's
        losses = state.losses[since:]
        entry = {
            "epoch": state.epoch + 1,
            "step": state.step,
            "train_loss": sum(losses) / max(1, len(losses)),
            **{k: v for k, v in self.last_val.items() if k not in ("confusion", "worst")},
        }
        metric, min_delta = self._watched()
        if self.best is not None and best_epoch([*state.history, entry], metric, min_delta) == len(state.history):
            with self._exported():
                self.best.copy_from_model()
        return entry

    def should_stop(self, state: RunState) -> bool:
        stop = self.recipe.train.early_stopping
        if stop is None:
            return False
        return len(state.history) - 1 - best_epoch(state.history, stop.metric, stop.min_delta) >= stop.patience

    def info(self) -> ClassifierInfo:
        """The record stored with the adapter and merged checkpoint."""
        return ClassifierInfo(self.recipe.model.name, self.classes, self.preprocess, self.recipe.model.kwargs)

    def finish(self, run: Prepared, state: RunState) -> Outputs:
        if self.ema is not None:
            self.ema.copy_to_model()  # the exported weights
        last = self.last_val
        if last is None:  # resumed from a checkpoint taken after the last step
            last = _validate(run.models[0], run.loaders[1], run.accelerator, len(self.classes))
        params = list(self.network.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        metric, min_delta = self._watched()
        best = best_epoch(state.history, metric, min_delta) if state.history else None
        metrics = {
            "epochs": len(state.history),
            "mode": self.recipe.train.mode,
            "val_loss": last["val_loss"],
            "val_accuracy": last["val_accuracy"],
            "val_macro_f1": last["val_macro_f1"],
            "best_epoch": None if best is None else state.history[best]["epoch"],
            "best": None if best is None else {k: state.history[best][k] for k in _METRICS},
            "stopped_early": state.step < run.total,  # only early stopping ends a run before its last step
            "trainable_parameters": trainable,
            "trainable_percent": 100.0 * trainable / sum(held_numel(p) for p in params),
            "classes": self.classes,
            "preprocess": self.preprocess.to_dict(),
            "history": state.history,
            "confusion": last["confusion"].tolist(),
        }
        plots = {
            "confusion.png": functools.partial(plot_confusion, last["confusion"], self.classes),
            "worst.png": functools.partial(plot_worst, self._worst_images(last["worst"]), self.classes),
        }
        if state.history:
            plots["curves.png"] = functools.partial(plot_curves, state.history)
        variants = {"best": self.best.swapped} if self.best is not None and best is not None else {}
        return Outputs(
            metrics,
            "merged.safetensors",
            plots=plots,
            adapter=self.recipe.train.mode == "lora",
            metadata=self.info().to_header(),
            variants=variants,
        )

    def _worst_images(self, worst: list[tuple[int, int, int, float]]) -> list[tuple[torch.Tensor, int, int, float]]:
        """The worst-classified validation images (un-normalised, CHW in [0, 1]) with true and predicted class."""
        mean = torch.tensor(self.preprocess.mean).view(3, 1, 1)
        std = torch.tensor(self.preprocess.std).view(3, 1, 1)
        return [((self.val_images[i][0] * std + mean).clamp(0, 1), t, p, c) for i, t, p, c in worst]
