"""The README's examples and the quickstart run and do what the README says."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def python_block(containing: str) -> str:
    """The README's Python code block that contains ``containing``."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return next(block for block in blocks if containing in block)


def test_readme_usage_example_runs_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Stand in for "... train ...": give B non-zero values before the adapter is saved.
    trained = "torch.nn.init.normal_(model.layer4[0].conv1.adapters['default'].lora_B, std=0.1)"
    code = python_block("vl.save_adapter").replace("# ... train ...", trained)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    vl, plain, fresh, build = namespace["vl"], namespace["plain"], namespace["fresh"], namespace["build"]
    assert (tmp_path / "adapter.safetensors").is_file()
    assert not any(isinstance(m, vl.LoraLayer) for m in plain.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = plain.eval()(x)
        assert not torch.allclose(build().eval()(x), expected)
        assert torch.allclose(fresh.eval()(x), expected, rtol=1e-5, atol=1e-6)


def test_readme_adapter_switching_example_runs(tmp_path):
    import torchvision

    import visionlora as vl

    model = vl.apply_lora(torchvision.models.resnet18(), vl.LoraConfig(targets="layer4.*", rank=2))
    namespace = {"vl": vl, "model": model, "style_cfg": vl.LoraConfig(targets="layer4.*", rank=2)}
    exec(compile(python_block("vl.set_adapter"), "README.md", "exec"), namespace)
    assert vl.list_adapters(model) == ["default"]


def test_readme_rank_by_resolution_example_gives_the_ranks_its_comment_states():
    import torchvision

    import visionlora as vl

    namespace = {"vl": vl, "torch": torch, "model": torchvision.models.resnet18()}
    exec(compile(python_block("rank_by_resolution"), "README.md", "exec"), namespace)
    model = namespace["model"]
    assert model.layer3[0].conv1.adapter("default").rank == 16
    assert model.layer4[0].conv1.adapter("default").rank == 4


def test_readme_rank_schedule_example_holds_and_grows_the_ranks_as_its_comments_state():
    import torchvision

    import visionlora as vl

    grow = "held = vl.summary(model); grown = vl.grow_ranks(model, 500)"
    code = python_block("vl.grow_ranks").replace("vl.grow_ranks(model, step)", grow)
    namespace = {"vl": vl, "model": torchvision.models.resnet18()}
    exec(compile(code, "README.md", "exec"), namespace)
    held, grown = namespace["held"], namespace["grown"]
    assert "2 of 16" in held and "2 of 16" not in vl.summary(namespace["model"])
    assert set(grown["default"].values()) == {8} and grown["default"]["layer1.0.conv1"] == 8


def test_quickstart_compares_four_ways_and_reloads_merges_and_exports_exactly(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "visionlora", "quickstart", "--epochs", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    results = json.loads((out / "quickstart.json").read_text())
    methods = ["head only", "LoRA + head", "LoRA, cached prefix", "full fine-tuning"]
    assert [r["method"] for r in results["rows"]] == methods
    for lora in results["rows"][1:3]:  # above chance (5 classes) after 1 epoch
        assert lora["trainable_percent"] < 2.0 and lora["val_accuracy"] > 0.2
    assert results["rows"][3]["trainable_percent"] == 100.0
    assert results["reload_accuracy_diff"] == 0.0
    assert results["merge_max_abs_diff"] <= 1e-5 * results["output_scale"]
    assert results["files"] == ["adapter-peft", "adapter.safetensors", "base.safetensors", "merged.safetensors"]
    for row in results["rows"]:  # every row is a recipe run with its own folder
        run = json.loads((out / row["run"] / "metrics.json").read_text())
        assert run["epochs"] == 1 and run["val_accuracy"] == row["val_accuracy"]
    _peft_reproduces_the_merged_model(out)
    assert "| LoRA + head | 1.54 % |" in result.stdout


def _peft_reproduces_the_merged_model(out):
    """PEFT's own loader puts the exported folder on the quickstart's base: the merged model's outputs."""
    import peft
    import torchvision
    from safetensors.torch import load_file

    merged = torchvision.models.resnet18(num_classes=5).eval()
    merged.load_state_dict(load_file(out / "merged.safetensors"))
    base = torchvision.models.resnet18(num_classes=5).eval()
    base.load_state_dict(load_file(out / "base.safetensors"))
    loaded = peft.PeftModel.from_pretrained(base, str(out / "adapter-peft")).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = merged(x)
        assert (loaded(x) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_readme_preset_example_runs_with_local_weights():
    import timm

    import visionlora as vl

    code = python_block("vl.replace_head").replace("pretrained=True", "pretrained=False")  # no hub here
    namespace = {"vl": vl, "timm": timm}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["heads"] == ["fc"]
    assert len(vl.state.lora_layers(namespace["model"])) == 10  # layer4: 3 blocks x 3 convs + downsample


def test_readme_recipe_key_table_is_the_one_the_dataclasses_give():
    from visionlora.train.keys import keys_table, recipe_keys
    from visionlora.train.recipe import RECIPES

    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- recipe-keys:[^\n]*-->\n(.*?)<!-- /recipe-keys -->", text, flags=re.S)
    assert found, "README.md has no recipe-keys block"
    assert found.group(1) == keys_table(), "README.md's recipe keys are stale: run python -m visionlora.train.keys"
    undocumented = [k.key for cls in RECIPES.values() for k in recipe_keys(cls) if not k.doc]
    assert not undocumented, f"recipe fields without a docstring: {undocumented}"


def test_readme_family_examples_build_configs_that_apply():
    import torchvision

    import visionlora as vl
    from tests.conftest import tiny_unet

    lines = [line for line in python_block('family="dora"').splitlines() if line.startswith("cfg = ")]
    assert len(lines) == 4
    for line in lines:
        namespace: dict = {"vl": vl}
        exec(compile(line, "README.md", "exec"), namespace)
        cfg = namespace["cfg"]
        model = tiny_unet() if "unet" in line else torchvision.models.resnet18()
        vl.apply_lora(model, cfg)
        families = {m.adapter("default").family for m in model.modules() if isinstance(m, vl.LoraLayer)}
        assert families == ({"lokr", "dora"} if cfg.family_pattern else {cfg.family}), line
