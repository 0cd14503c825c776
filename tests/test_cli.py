"""The visionlora command line: targets, errors, help, python -m."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.test_ranks import tiny_unet
from visionlora.cli import main


def rows(output: str) -> dict[str, list[str]]:
    """Table rows of the summary by layer name."""
    return {
        line.split()[0]: line.split()
        for line in output.splitlines()
        if line.startswith(("layer", "down_", "up_", "mid_"))
    }


def test_targets_on_a_torchvision_name_shows_the_preset_with_resolutions_and_ranks(capsys):
    assert main(["targets", "resnet18", "--size", "128", "--rank-by-resolution", "4:16,0:2"]) == 0
    out = capsys.readouterr().out
    assert "resnet18 (ResNet): preset:resnet-last-blocks" in out
    assert "presets that fit: resnet-last-blocks, last-convs" in out
    table = rows(out)
    assert table["layer4.0.conv1"][6:8] == ["4", "16"]  # 128 px / 32 = 4 × 4: resolution 4, rank 16
    assert len([n for n in table if n.startswith("layer4.")]) == 5


def test_targets_on_a_timm_name_with_explicit_patterns(capsys):
    assert main(["targets", "timm:resnet18", "--targets", "layer3.*", "--size", "64", "--rank", "4"]) == 0
    table = rows(capsys.readouterr().out)
    assert {r[6] for n, r in table.items() if n.startswith("layer3.")} == {"4"}  # 64 / 16


def test_targets_on_a_diffusers_folder_and_a_pipeline_folder(tmp_path, capsys):
    tiny_unet().save_pretrained(tmp_path / "pipe" / "unet")
    assert main(["targets", str(tmp_path / "pipe"), "--rank-by-resolution", "16:8,0:2"]) == 0
    out = capsys.readouterr().out
    assert "(UNet2DConditionModel): preset:unet-attention" in out
    table = rows(out)
    assert table["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"][6:8] == ["16", "8"]
    assert table["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"][6:8] == ["8", "2"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["targets", "resnet5O"],
            "'resnet5O' is neither a folder nor a torchvision or timm model name; close names: resnet50",
        ),
        (["targets", "hub:resnet50"], "unknown source 'hub'; sources: torchvision, timm, diffusers"),
        (["targets", "resnet18", "--targets", "preset:unet-attention"], "does not fit ResNet"),
        (["targets", "resnet18", "--rank-by-resolution", "big"], "expected size:rank pairs"),
    ],
)
def test_errors_are_one_clear_line_and_exit_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("visionlora targets: error: ") and message in err


def test_help_and_python_dash_m():
    result = subprocess.run([sys.executable, "-m", "visionlora", "targets", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--rank-by-resolution" in result.stdout


def test_targets_on_an_sdxl_style_unet_folder(tmp_path, capsys):
    # SDXL's extra conditioning: pooled text embeddings and 6 size/crop ids
    unet = tiny_unet(
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8
    )
    unet.save_pretrained(tmp_path / "sdxl" / "unet")
    assert main(["targets", str(tmp_path / "sdxl")]) == 0
    assert "preset:unet-attention" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["targets", "timm:not_a_model"], "'timm:not_a_model': could not build it"),
        (["targets", "torchvision:not_a_model"], "'torchvision:not_a_model': could not build it"),
        (
            ["targets", "vit_b_16", "--size", "64", "--targets", "heads.head"],
            "the probe forward pass of VisionTransformer failed",
        ),
    ],
)
def test_library_and_probe_failures_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_size_must_be_positive(capsys):
    with pytest.raises(SystemExit) as info:
        main(["targets", "resnet18", "--size", "0"])
    assert info.value.code == 2 and "0 is not a size >= 1" in capsys.readouterr().err
