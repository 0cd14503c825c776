"""Diffusion-transformer presets (Flux.1, SD3/3.5) select the layers they name, per block kind."""

from __future__ import annotations

import pytest

import visionlora as vl
from tests.conftest import tiny_flux_pipeline, tiny_flux_transformer, tiny_sd3_transformer
from visionlora.cli import main
from visionlora.errors import TargetError
from visionlora.models.presets import expand_preset, fitting_presets

DOUBLE_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
DOUBLE_FF = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


def test_flux_presets_select_each_block_kind():
    flux = tiny_flux_transformer(num_layers=2, num_single_layers=2)
    double = [f"transformer_blocks.{b}.attn.{n}" for b in range(2) for n in DOUBLE_ATTENTION]
    single = [f"single_transformer_blocks.{b}.attn.{n}" for b in range(2) for n in ("to_q", "to_k", "to_v")]
    attention = expand_preset(flux, "preset:flux-attention")
    assert sorted(attention) == sorted(double + single)
    every = expand_preset(flux, "preset:flux-all")
    ff = [f"transformer_blocks.{b}.{n}" for b in range(2) for n in DOUBLE_FF]
    mlp = [f"single_transformer_blocks.{b}.{n}" for b in range(2) for n in ("proj_mlp", "proj_out")]
    assert sorted(every) == sorted(double + single + ff + mlp)
    assert sorted(expand_preset(flux, "preset:flux-single")) == sorted(single + mlp)
    assert sorted(expand_preset(flux, "preset:flux-double")) == sorted(double + ff)
    context = expand_preset(flux, "preset:flux-context")
    assert sorted(context) == sorted(
        [f"transformer_blocks.{b}.attn.{n}" for b in range(2) for n in DOUBLE_ATTENTION[4:]]
        + [f"transformer_blocks.{b}.{n}" for b in range(2) for n in DOUBLE_FF[2:]]
    )
    assert sorted(expand_preset(flux, "preset:flux-modulation")) == sorted(
        [f"transformer_blocks.{b}.{n}.linear" for b in range(2) for n in ("norm1", "norm1_context")]
        + [f"single_transformer_blocks.{b}.norm.linear" for b in range(2)]
    )
    assert not any(p.startswith(("sd3", "unet")) for p in fitting_presets(flux))


def test_sd3_presets_include_sd35_second_attention_and_skip_the_last_blocks_missing_context_layers():
    sd3 = tiny_sd3_transformer()
    attention = expand_preset(sd3, "preset:sd3-attention")
    # block 1 is the last: its context stream is pre-only (no to_add_out, no ff_context)
    assert "transformer_blocks.0.attn2.to_q" in attention and "transformer_blocks.0.attn.to_add_out" in attention
    assert "transformer_blocks.1.attn.to_add_out" not in attention
    assert len(attention) == 8 + 4 + 7
    every = expand_preset(sd3, "preset:sd3-all")
    assert sorted(set(every) - set(attention)) == sorted(
        [f"transformer_blocks.0.{n}" for n in DOUBLE_FF] + [f"transformer_blocks.1.{n}" for n in DOUBLE_FF[:2]]
    )
    context = expand_preset(sd3, "preset:sd3-context")
    assert all(".add_" in n or "to_add_out" in n or "ff_context" in n for n in context) and len(context) == 9
    with pytest.raises(TargetError, match=r"flux-attention.*does not fit SD3Transformer2DModel.*sd3-all"):
        expand_preset(sd3, "preset:flux-attention")


def test_rank_and_alpha_patterns_take_preset_names_per_block_kind():
    flux = tiny_flux_transformer()
    cfg = vl.LoraConfig(
        targets=["preset:flux-all"],
        rank=8,
        rank_pattern={"preset:flux-single": 2, "preset:flux-context": 4},
        alpha_pattern={"preset:flux-context": 1.0},
        family_pattern={"preset:flux-single": "dora"},
    )
    vl.apply_lora(flux, cfg)
    rows = {line.split()[0]: line.split() for line in vl.summary(flux).splitlines()[2:] if line.startswith(("t", "s"))}
    assert rows["single_transformer_blocks.0.attn.to_q"][-4:-1] == ["2", "8", "dora"]  # rank, alpha, family
    assert rows["transformer_blocks.0.attn.add_q_proj"][-4:-1] == ["4", "1", "lora"]
    assert rows["transformer_blocks.0.ff_context.net.2"][-4:-1] == ["4", "1", "lora"]
    assert rows["transformer_blocks.0.attn.to_q"][-4:-1] == ["8", "8", "lora"]


def test_rank_budget_spreads_over_a_transformer_and_is_never_exceeded():
    flux = tiny_flux_transformer()
    vl.apply_lora(flux, vl.LoraConfig(targets=["preset:flux-attention"], rank_budget=1500))
    used = sum(p.numel() for n, p in flux.named_parameters() if "lora_" in n)
    assert 1000 < used <= 1500


def test_targets_command_reads_a_flux_pipeline_folder(tmp_path, capsys):
    folder = tiny_flux_pipeline(tmp_path / "flux")
    assert main(["targets", str(folder), "--targets", "preset:flux-attention", "--rank", "4"]) == 0
    out = capsys.readouterr().out
    assert "FluxTransformer2DModel" in out and "presets that fit: flux-attention, flux-all" in out
    assert "LoRA layers: 11" in out
