"""Recipes with ``model.quantize: int8``: the run trains on an int8 base and writes float merged weights."""

from __future__ import annotations

import torch
import torchvision
from safetensors.torch import load_file

import visionlora as vl
from tests.train.conftest import tiny_recipe
from visionlora.train import run_recipe
from visionlora.train.recipe import parse_recipe


def test_a_classifier_run_on_an_int8_base_writes_a_float_merged_checkpoint_with_the_adapters_outputs(
    digits_root, tmp_path
):
    from tests.train.test_classifier import _adapted_training_base

    raw = tiny_recipe(digits_root, max_steps=2)
    raw["model"]["quantize"] = "int8"
    run_recipe(parse_recipe(raw), output=tmp_path / "run", progress=False)
    state = load_file(tmp_path / "run" / "merged.safetensors")
    assert not any("int8" in k for k in state) and state["fc.weight"].dtype == torch.float32
    plain = torchvision.models.resnet18(num_classes=3).eval()
    plain.load_state_dict(state)
    adapted = vl.quantize_base(_adapted_training_base(tmp_path / "run"))  # the head stays float (trainable)
    assert adapted.fc.weight.dtype == torch.float32 and isinstance(adapted.fc, torch.nn.Linear)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), adapted(x), rtol=1e-4, atol=1e-5)


def test_int8_is_for_lora_runs_only():
    import pytest

    raw = tiny_recipe(__import__("pathlib").Path("/nonexistent"))
    raw["model"]["quantize"] = "int8"
    raw["train"]["mode"] = "full"
    with pytest.raises(vl.ConfigError, match=r"model.quantize: 'int8' is invalid; expected none unless train.mode"):
        parse_recipe(raw)
