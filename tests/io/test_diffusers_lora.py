"""diffusers LoRA files: exact through every diffusers loading path, for any alpha and per-layer ranks."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

import visionlora as vl
from tests.conftest import assert_rel_close, randomize_lora, tiny_pipeline, tiny_unet, unet_input
from tests.conftest import unet_from as _fresh
from tests.conftest import unet_output as _out

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def adapted():
    """A tiny UNet with attention LoRA: ranks 8/4/2 by resolution and per-layer alphas (none equal to its rank)."""
    unet = tiny_unet()
    base = copy.deepcopy(unet.state_dict())
    cfg = vl.LoraConfig(
        targets=["preset:unet-attention"],
        rank=4,
        alpha=6.0,
        rank_by_resolution={16: 8, 8: 4},
        rank_pattern={"*.to_out.0": 2},
        alpha_pattern={"*.attn2.*": 1.0},
    )
    vl.apply_lora(unet, cfg, example_input=unet_input(1))
    randomize_lora(unet, std=0.05)
    with torch.no_grad():
        expected = unet(**unet_input()).sample
    return unet, base, expected


def test_the_adapter_has_per_layer_ranks_and_alphas_that_are_not_the_rank(adapted, tmp_path):
    unet, _, _ = adapted
    layers = vl.read_adapter(vl.save_adapter(unet, tmp_path / "a.safetensors")).layers.values()
    assert {s.rank for s in layers} == {8, 4, 2}
    assert {s.alpha for s in layers} == {6.0, 1.0} and all(s.alpha != s.rank for s in layers)


def test_model_load_lora_adapter_without_weight_name_is_exact(adapted, tmp_path):
    unet, base, expected = adapted
    path = vl.export_adapter(unet, tmp_path / "lora.safetensors", format="diffusers")
    fresh = _fresh(base)
    fresh.load_lora_adapter(str(path), prefix="unet")  # no weight_name: diffusers drops the header here
    assert_rel_close(_out(fresh), expected, 1e-5)
    assert (expected - _out(_fresh(base))).abs().max() > 1e-2  # the adapter matters


def test_lora_state_dict_then_load_lora_adapter_is_exact(adapted, tmp_path):
    unet, base, expected = adapted
    path = vl.export_adapter(unet, tmp_path / "lora.safetensors", format="diffusers")
    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(path))
    fresh = _fresh(base)
    fresh.load_lora_adapter(state, network_alphas=alphas, prefix="unet")
    assert_rel_close(_out(fresh), expected, 1e-5)


def test_pipeline_load_lora_weights_is_exact_and_reads_the_header(adapted, tmp_path):
    unet, base, expected = adapted
    path = vl.export_adapter(unet, tmp_path / "lora.safetensors", format="diffusers")
    with safe_open(str(path), "pt") as f:
        assert "lora_adapter_metadata" in f.metadata()
    folder = tiny_pipeline(tmp_path / "pipe", _fresh(base))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.load_lora_weights(str(path))
    assert_rel_close(_out(pipe.unet), expected, 1e-5)


def test_fp16_export_loads_in_diffusers(adapted, tmp_path):
    unet, base, expected = adapted
    path = vl.export_adapter(unet, tmp_path / "lora16.safetensors", format="diffusers", dtype=torch.float16)
    with safe_open(str(path), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118
    fresh = _fresh(base)
    fresh.load_lora_adapter(str(path), prefix="unet")
    assert_rel_close(_out(fresh), expected, 2e-3)


def test_visionlora_reads_its_export_back_with_the_original_ranks_and_alphas(adapted, tmp_path):
    unet, base, expected = adapted
    path = vl.export_adapter(unet, tmp_path / "lora.safetensors", format="diffusers")
    native = vl.read_adapter(vl.save_adapter(unet, tmp_path / "native.safetensors"))
    back = vl.read_adapter(path)
    assert back.format == "diffusers"
    assert back.layers == native.layers and back.config == native.config
    for key, tensor in native.tensors.items():
        assert_rel_close(back.tensors[key], tensor, 1e-6)
    fresh = vl.load_adapter(_fresh(base), path)
    assert_rel_close(_out(fresh), expected, 1e-5)


def test_file_written_by_diffusers_loads_in_visionlora(tmp_path):
    unet = tiny_unet()
    base = copy.deepcopy(unet.state_dict())
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], rank_pattern={"to_out.0": 2}
    )
    unet.add_adapter(config)
    randomize_lora(unet, std=0.05)
    expected = _out(unet)
    state = peft.get_peft_model_state_dict(unet)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "theirs"), unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict()
    )
    path = tmp_path / "theirs" / "pytorch_lora_weights.safetensors"
    file = vl.read_adapter(path)
    assert file.format == "diffusers"
    assert {s.alpha for s in file.layers.values()} == {8.0}
    assert {s.rank for n, s in file.layers.items() if n.endswith("to_out.0")} == {2}
    fresh = vl.load_adapter(_fresh(base), tmp_path / "theirs")  # the folder works too
    assert_rel_close(_out(fresh), expected, 1e-5)


def test_trained_non_lora_tensors_are_refused_by_name(tmp_path):
    net = vl.apply_lora(
        torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)),
        vl.LoraConfig(targets=["0"], rank=2, trainable=["1"]),
    )
    with pytest.raises(
        vl.AdapterFileError, match=r"holds LoRA weights only; this adapter also trains \['1.bias', '1.weight'\]"
    ):
        vl.export_adapter(net, tmp_path / "x.safetensors", format="diffusers")
    assert not (tmp_path / "x.safetensors").exists()


def test_other_components_and_unknown_keys_are_listed(adapted, tmp_path):
    unet, _, _ = adapted
    path = vl.export_adapter(unet, tmp_path / "lora.safetensors", format="diffusers")
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    from safetensors.torch import save_file

    save_file(tensors | {"vae.decoder.x.lora_A.weight": torch.zeros(2, 4)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(vl.AdapterFileError, match=r"1 keys cannot be mapped onto a pipeline component: \['vae.deco"):
        vl.read_adapter(tmp_path / "vae.safetensors")
    # A text encoder's keys are its own component's: the UNet reads past them, the text encoder reads them.
    save_file(tensors | {"text_encoder.layers.0.q_proj.lora_A.weight": torch.zeros(2, 4)}, str(tmp_path / "te.st"))
    ranks = {n: s.rank for n, s in vl.read_adapter(path).layers.items()}
    assert {n: s.rank for n, s in vl.read_adapter(tmp_path / "te.st").layers.items()} == ranks
    with pytest.raises(vl.AdapterFileError, match=r"layer 'layers.0.q_proj' has only one of its two LoRA matrices"):
        vl.read_adapter(tmp_path / "te.st", component="text_encoder")
    save_file(tensors | {"unet.x.lora_magnitude_vector": torch.zeros(3)}, str(tmp_path / "dora.safetensors"))
    with pytest.raises(vl.AdapterFileError, match=r"cannot be mapped onto a LoRA layer: \['unet.x.lora_magnitude"):
        vl.read_adapter(tmp_path / "dora.safetensors")
