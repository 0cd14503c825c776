"""Using a trained classifier: load it with the class names and preprocessing its run stored,
predict the top-k classes of images, evaluate it on an image folder.

A classifier run writes a :class:`ClassifierInfo` (architecture, class names, preprocessing)
into the header of its adapter and of its merged checkpoint, so either file is enough to predict:

    >>> model, info = vl.load_classifier("runs/pets/merged.safetensors")
    >>> vl.predict(model, info, ["cat.jpg"], top_k=3)
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionlora._deps import require
from visionlora.errors import ConfigError
from visionlora.io.files import read_metadata, write_text
from visionlora.io.formats import read_adapter
from visionlora.io.load import load_adapter
from visionlora.io.weights import fit_head, load_base
from visionlora.models.heads import classifier_names
from visionlora.preprocess import Preprocess, resolve_preprocess

__all__ = [
    "INFO_KEY",
    "ClassifierInfo",
    "Prediction",
    "confusion_matrix",
    "evaluate",
    "image_files",
    "load_classifier",
    "macro_f1",
    "predict",
]

INFO_KEY = "visionlora.classifier"
"""The safetensors header key under which a classifier run's :class:`ClassifierInfo` is stored."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class ClassifierInfo:
    """What predicting with a trained classifier needs besides its weights."""

    model: str
    """The architecture, as a recipe's ``model.name`` (``torchvision:resnet50``)."""
    classes: list[str]
    """Class names, in the order of the head's outputs."""
    preprocess: Preprocess
    """What evaluation does to an image."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments the architecture was built with (``model.kwargs``)."""

    def to_header(self) -> dict[str, str]:
        """The safetensors header entry holding this record."""
        record = {
            "model": self.model,
            "kwargs": self.kwargs,
            "classes": self.classes,
            "preprocess": self.preprocess.to_dict(),
        }
        return {INFO_KEY: json.dumps(record)}

    @classmethod
    def from_header(cls, header: dict[str, str], where: str) -> ClassifierInfo | None:
        """The record of a header written by :meth:`to_header`, or None if it has none.

        Raises:
            ConfigError: the entry is malformed (naming ``where``).
        """
        raw = header.get(INFO_KEY)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            raise ConfigError(f"{where}: header entry {INFO_KEY!r} is not JSON") from None
        ok = (
            isinstance(data, dict)
            and isinstance(data.get("model"), str)
            and isinstance(data.get("kwargs"), dict)
            and isinstance(data.get("classes"), list)
            and all(isinstance(c, str) for c in data["classes"])
            and len(data["classes"]) >= 1
        )
        if not ok:
            raise ConfigError(f"{where}: header entry {INFO_KEY!r} lacks model, kwargs or a list of class names")
        preprocess = Preprocess.from_dict(data.get("preprocess"), f"{where}: {INFO_KEY} preprocess")
        return cls(data["model"], list(data["classes"]), preprocess, dict(data["kwargs"]))


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``C[i, j]`` = number of samples of true class i predicted as class j."""
    index = target.long() * num_classes + predicted.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def macro_f1(confusion: torch.Tensor) -> float:
    """Unweighted mean over classes of F1 = 2·TP / (2·TP + FP + FN); a class absent from both is skipped."""
    tp = confusion.diag().double()
    fp = confusion.sum(0).double() - tp
    fn = confusion.sum(1).double() - tp
    denominator = 2 * tp + fp + fn
    present = denominator > 0
    if not present.any():
        return 0.0
    return float((2 * tp[present] / denominator[present]).mean())


def _header(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    return read_metadata(path)


def load_classifier(
    model: str | os.PathLike[str],
    *,
    adapter: str | os.PathLike[str] | None = None,
    arch: str | None = None,
    size: int | None = None,
) -> tuple[nn.Module, ClassifierInfo]:
    """A classifier in eval mode and its :class:`ClassifierInfo`.

    ``model`` is a merged checkpoint a run wrote (its header names the architecture), any
    ``.safetensors``/``.pt`` weights file with ``arch``, or a torchvision/timm name (pretrained
    weights); ``adapter`` is loaded onto it (its head size taken from the adapter). The class
    names and preprocessing come from the adapter or the checkpoint; without either, classes are
    numbered and the preprocessing is the architecture's default at ``size`` (224).

    Raises:
        ConfigError: a weights file without a stored architecture and no ``arch``.
        AdapterFileError: a file does not fit the architecture.
    """
    path = Path(model)
    info = ClassifierInfo.from_header(_header(path), str(path))
    if adapter is not None:
        adapter_info = ClassifierInfo.from_header(_header(Path(adapter)), str(adapter))
        info = adapter_info or info
    if path.is_file():
        spec_arch = arch or (info.model if info is not None else None)
        if spec_arch is None:
            raise ConfigError(f"{path}: no architecture stored in the file; give one (--arch torchvision:resnet50)")
        network = load_base(str(path), arch=spec_arch, kwargs=info.kwargs if info is not None else None)
    else:
        network = load_base(str(model))
    if adapter is not None:
        fit_head(network, read_adapter(adapter).tensors)
        load_adapter(network, adapter)
    network.eval()
    if info is None:
        classes = [str(i) for i in range(_num_outputs(network))]
        name = arch or str(model)
        info = ClassifierInfo(name, classes, resolve_preprocess(network, size or 224))
    elif size is not None and size != info.preprocess.size:
        raise ConfigError(f"--size {size}: the run stored size {info.preprocess.size}; leave --size out")
    return network, info


def _num_outputs(network: nn.Module) -> int:
    head = network.get_submodule(classifier_names(network)[0])
    return int(head.weight.shape[0])  # type: ignore[index, union-attr]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Image files among ``paths``, folders searched recursively, in a sorted order.

    Raises:
        ConfigError: a path does not exist, or no image is found.
    """
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found += _images_in(path)
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"{path}: no such file or folder")
    if not found:
        raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {[str(p) for p in paths]}")
    return found


def _open(path: Path) -> Any:
    image_module = require("PIL.Image")
    try:
        with image_module.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable image ({exc})") from None


@torch.no_grad()
def _probabilities(model: nn.Module, info: ClassifierInfo, files: Sequence[Path], batch_size: int) -> torch.Tensor:
    transform = info.preprocess.eval_transform()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(files), batch_size):
        batch = torch.stack([transform(_open(p)) for p in files[start : start + batch_size]]).to(device)
        out.append(model(batch).float().softmax(-1).cpu())
    probs = torch.cat(out)
    if probs.shape[1] != len(info.classes):
        raise ConfigError(f"the model has {probs.shape[1]} outputs but {len(info.classes)} class names are stored")
    return probs


@dataclass
class Prediction:
    """The top classes of one image, most probable first."""

    path: str
    classes: list[str]
    probabilities: list[float]


def predict(
    model: nn.Module,
    info: ClassifierInfo,
    images: Sequence[str | os.PathLike[str]],
    *,
    top_k: int = 5,
    batch_size: int = 32,
) -> list[Prediction]:
    """The ``top_k`` classes and probabilities of each image (folders searched recursively)."""
    files = image_files(images)
    probs = _probabilities(model, info, files, batch_size)
    k = min(top_k, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    return [
        Prediction(str(path), [info.classes[i] for i in idx.tolist()], [round(v, 6) for v in vals.tolist()])
        for path, vals, idx in zip(files, values, indices, strict=True)
    ]


def evaluate(
    model: nn.Module, info: ClassifierInfo, folder: str | os.PathLike[str], *, batch_size: int = 32
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class recall and the confusion matrix on an ImageFolder-style ``folder``
    (one sub-folder per class, named as the model's classes; a sub-folder of another name is an error).

    Raises:
        ConfigError: a class folder the model does not know, or no images.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{root}: not a folder of class folders")
    files, labels = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if sub.name not in info.classes:
            raise ConfigError(f"{sub}: class {sub.name!r} is not one of the model's classes {info.classes}")
        found = _images_in(sub)
        files += found
        labels += [info.classes.index(sub.name)] * len(found)
    if not files:
        raise ConfigError(f"{root}: no images in its class folders")
    probs = _probabilities(model, info, files, batch_size)
    target = torch.tensor(labels)
    confusion = confusion_matrix(probs.argmax(1), target, len(info.classes))
    totals = confusion.sum(1)
    recall = {c: float(confusion[i, i] / totals[i]) for i, c in enumerate(info.classes) if totals[i] > 0}
    return {
        "images": len(files),
        "accuracy": float(confusion.diag().sum() / confusion.sum()),
        "macro_f1": macro_f1(confusion),
        "recall": recall,
        "confusion": confusion.tolist(),
        "classes": info.classes,
    }


def write_predictions(results: Sequence[Prediction], path: Path) -> None:
    """Write predictions to a ``.json`` file (a list of records) or a ``.csv`` (one row per image:
    path, then class and probability pairs, best first), atomically.

    Raises:
        ConfigError: ``path`` is neither ``.csv`` nor ``.json``.
    """
    if path.suffix == ".json":
        text = json.dumps([r.__dict__ for r in results], indent=1)
    elif path.suffix == ".csv":
        k = len(results[0].classes)  # top_k, or every class when there are fewer
        rows = [["path", *[f"{kind}{i + 1}" for i in range(k) for kind in ("class", "probability")]]]
        for r in results:
            rows.append([r.path, *[str(v) for pair in zip(r.classes, r.probabilities, strict=True) for v in pair]])
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        text = buffer.getvalue()
    else:
        raise ConfigError(f"--out {path}: give a .csv or .json file")
    write_text(path, text)
