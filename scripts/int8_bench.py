"""LoRA on a frozen base held in int8 (vl.quantize_base) against the same on fp32: memory, step time, accuracy.

    python scripts/int8_bench.py                       # both tables (CPU: about 6 minutes on 2 cores)
    python scripts/int8_bench.py --only speed --repeats 10

speed: the ResNet-50 benchmark of scripts/bench.py (LoRA r=8 on every layer4 conv, the head trained,
batch 8 at 128 px on CPU): the frozen model's state in MB and one training step, rounds interleaved.
quality: the quickstart's task (digits 5-9 on a ResNet-18 pre-trained on digits 0-4, the recipe's
default LoRA), once on the fp32 base and once with ``model.quantize: int8``, over seeds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # scripts/bench.py: the timing helpers and benchmark models

import visionlora as vl


def state_mb(model: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20


def speed(args: argparse.Namespace) -> None:
    base, x, y, targets = bench.resnet_setup(args.device)
    cfg = vl.LoraConfig(targets=targets, rank=8, alpha=8, trainable=["fc"])
    models = {"fp32 base": vl.apply_lora(copy.deepcopy(base), cfg)}
    models["int8 base"] = vl.quantize_base(vl.apply_lora(copy.deepcopy(base), cfg))
    steps = {name: bench.train_step(m.train(), lambda m: F.cross_entropy(m(x), y))[0] for name, m in models.items()}
    times = bench.rounds(steps, args.repeats, 1, args.device)
    print(f"\n| ResNet-50, LoRA r=8 on layer4 + head ({args.device}) | model state, MB | s/step | ratio to fp32 |")
    print("| --- | --- | --- | --- |")
    for name, m in models.items():
        ratio = bench.paired_ratio(times, name, "fp32 base")
        print(f"| {name} | {state_mb(m):.1f} | {statistics.median(times[name]):.3f} | {ratio:.2f} |")


def quality(args: argparse.Namespace) -> None:
    from visionlora.train.quickstart import PRETRAIN, digit_folders, quickstart_recipe
    from visionlora.train.recipe import parse_recipe
    from visionlora.train.run import run_recipe

    scores: dict[str, list[float]] = {"fp32 base": [], "int8 base": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        task_a, task_b = digit_folders(root / "data")
        for seed in args.seeds:
            out = root / str(seed)
            pretrain = quickstart_recipe(task_a, "none", args.epochs, seed, PRETRAIN)
            run_recipe(parse_recipe(pretrain), output=out / "base", progress=False)
            base = str(out / "base" / "merged.safetensors")
            for name, overrides in (("fp32 base", []), ("int8 base", ["model.quantize=int8"])):
                recipe = parse_recipe(quickstart_recipe(task_b, base, args.epochs, seed, overrides))
                scores[name].append(run_recipe(recipe, output=out / name[:4], progress=False)["val_accuracy"])
            print(f"seed {seed}: " + ", ".join(f"{n}: {s[-1]:.3f}" for n, s in scores.items()), flush=True)
    print_scores(f"digits 5-9, quickstart LoRA, {len(args.seeds)} seeds", scores)


def print_scores(title: str, scores: dict[str, list[float]]) -> None:
    """The accuracy table: mean ± sd and range over seeds, one row per contender."""
    print(f"\n| {title} | val. accuracy mean ± sd | min – max |")
    print("| --- | --- | --- |")
    for name, s in scores.items():
        print(f"| {name} | {statistics.mean(s):.3f} ± {statistics.pstdev(s):.3f} | {min(s):.3f} – {max(s):.3f} |")


def run_tables(doc: str, tables: dict[str, Callable[[argparse.Namespace], None]], repeats: int, **extra: int) -> None:
    """Parse the shared options (``--only``, ``--device``, ``--repeats``, ``--seeds``; ``extra`` as ints)
    and print the tables asked for."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(tables), default=list(tables))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    for name, default in extra.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    for name, table in tables.items():
        if name in args.only:
            table(args)


if __name__ == "__main__":
    run_tables(__doc__, {"speed": speed, "quality": quality}, repeats=8, epochs=6)
