"""bitsandbytes bases: its 8-bit (LLM.int8) and 4-bit (NF4/FP4) Linears under LoRA and the other families,
built by ``vl.quantize_base`` or already in the model; merges refused, float and int8 merged exports,
adapter files, training. bitsandbytes' CPU kernels run them here; skipped without bitsandbytes."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import visionlora as vl
from tests.conftest import randomize_lora
from visionlora.bnb import bnb_bits, from_bnb, held_numel, held_weight, to_bnb

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_bnb_cpu_kernel")

KINDS = [(8, "nf4"), (4, "nf4"), (4, "fp4")]


IDS = ["int8", "nf4", "fp4"]


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def float_forward(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The textbook output: each layer on (its dequantized W) + its adapters' ΔW, plus bias."""
    for module in model:
        if isinstance(module, vl.LoraLayer):
            weight = held_weight(module.base).float() + module.delta_weight(torch.float32)
            x = F.linear(x, weight, module.base.bias)
        elif bnb_bits(module):
            x = F.linear(x, held_weight(module).float(), module.bias)
        else:
            x = module(x)
    return x


@pytest.mark.parametrize(("bits", "kind"), KINDS, ids=IDS)
def test_the_float_weight_read_back_is_the_one_the_layer_computes_with(bits, kind):
    linear = mlp()[0]
    layer = to_bnb(linear, bits, kind).train()  # LLM.int8 also quantizes the input in eval mode
    assert bnb_bits(layer) == bits and bnb_bits(linear) is None
    x = torch.randn(5, 16)
    weight = held_weight(layer)
    assert torch.allclose(layer(x), F.linear(x, weight.float(), linear.bias), atol=1e-5)
    assert torch.equal(held_weight(layer), weight)  # also once forward has moved LLM.int8's scales
    error = (weight.float() - linear.weight).abs().max(dim=1).values / linear.weight.abs().max(dim=1).values
    assert error.max() <= (0.6 / 127 if bits == 8 else 0.5)  # int8: half a step per row (of the fp16 weight)
    back = from_bnb(layer)
    assert type(back) is nn.Linear and torch.equal(back.weight, weight) and torch.equal(back.bias, linear.bias)


@pytest.mark.parametrize("family", ["lora", "dora", "loha", "lokr"])
@pytest.mark.parametrize(("bits", "kind"), KINDS, ids=IDS)
def test_each_family_on_a_bitsandbytes_base_is_its_formula_on_the_dequantized_weight(bits, kind, family):
    model = vl.quantize_base(mlp(), bits, backend="bitsandbytes", quant_type=kind)
    assert [bnb_bits(m) for m in model] == [bits, None, bits]
    vl.apply_lora(model, vl.LoraConfig(targets=["0", "2"], rank=2, alpha=4, family=family))
    randomize_lora(model)
    for name, p in model.named_parameters():  # DoRA's magnitude away from ‖W‖ too
        if name.endswith("magnitude"):
            p.data.mul_(1.5)
    x = torch.randn(5, 16, requires_grad=True)
    out = model.train()(x)
    torch.testing.assert_close(out, float_forward(model, x.detach()), rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for m in (model[0].base, model[2].base) for p in m.parameters())


@pytest.mark.parametrize(("bits", "kind"), KINDS, ids=IDS)
def test_in_eval_the_lora_branch_is_added_to_bitsandbytes_own_output(bits, kind):
    model = vl.quantize_base(mlp(), bits, backend="bitsandbytes", quant_type=kind).eval()
    vl.apply_lora(model, vl.LoraConfig(targets=["0"], rank=2, alpha=4))
    randomize_lora(model)
    layer, x = model[0], torch.randn(5, 16)
    adapter = layer.adapter("default")
    with torch.no_grad():
        expected = layer.base(x) + F.linear(F.linear(x, adapter.lora_A), adapter.lora_B) * adapter.scale
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_quantizing_before_or_after_apply_lora_and_layers_bitsandbytes_built_give_the_same_model():
    config = vl.LoraConfig(targets=["0", "2"], rank=2, alpha=4)
    before = vl.quantize_base(mlp(), 4, backend="bitsandbytes")
    vl.apply_lora(before, config)
    after = vl.apply_lora(mlp(), config)
    vl.quantize_base(after, 4, backend="bitsandbytes")
    # As diffusers / transformers build a model for a BitsAndBytesConfig: bitsandbytes' layers, float
    # weights loaded, quantized by .to(device).
    built = nn.Sequential(
        bnb.nn.Linear4bit(16, 32, quant_type="nf4"), nn.ReLU(), bnb.nn.Linear4bit(32, 8, quant_type="nf4")
    )
    built.load_state_dict(mlp().state_dict())
    built = built.to("cpu")
    for module in built:
        if bnb_bits(module):
            module.compute_dtype = torch.float32
    vl.apply_lora(built, config)
    for model in (before, after, built):
        randomize_lora(model)
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = before.train()(x)
        assert torch.equal(after.train()(x), expected) and torch.equal(built.train()(x), expected)
    assert {type(m[0].base).__name__ for m in (before, after, built)} == {"Linear4bit"}


def test_merging_is_refused_and_the_merged_exports_hold_the_dequantized_weight_plus_delta(tmp_path):
    model = vl.quantize_base(mlp(), 4, backend="bitsandbytes")
    vl.apply_lora(model, vl.LoraConfig(targets=["0", "2"], rank=2, alpha=4, family="dora"))
    randomize_lora(model)
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = model.train()(x)
    packed = model[0].base.weight.data.clone()
    for merge in (vl.merge, vl.merge_and_unload):
        with pytest.raises(vl.MergeError, match=r"'0' holds its base in 4 bits .*vl\.export_merged"):
            merge(model)
    assert torch.equal(model[0].base.weight.data, packed) and isinstance(model[0], vl.LoraLayer)

    state = load_file(vl.export_merged(model, tmp_path / "merged.safetensors"))
    plain = mlp(seed=1)
    assert set(state) == set(plain.state_dict())  # no packed weights, absmax or quant_state keys
    plain.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)

    state = load_file(vl.export_merged(model, tmp_path / "int8.safetensors", quantize="int8"))
    assert sorted(k for k in state if k.endswith("_int8")) == ["0.weight_int8", "2.weight_int8"]
    held = vl.quantize_base(mlp(seed=1), backend="visionlora")
    held.load_state_dict(state)  # strict: the visionlora int8 model of the same architecture
    with torch.no_grad():
        torch.testing.assert_close(held(x), expected, rtol=0, atol=0.02)

    vl.dequantize_base(model)
    assert type(model[0].base) is nn.Linear and not model[0].weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        vl.merge(model)  # now a float base
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_a_merged_folder_of_a_model_loaded_quantized_drops_its_quantization_config(tmp_path):
    pytest.importorskip("diffusers")
    from tests.conftest import tiny_unet, unet_input

    unet = tiny_unet()
    # What diffusers records on a model loaded with a BitsAndBytesConfig (that load needs CUDA).
    unet.register_to_config(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    vl.quantize_base(unet, 4, backend="bitsandbytes", skip=["conv_in", "conv_out"])
    vl.apply_lora(unet, vl.LoraConfig(targets="preset:unet-attention", rank=2))
    randomize_lora(unet)
    with torch.no_grad():
        expected = unet(**unet_input()).sample
    vl.export_merged(unet, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["_class_name"] == "UNet2DConditionModel"
    merged = type(unet).from_pretrained(tmp_path / "merged")
    assert not any(bnb_bits(m) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(**unet_input()).sample, expected, rtol=1e-4, atol=1e-4)


def test_adapter_files_from_a_bitsandbytes_base_load_on_it_and_on_the_float_model(tmp_path):
    model = vl.quantize_base(mlp(), 8, backend="bitsandbytes")
    vl.apply_lora(model, vl.LoraConfig(targets=["0", "2"], rank=2, alpha=4, family="loha"))
    randomize_lora(model)
    path = vl.save_adapter(model, tmp_path / "adapter.safetensors")
    x = torch.randn(5, 16)
    again = vl.load_adapter(vl.quantize_base(mlp(), 8, backend="bitsandbytes"), path)
    with torch.no_grad():
        assert torch.equal(again.train()(x), model.train()(x))
        on_float = vl.load_adapter(mlp(), path)
        delta = on_float(x) - mlp()(x)  # the same adapters on the float weights
        base = float_forward(vl.quantize_base(mlp(), 8, backend="bitsandbytes"), x)
        torch.testing.assert_close(delta, model(x) - base)


def test_lora_on_an_nf4_base_learns_digits_and_the_base_never_changes():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))  # a random frozen base
    vl.quantize_base(model, 4, backend="bitsandbytes")
    vl.apply_lora(model, vl.LoraConfig(targets=["0", "2"], rank=8, alpha=16))
    packed = [model[i].base.weight.data.clone() for i in (0, 2)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = torch.randint(0, 1400, (64,), generator=generator)
        loss = F.cross_entropy(model.train()(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (model.eval()(x[1400:]).argmax(1) == y[1400:]).float().mean().item()
    assert accuracy > 0.85, accuracy  # the random base alone: about 0.1
    assert all(torch.equal(model[i].base.weight.data, p) for i, p in zip((0, 2), packed, strict=True))


def test_the_frozen_weights_take_4x_less_memory_in_8_bits_and_6x_less_in_4():
    def nbytes(model: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))

    def square() -> nn.Module:
        return nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))

    full = nbytes(square())
    eight = nbytes(vl.quantize_base(square(), 8, backend="bitsandbytes"))
    four = nbytes(vl.quantize_base(square(), 4, backend="bitsandbytes"))
    assert full / eight > 3.5 and full / four > 6, (full / eight, full / four)


def test_bad_settings_and_a_missing_bitsandbytes_are_named(monkeypatch):
    with pytest.raises(vl.ConfigError, match="quant_type='int4'; bitsandbytes' 4-bit types are 'nf4' and 'fp4'"):
        vl.quantize_base(mlp(), 4, quant_type="int4")  # type: ignore[arg-type]
    with pytest.raises(vl.ConfigError, match="bits=2"):
        to_bnb(mlp()[0], 2)
    with pytest.raises(vl.UnsupportedModuleError, match=r"itself an nn.Linear.*nn.Sequential\(linear\)"):
        vl.quantize_base(nn.Linear(4, 4), 4)
    assert type(vl.quantize_base(mlp())[0]).__name__ == "Int8Linear"  # auto, 8 bits: visionlora's int8
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(vl.MissingDependencyError, match=r"'bitsandbytes'.*visionlora\[bnb\]"):
        vl.quantize_base(mlp(), 4)


def test_fsdp_refuses_a_bitsandbytes_base_by_name_before_sharding():
    accelerate = pytest.importorskip("accelerate")
    from types import SimpleNamespace

    from visionlora.train.sharding import check_fsdp

    fsdp = SimpleNamespace(distributed_type=accelerate.utils.DistributedType.FSDP)
    with pytest.raises(vl.ConfigError, match=r"FSDP: '0' is a bitsandbytes layer.*model.quantize: int8"):
        check_fsdp(fsdp, vl.quantize_base(mlp(), 4))


def test_a_weight_bitsandbytes_repacked_for_its_cpu_kernel_reads_back_and_stays_packed():
    functional = pytest.importorskip("bitsandbytes.functional")
    if not hasattr(functional, "_convert_weight_packed_for_cpu"):
        pytest.skip(f"bitsandbytes {bnb.__version__} does not repack for a CPU kernel")
    torch.manual_seed(0)
    layer = to_bnb(nn.Linear(64, 64), 4)
    expected = held_weight(layer)
    weight = layer.weight
    weight.data, weight.quant_state = functional._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    packed = weight.data.clone()
    read = held_weight(layer)  # bitsandbytes' inverse restores the scales to within their rounding
    assert (read - expected).abs().max() <= 2e-3 * expected.abs().max()
    assert torch.equal(held_weight(layer), read)  # reading leaves the layer as it was
    assert torch.equal(weight.data, packed) and weight.quant_state.packing_format_for_cpu


def test_llm_int8_keeps_its_scales_through_a_state_dict_and_its_dtype_through_dequantizing():
    torch.manual_seed(0)
    layer = to_bnb(nn.Linear(16, 32).to(torch.bfloat16), 8)
    other = to_bnb(nn.Linear(16, 32).to(torch.bfloat16), 8)
    other.load_state_dict(layer.state_dict())  # bitsandbytes reads its SCB back into a quantized layer
    assert torch.equal(held_weight(other), held_weight(layer)) and held_weight(layer).dtype == torch.bfloat16
    assert from_bnb(layer).weight.dtype == torch.bfloat16


def test_trainable_modules_and_biases_still_train_on_a_bitsandbytes_base():
    model = vl.quantize_base(mlp(), 4)
    vl.apply_lora(model, vl.LoraConfig(targets=["0"], rank=2, trainable=["2"]))
    assert type(model[2]) is nn.Linear and model[2].weight.requires_grad  # made float to train in full
    biased = vl.apply_lora(mlp(), vl.LoraConfig(targets=["0", "2"], rank=2, bias="lora_only"))
    vl.quantize_base(biased, 4)  # after apply_lora, as the recipes do
    assert bnb_bits(biased[0].base) == 4 and biased[0].base.bias.requires_grad
    biased.train()(torch.randn(4, 16)).sum().backward()
    assert biased[0].base.bias.grad is not None and biased[0].base.bias.grad.abs().sum() > 0
    float_count = sum(p.numel() for p in mlp().parameters())
    assert sum(held_numel(p) for p in vl.quantize_base(mlp(), 4).parameters()) == float_count
    text = vl.summary(vl.apply_lora(vl.quantize_base(mlp(), 4), vl.LoraConfig(targets=["0"], rank=8)))
    assert f"384 of {float_count + 384:,}" in text  # LoRA: 8 · (16 + 32)


def test_extracting_a_lora_against_a_bitsandbytes_base_uses_its_dequantized_weight():
    base = vl.quantize_base(mlp(), 8, backend="bitsandbytes")
    tuned = mlp()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i in (0, 2):
            low_rank = torch.randn(tuned[i].out_features, 2, generator=g) @ torch.randn(
                2, tuned[i].in_features, generator=g
            )
            tuned[i].weight.copy_(held_weight(base[i]) + 0.1 * low_rank)
    vl.extract_lora(base, tuned, vl.LoraConfig(targets=["0", "2"], rank=2, alpha=2))
    for i in (0, 2):
        expected = tuned[i].weight - held_weight(base[i].base)
        torch.testing.assert_close(base[i].delta_weight(), expected, rtol=1e-4, atol=1e-5)
