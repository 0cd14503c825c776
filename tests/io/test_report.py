"""visionlora inspect: format, trainer, family, where each key goes, and what would not fit, before loading."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import visionlora as vl
from tests.conftest import randomize_lora, tiny_flux_pipeline, tiny_flux_transformer, tiny_sd3_pipeline
from visionlora.cli import main
from visionlora.io.report import describe_adapter, families_of, trainer_of


@pytest.fixture
def flux_kohya(tmp_path):
    model = tiny_flux_transformer()
    vl.apply_lora(model, vl.LoraConfig(targets=["preset:flux-all"], rank=4, rank_pattern={"*.to_k": 2}))
    randomize_lora(model)
    path = vl.export_adapter(model, tmp_path / "k.safetensors", format="kohya")
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(path), str(bare), metadata={"ss_network_module": "networks.lora_flux"})
    return bare


def test_inspect_against_a_pipeline_maps_each_key_before_anything_loads(tmp_path, flux_kohya, capsys):
    folder = tiny_flux_pipeline(tmp_path / "flux")
    assert main(["inspect", str(flux_kohya), "--against", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "kohya file, written by kohya sd-scripts (networks.lora_flux); family: LoRA" in out
    (qkv,) = [line for line in out.splitlines() if "img_attn_qkv" in line]
    assert qkv.startswith("  lora_unet_double_blocks_0_img_attn_qkv -> transformer_blocks.0.attn.to_k + 2 more")
    assert all(f"attn.to_{p}" in qkv for p in "qkv") and qkv.endswith("rank 2+4+4")
    assert "against the model: every key would be applied" in out


def test_inspect_against_the_wrong_model_lists_what_nothing_would_read_and_exits_1(tmp_path, flux_kohya, capsys):
    folder = tiny_sd3_pipeline(tmp_path / "sd3")
    assert main(["inspect", str(flux_kohya), "--against", str(folder)]) == 1
    out = capsys.readouterr().out
    assert (
        "lora_unet_single_blocks_0_linear1 -> single_transformer_blocks.0.attn.to_q: no such module in "
        "SD3Transformer2DModel (nothing would read its keys); nearest: transformer_blocks.0.attn.to_q" in out
    )
    assert "the load would be refused; nothing would change" in out


def test_a_part_the_reader_refuses_is_reported_with_the_keys_nothing_reads(tmp_path):
    lycoris = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 2),
        "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_b": torch.zeros(2, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0),
    }
    path = tmp_path / "loha.safetensors"
    save_file(lycoris, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    report = describe_adapter(path)
    assert report.trainer == "LyCORIS (lycoris.kohya)" and report.families == ["LoHa"]
    (part,) = report.parts
    assert part.record is None and "hada_w1_a" in (part.error or "") and not report.loads


def test_trainers_and_families_are_named_from_headers_and_key_styles():
    lora = ["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    assert trainer_of({"software": '{"name": "ai-toolkit", "version": "0.1"}'}, lora) == "ai-toolkit"
    assert trainer_of({"lora_adapter_metadata": "{}"}, lora) == "diffusers (save_lora_weights)"
    assert trainer_of({"modelspec.implementation": "diffusers"}, lora).startswith("SimpleTuner")
    assert trainer_of({}, ["base_model.model.x.lora_A.weight"]) == "PEFT"
    assert trainer_of({}, ["diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight"]) == "ComfyUI (LoraSave)"
    assert trainer_of({}, ["lora_unet_x.lora_up.weight"]).startswith("kohya-style")
    conv = {"lora_unet_c.lora_down.weight": torch.zeros(2, 4, 3, 3), "x.dora_scale": torch.zeros(1)}
    assert families_of(conv) == ["DoRA", "LoRA + LoCon"]
