"""The recipes on a GPU (marked ``gpu``): a few steps of the classifier, style and SDXL recipes in bf16
and fp16 (the grad scaler), with finite losses and a resumed run equal to an uninterrupted one, and
a two-process DDP run when two devices are visible.

Skipped without CUDA. ``scripts/gpu_check.sh --smoke`` runs them on the CPU
(``VISIONLORA_GPU_TESTS=cpu``): bf16 autocast only, as fp16's grad scaler needs CUDA.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import GPU_TESTS_DEVICE, needs_gpu
from tests.train.conftest import tiny_recipe, torchrun
from tests.train.test_diffusion import _recipe as style_recipe
from tests.train.test_diffusion import style  # noqa: F401 (the fixture)
from tests.train.test_sdxl import _recipe as sdxl_recipe
from tests.train.test_sdxl import xl  # noqa: F401 (the fixture)
from visionlora.train import run_recipe
from visionlora.train.recipe import parse_recipe

pytestmark = [pytest.mark.gpu, needs_gpu]
PRECISIONS = ["bf16", pytest.param("fp16", marks=pytest.mark.skipif(GPU_TESTS_DEVICE != "cuda", reason="CUDA"))]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit for bit on the CPU; on CUDA within 1e-3 of each tensor's largest value (cuDNN's and cuBLAS'
    kernels may sum in another order from one run to the next)."""
    assert a.keys() == b.keys()
    for key in a:
        if GPU_TESTS_DEVICE == "cpu":
            assert torch.equal(a[key], b[key]), key
        else:
            assert (a[key] - b[key]).abs().max() <= 1e-3 * a[key].abs().max().clamp_min(1e-12), key


def _resumes(recipe, tmp_path: Path, step: int) -> dict:
    """Run ``recipe`` whole, then again from its checkpoint at ``step``; compare the adapters."""
    whole = run_recipe(recipe, output=tmp_path / "whole", progress=False)
    name = f"step-{step:06d}"
    shutil.copytree(tmp_path / "whole" / "checkpoints" / name, tmp_path / "resumed" / "checkpoints" / name)
    resumed = run_recipe(recipe, output=tmp_path / "resumed", resume="latest", progress=False)
    adapters = [load_file(tmp_path / run / "adapter.safetensors") for run in ("whole", "resumed")]
    _same(*adapters)
    assert resumed["steps"] == whole["steps"]
    return whole


@pytest.mark.parametrize("precision", PRECISIONS)
def test_classifier_recipe_in_mixed_precision_has_finite_losses_and_resumes(precision, digits_root, tmp_path):
    recipe = parse_recipe(
        tiny_recipe(digits_root, mixed_precision=precision, max_steps=4, checkpoint_every=2, keep_checkpoints=2)
    )
    recipe.lora.family_pattern = {"layer4.1.*": "dora"}  # DoRA's norm under autocast too
    metrics = _resumes(recipe, tmp_path, 2)
    assert metrics["steps"] == 4 and all(math.isfinite(e["train_loss"]) for e in metrics["history"])
    assert math.isfinite(metrics["val_loss"]) and metrics["val_accuracy"] >= 0


@pytest.mark.parametrize("precision", PRECISIONS)
def test_style_recipe_in_mixed_precision_has_finite_losses_and_resumes(precision, style, tmp_path):  # noqa: F811
    recipe = style_recipe(style, mixed_precision=precision, max_steps=4, checkpoint_every=2, keep_checkpoints=2)
    metrics = _resumes(recipe, tmp_path, 2)
    assert len(metrics["losses"]) == 4 and all(math.isfinite(x) for x in metrics["losses"])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_sdxl_recipe_in_mixed_precision_has_finite_losses_and_resumes(precision, xl, tmp_path):  # noqa: F811
    recipe = sdxl_recipe(xl, mixed_precision=precision, max_steps=4, checkpoint_every=2, keep_checkpoints=2)
    metrics = _resumes(recipe, tmp_path, 2)
    assert len(metrics["losses"]) == 4 and all(math.isfinite(x) for x in metrics["losses"])


@pytest.mark.skipif(GPU_TESTS_DEVICE != "cuda" or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_under_ddp_give_the_adapter_of_one_with_the_same_global_batch(digits_root, tmp_path):
    path = tmp_path / "recipe.json"  # JSON is YAML
    path.write_text(json.dumps(tiny_recipe(digits_root, max_steps=3, mixed_precision="bf16")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, launcher in (("one", [sys.executable, "-m", "visionlora"]), ("two", [*torchrun(2), "-m", "visionlora"])):
        command = [*launcher, "train", str(path), "--output", str(tmp_path / name)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["distributed"] == "MULTI_GPU"
    one, two = load_file(tmp_path / "one" / "adapter.safetensors"), load_file(tmp_path / "two" / "adapter.safetensors")
    for key in one:  # bf16 autocast, sums in another order: 1e-2 of each tensor's largest value
        assert (one[key] - two[key]).abs().max() <= 1e-2 * one[key].abs().max(), key
