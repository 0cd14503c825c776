"""Training recipes with ``lora.family``: each family trains, resumes bit for bit, and what a run writes
(adapter, merged checkpoint, exports) gives the trained outputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torchvision
from safetensors.torch import load_file

import visionlora as vl
from tests.train.conftest import tiny_recipe
from visionlora.train import run_recipe
from visionlora.train.recipe import parse_recipe


@pytest.mark.parametrize(
    ("family", "extra"),
    [("dora", {}), ("loha", {"tucker": True}), ("lokr", {"lokr_factor": 4, "decompose_both": True})],
)
def test_a_classifier_run_trains_each_family_and_its_files_give_the_trained_outputs(
    family, extra, digits_root, tmp_path
):
    raw = tiny_recipe(digits_root, max_steps=3, checkpoint_every=2, keep_checkpoints=2)
    raw["lora"] |= {"family": family, **extra}
    raw["output"] = {"export": ["peft"] if family == "dora" else []}  # PEFT holds LoRA and DoRA
    recipe = parse_recipe(raw)
    run_recipe(recipe, output=tmp_path / "run", progress=False)
    adapter = tmp_path / "run" / "adapter.safetensors"
    assert {s.family for s in vl.read_adapter(adapter).layers.values()} == {family}
    # The merged checkpoint, the adapter on the base the run started from, and the kohya export
    # (through its kept record) give the same outputs.
    from tests.train.test_classifier import _adapted_training_base

    plain = torchvision.models.resnet18(num_classes=3).eval()
    plain.load_state_dict(load_file(tmp_path / "run" / "merged.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = _adapted_training_base(tmp_path / "run")(x)
        assert torch.allclose(plain(x), expected, rtol=1e-4, atol=1e-5)
    if family == "dora":
        assert json.loads((tmp_path / "run" / "adapter-peft" / "adapter_config.json").read_text())["use_dora"] is True
    # resume from the mid-run checkpoint: the same adapter bit for bit
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    run_recipe(recipe, output=resumed, resume="latest", progress=False)
    a, b = load_file(adapter), load_file(resumed / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith({"dora": ".magnitude", "loha": ".hada_t1", "lokr": ".lokr_w2_a"}[family]) for k in a)


def test_a_recipe_exporting_loha_to_peft_is_refused_before_training(digits_root):
    raw = tiny_recipe(digits_root)
    raw["lora"]["family"] = "loha"
    raw["output"] = {"export": ["peft"]}
    with pytest.raises(
        vl.ConfigError, match=r"output.export: .* peft holds lora, dora \(one per model\); the adapter trains loha"
    ):
        parse_recipe(raw)
