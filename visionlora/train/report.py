"""The PNG report: loss/accuracy curves, confusion matrix, worst-classified images, loss per step
(the classification metrics themselves live in :mod:`visionlora.classify`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from visionlora._deps import require
from visionlora.classify import confusion_matrix, macro_f1

__all__ = ["confusion_matrix", "macro_f1", "plot_confusion", "plot_curves", "plot_losses", "plot_worst", "pyplot"]


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend."""
    require("matplotlib").use("Agg")
    return require("matplotlib.pyplot")


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` as a PNG and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(history: list[dict[str, Any]], path: Path) -> Path:
    """Train/val loss and val accuracy per epoch, one PNG."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    left.plot(epochs, [h["val_loss"] for h in history], marker="o", label="val")
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    left.legend()
    right.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="val top-1")
    right.plot(epochs, [h["val_macro_f1"] for h in history], marker="o", label="val macro-F1")
    right.set(xlabel="epoch", ylim=(0, 1.02), title="accuracy")
    right.legend()
    return _save(plt, fig, path)


def plot_confusion(confusion: torch.Tensor, classes: list[str], path: Path) -> Path:
    """The validation confusion matrix as a PNG heat map with counts."""
    plt = pyplot()
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n, 1.0 + 0.45 * n))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title="validation confusion")
    ax.set_xticklabels(classes, rotation=90)
    ax.set_yticklabels(classes)
    top = max(int(confusion.max()), 1)
    for i in range(n):
        for j in range(n):
            value = int(confusion[i, j])
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
    return _save(plt, fig, path)


def plot_worst(images: list[tuple[torch.Tensor, int, int, float]], classes: list[str], path: Path) -> Path:
    """A grid of the worst-classified validation images (highest loss first), each titled with its
    true class, the predicted one and the prediction's probability."""
    plt = pyplot()
    columns = 4
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, true, predicted, probability) in zip(axes.flat, images, strict=False):
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(f"true {classes[true]}\npred. {classes[predicted]} ({probability:.0%})", fontsize=8)
    if not images:
        axes.flat[0].text(0.5, 0.5, "every validation image is classified correctly", ha="center", va="center")
    fig.suptitle("worst-classified validation images")
    return _save(plt, fig, path)


def plot_losses(losses: list[float], validated: list[tuple[int, float]] | None, path: Path) -> Path:
    """Loss per optimizer step (and a running mean), with the validation loss at its steps if given; one PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=1, label="step")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(range(1, len(losses) + 1), smooth, lw=2, label=f"mean of {window}")
    if validated:
        ax.plot([s for s, _ in validated], [v for _, v in validated], "o-", lw=2, label="validation")
    ax.set(xlabel="step", ylabel="loss", title="noise-prediction loss")
    ax.legend()
    return _save(plt, fig, path)
