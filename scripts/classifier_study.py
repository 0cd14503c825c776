"""Head only vs LoRA vs full fine-tuning through the classifier recipe, on two real datasets that
ship inside installed packages, over several seeds; prints a markdown table (mean ± std).

Every run is the quickstart's recipe (``visionlora.train.quickstart``: ResNet-18, LoRA on every
residual block with ranks by resolution, augmentation off, the recipe's defaults) with a row's
overrides. Tasks (each: the ResNet-18 pre-trained in full here on task A, then adapted to task B):
- ``digits``: the quickstart's own data and rows; A = digits 0-4, B = digits 5-9.
- ``textures``: scikit-image's bundled photos; A = patches of 6 everyday photos (camera, coins,
  page, text, astronaut, coffee), B = patches of 5 textures (brick, grass, gravel, cell, moon),
  training patches from the left three quarters of each image, validation from the rest.

    pip install scikit-image   # for --task textures
    python scripts/classifier_study.py --task textures --seeds 0 1 2 --rows head lora-0.1 lora full
    python scripts/classifier_study.py --task digits --rows lora --set train.batchnorm=train
    python scripts/classifier_study.py --task digits --rows r16 grown-2-16 r2   # rank schedules

Rows are named variants of the recipe (see ROWS); ``--set`` adds overrides to every row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visionlora.train import run_recipe
from visionlora.train.quickstart import PRETRAIN, SIZE, digit_folders, quickstart_recipe
from visionlora.train.quickstart import ROWS as QUICKSTART_ROWS
from visionlora.train.recipe import parse_recipe

# The recipe as it was before the defaults study (issue 20), and the quickstart's rows (today's defaults).
OLD_LORA = [
    "lora.targets=[preset:resnet-last-blocks]",
    "lora.rank=8",
    "lora.alpha=16",
    "lora.rank_by_resolution={14: 16, 0: 4}",
    "train.warmup_steps=100",
    "train.batchnorm=train",
    "train.label_smoothing=0.0",
    "train.lr=1e-3",
    "train.head_lr=1e-2",
    "train.weight_decay=1e-4",
    "train.decay_norm_and_bias=true",
]
# Rank schedules (issue 24): one rank on every block, at the same scale alpha / r = 2.
FIXED_RANK = ["lora.rank_by_resolution={}"]
ROWS: dict[str, list[str]] = {
    "head": QUICKSTART_ROWS["head only"],
    "lora-0.1": OLD_LORA,
    "lora": QUICKSTART_ROWS["LoRA + head"],
    "full": QUICKSTART_ROWS["full fine-tuning"],
    "r16": [*FIXED_RANK, "lora.rank=16", "lora.alpha=32"],
    "grown-2-16": [*FIXED_RANK, "lora.rank=16", "lora.alpha=32", "lora.rank_schedule={0: 2, 0.33: 8, 0.67: 16}"],
    "r2": [*FIXED_RANK, "lora.rank=2", "lora.alpha=4"],
}


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).resize((SIZE, SIZE), Image.BILINEAR).save(path)


def _grey(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else (image[..., :3].astype(np.float64) @ [0.299, 0.587, 0.114]).astype(np.uint8)


def _patches(image: np.ndarray, folder: Path, count: int, columns: tuple[float, float], rng: Any) -> None:
    height, width = image.shape
    left, right = int(columns[0] * width), int(columns[1] * width)
    for i in range(count):
        side = int(rng.integers(48, 97))
        side = min(side, right - left, height)
        y = int(rng.integers(0, height - side + 1))
        x = int(rng.integers(left, right - side + 1))
        _save(image[y : y + side, x : x + side], folder / f"{i:04d}.png")


def textures_folders(root: Path) -> tuple[Path, Path]:
    """root/a/{train,val}/<photo>/ and root/b/{train,val}/<texture>/ patches (grey, 32×32)."""
    import skimage.data as sk

    rng = np.random.default_rng(0)
    for part, names, per_class in (
        ("a", ["camera", "coins", "page", "text", "astronaut", "coffee"], 150),
        ("b", ["brick", "grass", "gravel", "cell", "moon"], 100),
    ):
        for name in names:
            image = _grey(getattr(sk, name)())
            _patches(image, root / part / "train" / name, per_class, (0.0, 0.75), rng)
            _patches(image, root / part / "val" / name, per_class // 4, (0.75, 1.0), rng)
    return root / "a", root / "b"


def run(recipe: dict[str, Any], out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    metrics = run_recipe(parse_recipe(recipe), output=out, progress=False, overwrite=True)
    metrics["wall"] = time.perf_counter() - started
    return metrics


def pretrain(task_a: Path, work: Path, epochs: int) -> Path:
    """Task A trained in full from fresh weights: the "pretrained" base of task B."""
    out = work / "base"
    if not (out / "merged.safetensors").is_file():
        recipe = quickstart_recipe(task_a, "none", epochs, 0, PRETRAIN)
        metrics = run(recipe, out)
        print(f"base: task A val. accuracy {metrics['val_accuracy']:.3f} ({metrics['wall']:.0f} s)")
    return out / "merged.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["digits", "textures"], default="digits")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help=f"from {list(ROWS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--set", action="append", default=[], help="override for every row, e.g. train.lr=3e-3")
    parser.add_argument("--work", help="folder for data and runs (default: a temporary one; reused if given)")
    parser.add_argument("--json", help="append every run's result to this JSON-lines file")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="visionlora-study-")) / args.task
    data = work / "data"
    if not data.is_dir():
        (digit_folders if args.task == "digits" else textures_folders)(data)
    task_a, task_b = data / "a", data / "b"
    base = pretrain(task_a, work, args.pretrain_epochs)
    table = []
    for row in args.rows:
        results = []
        for seed in args.seeds:
            recipe = quickstart_recipe(task_b, str(base), args.epochs, seed, [*ROWS[row], *args.set])
            metrics = run(recipe, work / "runs" / f"{row}-{seed}")
            results.append(metrics)
            if args.json:
                with open(args.json, "a") as f:
                    record = {"task": args.task, "row": row, "seed": seed, "set": args.set, "epochs": args.epochs}
                    keys = ("val_accuracy", "val_macro_f1", "trainable_percent", "seconds", "wall")
                    f.write(json.dumps({**record, **{k: metrics[k] for k in keys}}) + "\n")
        accs = [m["val_accuracy"] for m in results]
        table.append(
            (
                row,
                f"{results[0]['trainable_percent']:.2f} %",
                f"{statistics.mean(accs):.3f} ± {statistics.stdev(accs) if len(accs) > 1 else 0:.3f}",
                f"{statistics.mean(m['seconds'] / m['epochs'] for m in results):.1f} s",
            )
        )
        print(f"{row}: {' '.join(f'{a:.3f}' for a in accs)}", flush=True)
    print(f"\n{args.task}, {args.epochs} epochs, seeds {args.seeds}, --set {args.set}\n")
    print("| row | trainable | val. accuracy | time per epoch |\n| --- | --- | --- | --- |")
    for cells in table:
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
