"""visionlora convert IN OUT --to FORMAT [--model M]: every format to every other, exact, refusals by name."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import visionlora as vl
from tests.conftest import (
    randomize_lora,
    tiny_flux_pipeline,
    tiny_flux_transformer,
    tiny_pipeline,
    tiny_unet,
    transformer_output,
    unet_output,
)
from visionlora.cli import main

diffusers = pytest.importorskip("diffusers")


def _bare(path, out):
    """The file as a tool without visionlora's header record would have written it."""
    save_file(load_file(path), str(out))
    return out


def test_a_bare_kohya_unet_file_converts_with_the_model_and_is_refused_by_name_without(tmp_path, capsys):
    unet = tiny_unet()
    vl.apply_lora(unet, vl.LoraConfig(targets="preset:unet-attention", rank=4, alpha=3))
    randomize_lora(unet, std=0.05)
    kohya = _bare(vl.export_adapter(unet, tmp_path / "k.safetensors", format="kohya"), tmp_path / "bare.safetensors")
    folder = tiny_pipeline(tmp_path / "pipe", tiny_unet())
    assert main(["convert", str(kohya), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 2
    assert "flattened" in capsys.readouterr().err
    for fmt, out in (("diffusers", "d.safetensors"), ("peft", "peft"), ("visionlora", "v.safetensors")):
        assert main(["convert", str(kohya), str(tmp_path / out), "--to", fmt, "--model", str(folder)]) == 0
        back = tiny_unet()
        vl.load_adapter(back, tmp_path / out)
        torch.testing.assert_close(unet_output(back), unet_output(unet), atol=1e-5, rtol=1e-5)


def test_flux_files_convert_both_ways_between_diffusers_and_fused_kohya(tmp_path, capsys):
    model = tiny_flux_transformer()
    vl.apply_lora(model, vl.LoraConfig(targets=["preset:flux-double"], rank=4, rank_pattern={"*.to_v": 2}))
    randomize_lora(model)
    want = transformer_output(model)
    folder = tiny_flux_pipeline(tmp_path / "pipe")
    source = _bare(
        vl.export_adapter(model, tmp_path / "d.safetensors", format="diffusers"), tmp_path / "bare.safetensors"
    )
    kohya = tmp_path / "k.safetensors"
    # double blocks only: the names alone do not tell Flux from SD3
    assert main(["convert", str(source), str(kohya), "--to", "kohya"]) == 2
    assert "do not tell Flux from SD3" in capsys.readouterr().err
    assert main(["convert", str(source), str(kohya), "--to", "kohya", "--model", str(folder)]) == 0
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in load_file(kohya)
    back_to_diffusers = tmp_path / "again.safetensors"
    assert (
        main(["convert", str(_bare(kohya, tmp_path / "kb.safetensors")), str(back_to_diffusers), "--to", "diffusers"])
        == 0
    )
    pipe = diffusers.FluxPipeline.from_pretrained(str(folder))
    pipe.load_lora_weights(str(back_to_diffusers))
    torch.testing.assert_close(transformer_output(pipe.transformer), want, atol=1e-5, rtol=0)
    ranks = {n: s.rank for n, s in vl.read_adapter(back_to_diffusers).layers.items()}
    assert ranks["transformer_blocks.0.attn.to_v"] == 2 and ranks["transformer_blocks.0.attn.to_q"] == 4


def test_a_pipeline_file_to_a_one_model_format_needs_a_component(tmp_path, capsys):
    folder = tiny_flux_pipeline(tmp_path / "pipe")
    pipe = diffusers.FluxPipeline.from_pretrained(str(folder))
    vl.apply_lora(pipe.transformer, vl.LoraConfig(targets=["preset:flux-attention"], rank=2))
    vl.apply_lora(pipe.text_encoder, vl.LoraConfig(targets=["*.q_proj"], rank=2))
    path = vl.export_adapter(
        pipe.transformer, tmp_path / "p.safetensors", format="diffusers", text_encoder=pipe.text_encoder
    )
    assert main(["convert", str(path), str(tmp_path / "peft"), "--to", "peft"]) == 2
    assert "pass component=<one of those>" in capsys.readouterr().err
    argv = ["convert", str(path), str(tmp_path / "peft"), "--to", "peft", "--component", "text_encoder"]
    assert main(argv) == 0
    assert set(vl.read_adapter(tmp_path / "peft").layers) == set(vl.read_adapter(path, component="text_encoder").layers)
