"""``visionlora quickstart diffusion`` on a few steps: its files, and the style measure it reports."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from visionlora.cli import main
from visionlora.train.quickstart_diffusion import patches, style_share

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")


def test_the_style_measure_tells_the_two_images_apart():
    china, flower = patches("china.jpg", 256, seed=0), patches("flower.jpg", 256, seed=1)
    assert china.shape == (256, 3, 16, 16) and float(china.min()) >= -1 and float(china.max()) <= 1
    assert style_share(patches("flower.jpg", 64, seed=5), china, flower) > 0.9
    assert style_share(patches("china.jpg", 64, seed=5), china, flower) < 0.1
    assert style_share(flower[:8], china, flower) == 1.0  # a style image is its own nearest neighbour


def test_quickstart_diffusion_writes_samples_adapters_and_its_numbers(tmp_path, capsys):
    assert main(["quickstart", "diffusion", "--steps", "8", "--out", str(tmp_path)]) == 0
    assert "share of samples whose nearest patch" in capsys.readouterr().out
    result = json.loads((tmp_path / "quickstart-diffusion.json").read_text())
    assert result["files"] == ["adapter-kohya.safetensors", "adapter.safetensors", "merged-unet", "samples.png"]
    assert 0 <= result["style_share_base"] <= 1 and 0 <= result["style_share_styled"] <= 1
    assert result["style_share_of_new_style_patches"] > 0.9
    with Image.open(tmp_path / "samples.png") as grid:
        assert grid.size == (24 * 16 * 4, 2 * 16 * 4)  # 24 seeds, base row above styled row, 4x enlarged
