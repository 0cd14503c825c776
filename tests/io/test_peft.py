"""PEFT adapter folders: written ones load in peft and reproduce outputs; peft's own load in visionlora."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from safetensors.torch import load_file

import visionlora as vl
from tests.conftest import assert_rel_close, randomize_lora, tiny_net

peft = pytest.importorskip("peft")

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def _trained_resnet():
    """ResNet-18 with a 7-class head, LoRA on the stem conv1 (a name that ends other names) and layer4,
    per-layer ranks and alphas, and BatchNorm statistics changed by a train-mode pass."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=7).eval()
    base = copy.deepcopy(model.state_dict())
    cfg = vl.LoraConfig(
        targets=["conv1", "layer4.*"],
        rank=4,
        alpha=8.0,
        rank_pattern={"layer4.1.*": 2},
        alpha_pattern={"layer4.0.conv2": 1.5},
        trainable=["fc"],
    )
    vl.apply_lora(model, cfg)
    randomize_lora(model, std=0.05)
    model.train()
    with torch.no_grad():
        model(X)
        model.fc.weight.mul_(1.5)
    return model.eval(), base


def _fresh(base):
    model = torchvision.models.resnet18(num_classes=7).eval()
    model.load_state_dict(base)
    return model


def test_peft_folder_loads_in_peft_and_reproduces_outputs(tmp_path):
    model, base = _trained_resnet()
    folder = vl.export_adapter(model, tmp_path / "peft", format="peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["rank_pattern"] == {"^layer4\\.1\\.conv1$": 2, "^layer4\\.1\\.conv2$": 2}
    assert config["alpha_pattern"] == {"^layer4\\.0\\.conv2$": 1.5}
    bns = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert set(config["modules_to_save"]) == {"fc"} | {n for n in bns if ".downsample" not in n} | {
        "layer2.0.downsample.1",
        "layer3.0.downsample.1",
        "layer4.0.downsample.1",
    }
    loaded = peft.PeftModel.from_pretrained(_fresh(base), str(folder)).eval()
    adapted = [n for n, m in loaded.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(adapted) == 1 + 5  # conv1 only, not layer1.0.conv1 & co.; layer4's convs
    with torch.no_grad():
        expected = model(X)
        assert_rel_close(loaded(X), expected, 1e-5)
        plain = _fresh(base)(X)
    assert (expected - plain).abs().max() > 0.1  # the adapter matters


def test_peft_folder_round_trips_through_visionlora_unchanged(tmp_path):
    model, base = _trained_resnet()
    folder = vl.export_adapter(model, tmp_path / "peft", format="peft")
    file = vl.read_adapter(folder)
    assert file.format == "peft"
    original = vl.read_adapter(vl.save_adapter(model, tmp_path / "a.safetensors"))
    assert file.layers == original.layers and file.config == original.config
    fresh = vl.load_adapter(_fresh(base), folder)
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))


def test_fp16_export_is_fp16_and_still_loads_in_peft(tmp_path):
    model, base = _trained_resnet()
    folder = vl.export_adapter(model, tmp_path / "peft16", format="peft", dtype=torch.float16)
    tensors = load_file(folder / "adapter_model.safetensors")
    assert {t.dtype for k, t in tensors.items() if "num_batches" not in k} == {torch.float16}
    loaded = peft.PeftModel.from_pretrained(_fresh(base), str(folder)).eval()
    with torch.no_grad():
        assert_rel_close(loaded.float()(X), model(X), 2e-3)


def test_layers_peft_would_run_differently_are_refused_by_name(tmp_path):
    net = vl.apply_lora(tiny_net(), vl.LoraConfig(targets=["stem", "block.0", "block.2"], rank=2))
    with pytest.raises(vl.AdapterFileError) as info:
        vl.export_adapter(net, tmp_path / "p", format="peft")
    message = str(info.value)
    assert "block.0: groups=2, dilation=(2, 2), padding_mode='reflect'" in message
    assert "block.2: groups=8, padding_mode='circular'" in message
    assert "stem" not in message
    assert not (tmp_path / "p").exists()


def test_adapter_written_by_peft_loads_in_visionlora_with_its_outputs(tmp_path):
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=5).eval()
    state = copy.deepcopy(base.state_dict())
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["layer4.0.conv1", "layer4.1.conv2", "fc"],
        rank_pattern={"fc": 2},
        alpha_pattern={"conv2": 3},
        use_rslora=True,
        bias="lora_only",
    )
    peft_model = peft.get_peft_model(base, cfg)
    randomize_lora(peft_model, std=0.05)
    with torch.no_grad():
        peft_model.base_model.model.fc.base_layer.bias.add_(1.0)  # a trained LoRA-layer bias
    peft_model.save_pretrained(str(tmp_path / "from_peft"))
    file = vl.read_adapter(tmp_path / "from_peft")
    assert file.format == "peft" and file.config.rslora
    assert {n: (s.rank, s.alpha) for n, s in file.layers.items()} == {
        "layer4.0.conv1": (4, 6.0),
        "layer4.1.conv2": (4, 3.0),
        "fc": (2, 6.0),
    }
    fresh = torchvision.models.resnet18(num_classes=5).eval()
    fresh.load_state_dict(state)
    vl.load_adapter(fresh, tmp_path / "from_peft")
    with torch.no_grad():
        assert_rel_close(fresh(X), peft_model.eval()(X), 1e-5)


def test_peft_options_visionlora_cannot_reproduce_are_refused(tmp_path):
    model, _ = _trained_resnet()
    folder = vl.export_adapter(model, tmp_path / "peft", format="peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["use_dora"] = True  # without the magnitudes it needs
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(vl.AdapterFileError, match=r"use_dora is set but layers .* have no lora_magnitude_vector"):
        vl.read_adapter(folder)
    (folder / "adapter_config.json").write_text(json.dumps(config | {"use_dora": False, "lora_bias": True}))
    with pytest.raises(vl.AdapterFileError, match=r"does not reproduce: \['lora_bias'\]"):
        vl.read_adapter(folder)
    (folder / "adapter_config.json").write_text(json.dumps(config | {"use_dora": False, "peft_type": "LOHA"}))
    with pytest.raises(vl.AdapterFileError, match="peft_type is 'LOHA'"):
        vl.read_adapter(folder)


def test_nested_and_suffix_matched_modules_to_save_still_load_in_peft(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(6, 6)
            self.head = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.LayerNorm(6))
            self.head.scale = torch.nn.Parameter(torch.ones(6))  # a parameter of its own, besides its children
            self.aux_head = torch.nn.Sequential(torch.nn.Linear(6, 3))

        def forward(self, x):
            return self.aux_head(self.head(self.body(x)) * self.head.scale)

    torch.manual_seed(0)
    net = Net()
    base = copy.deepcopy(net.state_dict())
    vl.apply_lora(net, vl.LoraConfig(targets=["body"], rank=2, trainable=["head"]))
    randomize_lora(net)
    with torch.no_grad():
        net.head.scale.mul_(2)
    folder = vl.export_adapter(net, tmp_path / "p", format="peft")
    assert json.loads((folder / "adapter_config.json").read_text())["modules_to_save"] == ["head"]
    fresh = Net()
    fresh.load_state_dict(base)
    loaded = peft.PeftModel.from_pretrained(fresh, str(folder))
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert_rel_close(loaded(x), net(x), 1e-6)
    clash = Net()
    vl.apply_lora(clash, vl.LoraConfig(targets=["aux_head.0"], rank=2, trainable=["head"]))
    with pytest.raises(vl.AdapterFileError, match=r"'head' would also select 'aux_head', which holds or sits in LoRA"):
        vl.export_adapter(clash, tmp_path / "clash", format="peft")


def test_an_unrelated_folder_is_never_replaced(tmp_path):
    model, _ = _trained_resnet()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(vl.AdapterFileError, match=r"no adapter_config\.json"):
        vl.export_adapter(model, tmp_path / "mine", format="peft")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"rank_pattern": ["x"]}, "rank_pattern=\\['x'\\]"),
        ({"lora_dropout": "x"}, "lora_dropout='x'"),
        ({"modules_to_save": "fc"}, "modules_to_save='fc'"),
        ({"r": 0}, "r=0"),
    ],
)
def test_malformed_peft_configs_are_named(tmp_path, entry, message):
    model, _ = _trained_resnet()
    folder = vl.export_adapter(model, tmp_path / "peft", format="peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | entry))
    with pytest.raises(vl.AdapterFileError, match=message):
        vl.read_adapter(folder)
    (folder / "adapter_config.json").write_text("[" * 100_000)
    with pytest.raises(vl.AdapterFileError, match="not a readable JSON file"):
        vl.read_adapter(folder)


def test_peft_adapters_on_convs_peft_runs_differently_are_refused_on_import(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding="same", dilation=2))
    peft_model = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=2, target_modules=["0"]))
    peft_model.save_pretrained(str(tmp_path / "p"))
    with pytest.raises(vl.AdapterFileError, match=r"0: dilation=\(2, 2\); peft's own LoRA layer runs this conv"):
        vl.load_adapter(net, tmp_path / "p")
    assert not any(isinstance(m, vl.LoraLayer) for m in net.modules())


def test_a_conv_adapter_read_from_peft_converts_to_the_other_formats(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3)
    peft_model = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=3, target_modules=["layer4.0.conv1"]))
    randomize_lora(peft_model)
    peft_model.save_pretrained(str(tmp_path / "p"))
    for fmt in ("kohya", "diffusers", "visionlora"):
        out = vl.export_adapter(tmp_path / "p", tmp_path / f"x.{fmt}.safetensors", format=fmt)
        assert vl.read_adapter(out).layers == vl.read_adapter(tmp_path / "p").layers


def test_an_fp16_export_that_would_overflow_is_refused(tmp_path):
    model, _ = _trained_resnet()
    with torch.no_grad():
        model.fc.weight.fill_(1e6)
    with pytest.raises(vl.AdapterFileError, match=r"NaN/Inf in \['base_model.model.fc.weight'\]"):
        vl.export_adapter(model, tmp_path / "p16", format="peft", dtype=torch.float16)
    assert not (tmp_path / "p16").exists()
