"""The visionlora command line: targets, errors, help, python -m."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import tiny_unet
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
    assert "presets that fit: resnet-last-blocks, resnet-blocks, last-convs" in out
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


def trained_adapter(tmp_path, num_classes: int = 7):
    """A resnet18 base saved as a weights file, and an adapter trained on it with a new head."""
    import copy

    import torch
    import torchvision
    from safetensors.torch import save_file

    import visionlora as vl
    from tests.conftest import randomize_lora

    torch.manual_seed(0)
    base = torchvision.models.resnet18().eval()
    save_file(base.state_dict(), tmp_path / "base.safetensors")
    torch.save(base.state_dict(), tmp_path / "base.pt")
    model = copy.deepcopy(base)
    heads = vl.replace_head(model, num_classes)
    vl.apply_lora(model, vl.LoraConfig(targets="preset:resnet-last-blocks", rank=4, trainable=heads))
    randomize_lora(model, std=0.05)
    vl.save_adapter(model, tmp_path / "adapter.safetensors")
    return model.eval()


@pytest.mark.parametrize("weights", ["base.safetensors", "base.pt"])
def test_merge_a_weights_file_base_with_a_new_head(tmp_path, weights, capsys):
    import torch
    import torchvision
    from safetensors.torch import load_file

    model = trained_adapter(tmp_path)
    argv = [
        "merge",
        "--base",
        str(tmp_path / weights),
        "--arch",
        "resnet18",
        "--adapter",
        str(tmp_path / "adapter.safetensors"),
    ]
    assert main([*argv, "--out", str(tmp_path / "merged.safetensors")]) == 0
    plain = torchvision.models.resnet18(num_classes=7).eval()
    plain.load_state_dict(load_file(tmp_path / "merged.safetensors"), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        err = (plain(x) - model(x)).abs().max() / model(x).abs().max()
    assert err < 1e-5
    assert "wrote" in capsys.readouterr().out


def test_merge_writes_the_requested_dtype(tmp_path):
    import torch
    from safetensors.torch import load_file

    trained_adapter(tmp_path)
    argv = ["merge", "--base", str(tmp_path / "base.safetensors"), "--arch", "resnet18"]
    assert (
        main(
            [
                *argv,
                "--adapter",
                str(tmp_path / "adapter.safetensors"),
                "--out",
                str(tmp_path / "h.safetensors"),
                "--dtype",
                "fp16",
            ]
        )
        == 0
    )
    assert load_file(tmp_path / "h.safetensors")["layer4.0.conv1.weight"].dtype == torch.float16


def test_merge_a_diffusers_folder_base(tmp_path):
    import diffusers
    import torch

    import visionlora as vl
    from tests.conftest import randomize_lora

    tiny_unet().save_pretrained(tmp_path / "unet")
    unet = tiny_unet()
    vl.apply_lora(unet, vl.LoraConfig(targets="preset:unet-attention", rank=4))
    randomize_lora(unet, std=0.05)
    vl.save_adapter(unet, tmp_path / "a.safetensors")
    argv = [
        "merge",
        "--base",
        str(tmp_path / "unet"),
        "--adapter",
        str(tmp_path / "a.safetensors"),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    merged = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out").eval()
    args = (torch.randn(1, 4, 16, 16), torch.tensor([3]), torch.randn(1, 7, 24))
    with torch.no_grad():
        assert torch.allclose(merged(*args).sample, unet(*args).sample, rtol=1e-5, atol=1e-5)


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("echo this-must-never-run",))


def test_merge_refuses_pickles_and_misnamed_bases(tmp_path, capfd):
    import pickle

    trained_adapter(tmp_path)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"fc.weight": _Exploit()}))
    adapter = ["--adapter", str(tmp_path / "adapter.safetensors"), "--out", str(tmp_path / "m.safetensors")]
    assert main(["merge", "--base", str(tmp_path / "evil.pt"), "--arch", "resnet18", *adapter]) == 2
    captured = capfd.readouterr()  # file-descriptor level: os.system's output would show here
    assert "not a readable weights-only checkpoint" in captured.err
    assert "this-must-never-run" not in captured.out + captured.err
    assert main(["merge", "--base", str(tmp_path / "base.safetensors"), *adapter]) == 2
    assert "give the architecture too (e.g. --arch resnet50)" in capfd.readouterr().err
    assert main(["merge", "--base", str(tmp_path / "base.safetensors"), "--arch", "resnet34", *adapter]) == 2
    assert "does not fit resnet34" in capfd.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_inspect_describes_an_adapter_file(tmp_path, capsys):
    trained_adapter(tmp_path)
    assert main(["inspect", str(tmp_path / "adapter.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "visionlora adapter 'default'" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("layer4.0.conv2 "))
    assert row == ["layer4.0.conv2", "Conv2d", "-", "4", "8", "lora", f"{4 * 512 * 9 + 512 * 4:,}"]
    assert "LoRA layers: 5" in out and "trained in full: 3,591 (2 tensors)" in out  # fc: 7 x 512 + 7
    assert '"targets": ["preset:resnet-last-blocks"]' in out


def test_inspect_refuses_a_broken_file_in_one_line(tmp_path, capsys):
    (tmp_path / "x.safetensors").write_bytes(b"not a safetensors file")
    assert main(["inspect", str(tmp_path / "x.safetensors")]) == 2
    assert "not a valid safetensors file" in capsys.readouterr().err


def test_merge_a_pipeline_folder_base_writes_a_pipeline(tmp_path):
    import diffusers

    import visionlora as vl
    from tests.conftest import randomize_lora, tiny_pipeline, unet_input

    tiny_pipeline(tmp_path / "pipe", tiny_unet())
    unet = tiny_unet()
    vl.apply_lora(unet, vl.LoraConfig(targets="preset:unet-attention", rank=4))
    randomize_lora(unet, std=0.05)
    vl.export_adapter(unet, tmp_path / "k.safetensors", format="kohya")
    argv = ["merge", "--base", str(tmp_path / "pipe"), "--adapter", str(tmp_path / "k.safetensors")]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    with torch.no_grad():
        assert torch.allclose(pipe.unet(**unet_input()).sample, unet(**unet_input()).sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["peft", "diffusers", "kohya", "visionlora"])
def test_export_then_inspect_any_format(tmp_path, fmt, capsys):
    import visionlora as vl

    unet = tiny_unet()
    vl.apply_lora(unet, vl.LoraConfig(targets="preset:unet-attention", rank=4, alpha=2))
    vl.save_adapter(unet, tmp_path / "a.safetensors")
    out = tmp_path / ("peft" if fmt == "peft" else "x.safetensors")
    assert main(["export", str(tmp_path / "a.safetensors"), "--format", fmt, "--out", str(out), "--dtype", "fp16"]) == 0
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f": {fmt} adapter 'default'" in text
    assert re.search(
        r"\ndown_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q +Linear +- +4 +2 +lora +256\n", text
    )
    assert vl.read_adapter(out).layers == vl.read_adapter(tmp_path / "a.safetensors").layers


def test_export_refusals_are_one_line(tmp_path, capsys):
    import visionlora as vl
    from tests.conftest import tiny_net

    net = vl.apply_lora(tiny_net(), vl.LoraConfig(targets=["block.0"], rank=2))
    vl.save_adapter(net, tmp_path / "a.safetensors")
    assert main(["export", str(tmp_path / "a.safetensors"), "--format", "kohya", "--out", str(tmp_path / "k")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("visionlora export: error:") and "block.0: groups=2" in err and "\n" not in err
