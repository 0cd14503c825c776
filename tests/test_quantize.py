"""A frozen base held in int8 (vl.quantize_base): the math, LoRA and the other families on top, merges,
exports, and what is refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

import visionlora as vl
from tests.conftest import assert_rel_close, randomize_lora
from visionlora.quantize import dequantize, quantize_weight


def _float_twin(model: nn.Module) -> nn.Module:
    """A float copy of an int8 model whose weights are exactly the dequantized ones: the reference."""
    return vl.dequantize_base(copy.deepcopy(model))


def test_int8_weights_round_to_within_half_a_step_per_output_channel():
    w = torch.randn(16, 8, 3, 3) * torch.linspace(0.01, 3, 16).reshape(16, 1, 1, 1)
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (16, 1, 1, 1)
    assert int(q.abs().max()) == 127
    assert ((dequantize(q, scale) - w).abs() <= scale / 2 + 1e-7).all()
    assert torch.equal(quantize_weight(torch.zeros(4, 3))[0], torch.zeros(4, 3, dtype=torch.int8))


def test_a_resnet_base_in_int8_is_about_four_times_smaller_and_keeps_its_outputs_close():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    vl.quantize_base(model)
    after = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(f"resnet18 state: {before / 2**20:.1f} MB fp32 -> {after / 2**20:.1f} MB int8 ({before / after:.2f}x)")
    assert before / after >= 3.5
    assert not any(p.dtype == torch.float32 and p.ndim == 4 for p in model.parameters())  # no float conv weight left
    with torch.no_grad():
        assert_rel_close(model(x), expected, 3e-2)  # int8 rounding, not exact


@pytest.mark.parametrize(
    ("family", "order"),
    [("lora", "quantize first"), ("dora", "lora first"), ("loha", "quantize first"), ("lokr", "lora first")],
)
def test_adapters_train_on_an_int8_base_as_on_its_dequantized_float_twin(family, order):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    cfg = vl.LoraConfig(targets="preset:resnet-last-blocks", rank=4, family=family, trainable=["fc"])
    if order == "quantize first":
        vl.apply_lora(vl.quantize_base(model), cfg)
    else:
        vl.quantize_base(vl.apply_lora(model, cfg))
    randomize_lora(model, std=0.05)
    reference = _float_twin(model)
    x = torch.randn(2, 3, 32, 32)
    model.train(), reference.train()
    y, y_ref = model(x), reference(x)
    assert_rel_close(y, y_ref, 1e-5)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and grads  # the adapter and the head; never the base
    assert all(".adapters." in n or n.startswith("fc.") for n in grads)
    for name, grad in grads.items():
        assert_rel_close(grad, ref_grads[name], 1e-4)


def test_merging_into_int8_is_refused_and_a_float_merged_checkpoint_is_written_instead(tmp_path):
    torch.manual_seed(0)
    model = vl.quantize_base(torchvision.models.resnet18(num_classes=4).eval())
    vl.apply_lora(model, vl.LoraConfig(targets="preset:resnet-last-blocks", rank=4, trainable=["fc"]))
    randomize_lora(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(vl.MergeError, match="holds its base in 8 bits"):
        vl.merge(model)
    path = vl.export_merged(model, tmp_path / "merged.safetensors", dtype=torch.float16)
    state = load_file(path)
    assert not any(k.endswith(("weight_int8", "weight_scale")) for k in state)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    plain = torchvision.models.resnet18(num_classes=4).eval()
    plain.load_state_dict(state)
    with torch.no_grad():
        assert_rel_close(plain.float()(x), expected, 5e-3)  # fp16 weights
    adapter = vl.save_adapter(model, tmp_path / "a.safetensors")
    assert not any("int8" in k for k in load_file(adapter))  # the adapter file holds LoRA and the head only
    merged = vl.merge_and_unload(vl.dequantize_base(model))
    with torch.no_grad():
        assert_rel_close(merged(x), expected, 1e-5)


def test_a_model_quantized_by_torch_ao_is_refused_by_name_with_what_to_do():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    dynamic = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(vl.UnsupportedModuleError, match=r"quantize_dynamic.*vl\.quantize_base\(model\)"):
        vl.apply_lora(dynamic, vl.LoraConfig(targets="0"))
    with pytest.raises(vl.UnsupportedModuleError, match="quantize_dynamic"):
        vl.quantize_base(dynamic)
    with pytest.raises(vl.ConfigError, match="bits=3; valid: 8, or 4"):
        vl.quantize_base(model, bits=3)
    with pytest.raises(vl.ConfigError, match="bits=4 needs backend='bitsandbytes'"):
        vl.quantize_base(model, bits=4, backend="visionlora")
    with pytest.raises(vl.ConfigError, match="backend='gguf'; valid: 'auto', 'visionlora', 'bitsandbytes'"):
        vl.quantize_base(model, backend="gguf")  # type: ignore[arg-type]


def test_a_re_quantized_merged_checkpoint_is_four_times_smaller_and_loads_in_int8_or_float(tmp_path):
    torch.manual_seed(0)
    model = vl.quantize_base(torchvision.models.resnet18(num_classes=4).eval())  # a float base works alike
    vl.apply_lora(model, vl.LoraConfig(targets="preset:resnet-last-blocks", rank=4, trainable=["fc"]))
    assert model.fc.weight.requires_grad and model.fc.weight.dtype == torch.float32  # float again: it trains
    randomize_lora(model)
    x = torch.randn(2, 3, 64, 64)
    float_path = vl.export_merged(model, tmp_path / "merged.safetensors")
    path = vl.export_merged(model, tmp_path / "merged-int8.safetensors", quantize="int8", dtype=torch.float16)
    state, floats = load_file(path), load_file(float_path)
    assert sum(v.numel() * v.element_size() for v in state.values()) < 0.3 * sum(
        v.numel() * v.element_size() for v in floats.values()
    )
    # Every merged weight re-quantized from float32, per output channel; the head (trainable) stays float.
    for key in ("layer4.1.conv2.weight", "layer1.0.conv1.weight", "conv1.weight"):
        q, scale = quantize_weight(floats[key])
        assert torch.equal(state[f"{key}_int8"], q) and torch.equal(state[f"{key}_scale"], scale)
    assert "fc.weight" in state and state["fc.weight"].dtype == torch.float16
    assert state["layer4.1.conv2.weight_scale"].dtype == torch.float32
    # In int8: the architecture through quantize_base (the same skip), then a strict load.
    held = vl.quantize_base(torchvision.models.resnet18(num_classes=4).eval(), skip=["fc"])
    held.load_state_dict(state)
    plain = torchvision.models.resnet18(num_classes=4).eval()
    plain.load_state_dict(floats)
    with torch.no_grad():
        expected = plain(x)
        assert_rel_close(held.float()(x), expected, 3e-2)  # int8 rounding of the merged weights
        # In float, where a base is read (merge CLI, load_classifier, recipes' model.weights).
        from visionlora.io.weights import load_base

        loaded = load_base(str(path), arch="torchvision:resnet18", kwargs={"num_classes": 4}).eval()
        assert_rel_close(loaded.float()(x), held.float()(x), 1e-2)  # the same int8 weights, fp16 head
    with pytest.raises(vl.ConfigError, match=r"quantize='int4'; a merged checkpoint is re-quantized to 'int8'"):
        vl.export_merged(model, tmp_path / "x.safetensors", quantize="int4")  # type: ignore[arg-type]
