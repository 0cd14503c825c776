"""``visionlora quickstart``: head-only vs LoRA vs full fine-tuning on data that ships with
scikit-learn, every row a run of the classifier recipe with its defaults.

1. Digits 0-4 and 5-9 (scikit-learn's 8×8 digits, scaled to 32×32) are written as image folders.
2. A ResNet-18 (built locally, no download) is trained in full on digits 0-4 (``train.mode: full``):
   the "pretrained" base, saved as a merged checkpoint.
3. On digits 5-9 (new classes, new head) the recipe runs from that base four ways: ``train.mode:
   head``; ``lora`` (LoRA on every residual block, ranks by resolution); the same with the frozen stem cached
   (``data.cache_features``); ``full``. Augmentation is off in every row (these are 32-px digits).
4. The LoRA run's adapter is loaded onto the base file, checked against the run's own validation
   accuracy, merged (outputs compared with the unmerged model's), and exported for PEFT.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from visionlora._deps import require
from visionlora.classify import evaluate, load_classifier
from visionlora.io import export_adapter
from visionlora.io.files import write_text
from visionlora.merge import merge_and_unload
from visionlora.train.recipe import apply_overrides, parse_recipe
from visionlora.train.run import run_recipe

__all__ = ["PRETRAIN", "ROWS", "QuickstartResult", "digit_folders", "quickstart_recipe", "run_quickstart"]

SIZE = 32

ROWS: dict[str, list[str]] = {
    "head only": ["train.mode=head"],
    "LoRA + head": [],
    "LoRA, cached prefix": ["data.cache_features=true"],
    "full fine-tuning": ["train.mode=full", "train.lr=1e-3", "train.head_lr=1e-3"],
}
"""The rows on digits 5-9: ``--set`` overrides of :func:`quickstart_recipe` (LoRA: the recipe's defaults)."""

PRETRAIN = ["train.mode=full", "train.lr=2e-3", "train.head_lr=2e-3"]
"""Overrides of :func:`quickstart_recipe` that train the base on digits 0-4."""


def digit_folders(root: Path) -> tuple[Path, Path]:
    """``root/a/{train,val}/digit<0-4>/*.png`` and ``root/b/.../digit<5-9>/*.png``: scikit-learn's digits
    as 32×32 grey images, every fifth image of each task held out for validation."""
    image_module = require("PIL.Image")
    data = require("sklearn.datasets").load_digits()
    for i, (image, label) in enumerate(zip(data.images, data.target, strict=True)):
        split = "val" if i % 5 == 0 else "train"
        folder = root / ("a" if label < 5 else "b") / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * 255 / 16).clip(0, 255).astype("uint8")
        image_module.fromarray(pixels).resize((SIZE, SIZE), image_module.BILINEAR).save(folder / f"{i:04d}.png")
    return root / "a", root / "b"


def quickstart_recipe(data: Path, weights: str, epochs: int, seed: int, overrides: list[str]) -> dict[str, Any]:
    """The classifier recipe the quickstart runs: ResNet-18, LoRA on every residual block (rank 8 where
    feature maps are 4 px or more, i.e. layer1-2 at 32 px input, else 4), the recipe's defaults."""
    recipe = {
        "task": "classifier",
        "model": {"name": "torchvision:resnet18", "weights": weights},
        "data": {"root": str(data), "image_size": SIZE, "batch_size": 32, "augment": False},
        "lora": {"targets": ["preset:resnet-blocks"], "rank": 8, "alpha": 16, "rank_by_resolution": {4: 8, 0: 4}},
        "train": {"epochs": epochs, "seed": seed},
        "output": {"keep_best": False},
    }
    return apply_overrides(recipe, overrides)


@dataclass
class QuickstartResult:
    """What the quickstart measured; ``rows`` is the printed table."""

    rows: list[dict[str, Any]]
    base_accuracy: float
    reload_accuracy_diff: float
    """|the reloaded adapter's val. accuracy - the run's own|."""
    merge_max_abs_diff: float
    """Max |merged - unmerged| output of the reloaded model on the validation images."""
    output_scale: float
    files: list[str]


def run_quickstart(out: str | Path, *, epochs: int = 6, seed: int = 0, echo: bool = True) -> QuickstartResult:
    """Run the comparison (see the module docstring), write its files to ``out``, print the table.

    ``out`` gets ``base.safetensors``, the LoRA run's ``adapter.safetensors`` and ``merged.safetensors``,
    ``adapter-peft/``, ``quickstart.json``, and ``data/`` and ``runs/`` (every run's own folder).
    """
    for needed in ("torchvision", "sklearn", "PIL"):  # before any work: a missing one is named at once
        require(needed)
    out = Path(out)
    say = print if echo else (lambda *a, **k: None)
    task_a, task_b = digit_folders(out / "data")
    runs = out / "runs"

    def run(name: str, recipe: dict[str, Any]) -> dict[str, Any]:
        return run_recipe(parse_recipe(recipe), output=runs / name, progress=False, overwrite=True)

    say(f"1. pre-training a ResNet-18 in full on digits 0-4 ({task_a}) ...")
    base_metrics = run("base", quickstart_recipe(task_a, "none", epochs, seed, PRETRAIN))
    base = out / "base.safetensors"
    shutil.copyfile(runs / "base" / "merged.safetensors", base)
    rows = []
    for method, overrides in ROWS.items():
        say(f"2. digits 5-9: {method} ...")
        started = time.perf_counter()
        folder = _slug(method)
        metrics = run(folder, quickstart_recipe(task_b, str(base), epochs, seed, overrides))
        rows.append(
            {
                "method": method,
                "trainable_percent": metrics["trainable_percent"],
                "val_accuracy": metrics["val_accuracy"],
                "seconds": time.perf_counter() - started,
                "run": f"runs/{folder}",
            }
        )

    say("3. reload, merge, export ...")
    lora_row = rows[1]
    lora_run = out / lora_row["run"]
    shutil.copyfile(lora_run / "adapter.safetensors", out / "adapter.safetensors")
    shutil.copyfile(lora_run / "merged.safetensors", out / "merged.safetensors")
    fresh, info = load_classifier(base, adapter=out / "adapter.safetensors")
    reloaded = evaluate(fresh, info, task_b / "val")
    export_adapter(fresh, out / "adapter-peft", format="peft", overwrite=True)  # PeftModel.from_pretrained loads it
    x = torch.randn(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        unmerged = fresh(x)
        merge_err = float((merge_and_unload(fresh)(x) - unmerged).abs().max())
    files = sorted(p.name for p in out.iterdir() if p.name not in ("data", "runs"))
    result = QuickstartResult(
        rows,
        base_metrics["val_accuracy"],
        abs(reloaded["accuracy"] - lora_row["val_accuracy"]),
        merge_err,
        float(unmerged.abs().max()),
        files,
    )
    if echo:
        _print(result, out)
    write_text(out / "quickstart.json", json.dumps(result.__dict__, indent=1))
    return result


def _slug(method: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in method.lower()).strip("-")


def _print(result: QuickstartResult, out: Path) -> None:
    print(f"\nbase (digits 0-4, trained in full): val. accuracy {result.base_accuracy:.3f}\n")
    print("| digits 5-9 | trainable | val. accuracy | time |")
    print("| --- | --- | --- | --- |")
    for row in result.rows:
        cells = (
            row["method"],
            f"{row['trainable_percent']:.2f} %",
            f"{row['val_accuracy']:.3f}",
            f"{row['seconds']:.1f} s",
        )
        print("| " + " | ".join(cells) + " |")
    print(f"\nthe LoRA adapter loaded onto a fresh base ({out / 'base.safetensors'}):")
    print(f"  val. accuracy minus the run's own: {result.reload_accuracy_diff:.2g}")
    print(
        f"  max abs. difference merged vs unmerged (outputs up to {result.output_scale:.1f}): "
        f"{result.merge_max_abs_diff:.2g}"
    )
    print("  (adapter-peft/ loads with peft.PeftModel.from_pretrained onto the same base)")
    print(f"\nfiles in {out}: {', '.join(result.files)}; each run's folder is under runs/")
