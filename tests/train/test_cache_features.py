"""``data.cache_features``: the classifier recipe trains on cached frozen-prefix features, with the same result."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from visionlora.errors import ConfigError
from visionlora.train import load_recipe, run_recipe
from visionlora.train.recipe import parse_recipe

pytest.importorskip("accelerate")

TINY = Path(__file__).parents[2] / "recipes" / "classifier-tiny.yaml"


def _recipe(digits_root: Path, cache: bool, **train: object):
    # The tiny ViT has no BatchNorm and no dropout, so eval-mode prefix features are exactly what
    # the uncached run computes: the two runs must train the same adapter.
    return load_recipe(
        TINY,
        overrides=[
            f"data.root={digits_root}",
            "data.augment=false",
            f"data.cache_features={str(cache).lower()}",
            "model.kwargs.depth=3",
            "lora.targets=[blocks.2.attn.qkv, blocks.2.attn.proj]",
            *(f"train.{k}={v}" for k, v in train.items()),
        ],
    )


def test_cached_run_trains_the_adapter_of_an_uncached_run(digits_root, tmp_path):
    metrics = {}
    for cache in (False, True):
        recipe = _recipe(digits_root, cache, max_steps=4)
        metrics[cache] = run_recipe(recipe, output=tmp_path / str(cache), progress=False)
    plain, cached = (load_file(tmp_path / str(c) / "adapter.safetensors") for c in (False, True))
    assert plain.keys() == cached.keys() and any("head" in k for k in plain)
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-4, atol=1e-6, msg=key)
    assert metrics[True]["val_accuracy"] == metrics[False]["val_accuracy"]
    assert abs(metrics[True]["val_loss"] - metrics[False]["val_loss"]) < 1e-4
    # The merged checkpoint is the whole network, not only the part after the prefix.
    merged = load_file(tmp_path / "True" / "merged.safetensors")
    assert "patch_embed.proj.weight" in merged and "blocks.0.attn.qkv.weight" in merged


def test_cached_run_resumes_to_the_uninterrupted_adapter(digits_root, tmp_path):
    recipe = _recipe(digits_root, True, max_steps=4, checkpoint_every=2, keep_checkpoints=3)
    whole = tmp_path / "whole"
    run_recipe(recipe, output=whole, progress=False)
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    metrics = run_recipe(recipe, output=resumed, resume="latest", progress=False)
    a = load_file(whole / "adapter.safetensors")
    b = load_file(resumed / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics["steps"] == 4


def test_cache_features_needs_augmentation_off(digits_root):
    with pytest.raises(ConfigError, match=r"data\.cache_features: True is invalid; expected false while data\.augment"):
        parse_recipe(
            {
                "task": "classifier",
                "model": {"name": "resnet18", "weights": "none"},
                "data": {"root": str(digits_root), "cache_features": True},
                "lora": {"targets": ["layer4.*"]},
            }
        )
