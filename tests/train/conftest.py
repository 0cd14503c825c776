"""Tiny image-folder data made from scikit-learn's bundled digits, and a tiny classifier recipe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def digit_folder(root: Path, digits: tuple[int, ...] = (0, 1, 2), per_class: int = 12, split: bool = False) -> Path:
    """PNG images of the chosen digits (16×16 grey) in ImageFolder layout: root/<digit>/*.png,
    or root/train/... and root/val/... with ``split``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    counts = dict.fromkeys(digits, 0)
    for image, label in zip(data.images, data.target, strict=True):
        if label not in counts or counts[label] >= per_class:
            continue
        part = ("val" if counts[label] % 4 == 0 else "train") if split else ""
        folder = root / part / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * 255 / 16).clip(0, 255).astype("uint8")
        Image.fromarray(pixels).resize((16, 16)).save(folder / f"{counts[label]:03d}.png")
        counts[label] += 1
    return root


def side_by_side(commands: list[list[str]], env: dict[str, str]) -> list[subprocess.CompletedProcess[str]]:
    """Run ``commands`` at the same time (each with OMP_NUM_THREADS=1 in ``env``: a one-process run beside
    a two-process one shares the 2 cores instead of waiting for them) and return each one's result."""
    running = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands
    ]
    results = []
    for command, process in zip(commands, running, strict=True):
        out, err = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    return results


def torchrun(processes: int) -> list[str]:
    """The start of a command line running ``processes`` CPU processes under torchrun (``--standalone``:
    torchrun picks a free port itself, so runs in a row or side by side do not race for one)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def tiny_recipe(data: Path, **train: object) -> dict:
    return {
        "task": "classifier",
        "model": {"name": "torchvision:resnet18", "weights": "none"},
        "data": {"root": str(data), "image_size": 32, "batch_size": 8, "val_fraction": 0.25},
        "lora": {"targets": ["preset:resnet-last-blocks"], "rank": 4, "alpha": 8, "rank_by_resolution": {2: 8, 0: 4}},
        "train": {"epochs": 2, "lr": 0.01, "head_lr": 0.01, "warmup_steps": 1, "seed": 0, **train},
        "output": {"dir": str(data.parent / "run")},
    }


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    return digit_folder(tmp_path_factory.mktemp("digits") / "data")


def run_shipped_recipe(name: str, pipeline, images, out, resolution: int, *overrides: str) -> dict:
    """Run ``recipes/<name>`` for 2 steps on a tiny local pipeline and images: its keys as shipped,
    only sizes, steps and paths overridden; checks the merged pipeline and both exports were written."""
    from visionlora.train import load_recipe, run_recipe

    path = Path(__file__).parents[2] / "recipes" / name
    settings = [
        f"model.pipeline={pipeline}",
        f"data.root={images}",
        f"data.resolution={resolution}",
        "data.bucket_step=8",
        f"data.bucket_min_side={min(16, resolution // 2)}",
        f"data.bucket_max_side={2 * resolution}",
        "train.max_steps=2",
        "validation.steps=2",
        "validation.every=null",
        "output.merged_dtype=fp32",
        *overrides,
    ]
    if name.startswith("dreambooth"):
        settings += ["dreambooth.num_class_images=2", "dreambooth.class_steps=2"]
    else:
        settings += ["data.caption=zz style"]
    metrics = run_recipe(load_recipe(path, settings), output=out, progress=False)
    assert metrics["steps"] == 2 and (out / "merged" / "model_index.json").is_file()
    assert (out / "adapter-kohya.safetensors").is_file() and (out / "adapter-diffusers.safetensors").is_file()
    return metrics
