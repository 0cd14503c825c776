"""A pipeline's UNet and text-encoder adapters in one diffusers or kohya file, read as diffusers and kohya read them."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import visionlora as vl
from tests.conftest import assert_rel_close, randomize_lora, tiny_pipeline, tiny_unet, unet_output

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

UNET_LORA = vl.LoraConfig(targets=["preset:unet-attention"], rank=4, alpha=6.0, rank_pattern={"*.to_out.0": 2})
TEXT_LORA = vl.LoraConfig(
    targets=["*.self_attn.q_proj", "*.self_attn.v_proj", "*.self_attn.out_proj", "*.mlp.fc1"],
    rank=2,
    alpha=3.0,
    rank_pattern={"*.mlp.fc1": 3},
    alpha_pattern={"*.v_proj": 0.5},
)
IDS = torch.tensor([[0, 2, 4, 6, 1, 1, 1, 1]])


def _text_output(encoder: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return encoder(IDS)[0]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny SD pipeline folder, and its UNet and text encoder with trained-looking LoRA (alpha != rank)."""
    folder = tiny_pipeline(tmp_path_factory.mktemp("te") / "pipe", tiny_unet())
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder))
    vl.apply_lora(pipe.unet, UNET_LORA)
    vl.apply_lora(pipe.text_encoder, TEXT_LORA)
    randomize_lora(pipe.unet, std=0.05)
    randomize_lora(pipe.text_encoder, seed=1, std=0.2)
    return folder, pipe.unet, pipe.text_encoder


def _fresh(folder):
    return diffusers.StableDiffusionPipeline.from_pretrained(str(folder))


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_pipeline_load_lora_weights_applies_both_parts_exactly(pipeline, fmt, tmp_path):
    folder, unet, text = pipeline
    path = vl.export_adapter(unet, tmp_path / "style.safetensors", format=fmt, text_encoder=text)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    prefix = {"diffusers": "text_encoder.encoder.layers.0.", "kohya": "lora_te_text_model_encoder_layers_0_"}[fmt]
    assert any(k.startswith(prefix) for k in keys)
    pipe = _fresh(folder)
    assert not torch.allclose(_text_output(pipe.text_encoder), _text_output(text), atol=1e-3)
    pipe.load_lora_weights(str(path))  # diffusers' own loader (its kohya converter for the kohya file)
    assert_rel_close(_text_output(pipe.text_encoder), _text_output(text), 1e-5)
    assert_rel_close(unet_output(pipe.unet), unet_output(unet), 1e-5)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_visionlora_reads_each_part_back_unchanged(pipeline, fmt, tmp_path):
    folder, unet, text = pipeline
    path = vl.export_adapter(unet, tmp_path / "style.safetensors", format=fmt, text_encoder=text)
    for component, model in (("unet", unet), ("text_encoder", text)):
        record = vl.read_adapter(path, component=component)
        original = vl.read_adapter(vl.save_adapter(model, tmp_path / f"{component}.safetensors"))
        assert record.component == component
        assert record.layers == original.layers  # ranks, alphas, resolutions and geometry
        for key, tensor in original.tensors.items():  # B is unfolded where the format folded a scale in
            assert_rel_close(record.tensors[key], tensor, 1e-6)
    pipe = _fresh(folder)
    with pytest.raises(vl.AdapterFileError, match=r"holds LoRA for \['unet', 'text_encoder'\]; loaded onto one"):
        vl.load_adapter(pipe.unet, path)  # the text encoder's keys would go unread
    assert not vl.summary(pipe.unet).count("default")
    vl.load_adapter(pipe, path)  # every part onto its component
    # B unfolded from the file is within an ulp of the trained one (checked above at 1e-6); through
    # the UNet's layers that gave 1.2e-6 on one machine: outputs are held to fp32's 1e-5.
    assert_rel_close(_text_output(pipe.text_encoder), _text_output(text), 1e-5)
    assert_rel_close(unet_output(pipe.unet), unet_output(unet), 1e-5)


def test_kohya_text_encoder_names_without_the_kept_record_map_onto_the_model(pipeline, tmp_path):
    # A file from kohya's own scripts: lora_te_text_model_* names, no visionlora record in the header,
    # loaded into a text encoder whose module names have no text_model. prefix (transformers >= 5).
    folder, unet, text = pipeline
    path = vl.export_adapter(unet, tmp_path / "style.safetensors", format="kohya", text_encoder=text)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    assert vl.read_adapter(tmp_path / "plain.safetensors", component="text_encoder").flat_names
    pipe = _fresh(folder)
    assert not hasattr(pipe.text_encoder, "text_model")
    vl.load_adapter(pipe.text_encoder, tmp_path / "plain.safetensors", component="text_encoder")
    assert_rel_close(_text_output(pipe.text_encoder), _text_output(text), 1e-6)


def test_a_file_holding_both_converts_between_formats_with_both_parts(pipeline, tmp_path):
    folder, unet, text = pipeline
    both = vl.export_adapter(unet, tmp_path / "d.safetensors", format="diffusers", text_encoder=text)
    kohya = vl.export_adapter(both, tmp_path / "k.safetensors", format="kohya")
    pipe = _fresh(folder)
    pipe.load_lora_weights(str(kohya))
    assert_rel_close(_text_output(pipe.text_encoder), _text_output(text), 1e-5)
    # A one-model format cannot hold both parts: refused by name, nothing written, until one is chosen.
    with pytest.raises(vl.AdapterFileError, match=r"holds LoRA for \['unet', 'text_encoder'\], and the visionlora"):
        vl.export_adapter(both, tmp_path / "unet.safetensors")
    assert not (tmp_path / "unet.safetensors").exists()
    vl.export_adapter(both, tmp_path / "unet.safetensors", component="unet")
    assert vl.read_adapter(tmp_path / "unet.safetensors").layers == vl.read_adapter(both).layers
    te = vl.export_adapter(both, tmp_path / "te", format="peft", component="text_encoder")
    assert vl.read_adapter(te).layers == vl.read_adapter(both, component="text_encoder").layers
    pipe = _fresh(folder)
    vl.load_adapter(pipe.text_encoder, te)
    assert_rel_close(_text_output(pipe.text_encoder), _text_output(text), 1e-5)


def test_wrong_components_are_refused_by_name(pipeline, tmp_path):
    _, unet, text = pipeline
    unet_only = vl.export_adapter(unet, tmp_path / "u.safetensors", format="kohya")
    with pytest.raises(vl.AdapterFileError, match=r"holds no text_encoder LoRA; it holds LoRA for \['unet'\]"):
        vl.read_adapter(unet_only, component="text_encoder")
    with pytest.raises(vl.ConfigError, match=r"component 'vae' is not one of \['unet', 'transformer', 'text_encoder'"):
        vl.read_adapter(unet_only, component="vae")
    native = vl.save_adapter(text, tmp_path / "te.safetensors")
    with pytest.raises(vl.AdapterFileError, match="is a visionlora adapter of one model; component='text_encoder'"):
        vl.read_adapter(native, component="text_encoder")
    with pytest.raises(vl.ConfigError, match="the peft format holds one model's adapter"):
        vl.export_adapter(unet, tmp_path / "p", format="peft", text_encoder=text)
    assert not (tmp_path / "p").exists()
    # The text encoder's own visionlora file goes into a pipeline file too.
    path = vl.export_adapter(unet, tmp_path / "d.safetensors", format="diffusers", text_encoder=native)
    assert vl.read_adapter(path, component="text_encoder").layers == vl.read_adapter(native).layers
    # So does a pipeline file's text-encoder part (not its UNet part).
    again = vl.export_adapter(unet_only, tmp_path / "k2.safetensors", format="kohya", text_encoder=path)
    assert vl.read_adapter(again, component="text_encoder").layers == vl.read_adapter(native).layers


def test_kohya_export_warns_where_diffusers_would_drop_text_encoder_attention(pipeline, tmp_path, caplog):
    # diffusers' kohya converter tells old from new key layouts by out_proj's keys: without them it cannot
    # convert q/k/v LoRA (refusing the file here). A1111 and ComfyUI read the file whole; the warning says so.
    folder, unet, _ = pipeline
    text = _fresh(folder).text_encoder
    vl.apply_lora(text, vl.LoraConfig(targets=["*.self_attn.q_proj", "*.self_attn.v_proj"], rank=2))
    randomize_lora(text, seed=2, std=0.2)
    with caplog.at_level(logging.WARNING, logger="visionlora"):
        path = vl.export_adapter(unet, tmp_path / "k.safetensors", format="kohya", text_encoder=text)
    assert "none on out_proj" in caplog.text
    with pytest.raises(ValueError, match="Could not automatically infer state dict type"):
        _fresh(folder).load_lora_weights(str(path))
    fresh = _fresh(folder).text_encoder
    vl.load_adapter(fresh, path, component="text_encoder")  # visionlora reads it whole
    assert_rel_close(_text_output(fresh), _text_output(text), 1e-6)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="visionlora"):
        vl.export_adapter(unet, tmp_path / "d.safetensors", format="diffusers", text_encoder=text)
    assert "out_proj" not in caplog.text
