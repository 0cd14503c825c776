"""A classifier's input: timm's pretrained config or ImageNet's, overrides, augmentation, the stored record."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from PIL import Image

import visionlora as vl
from visionlora.preprocess import Augment, Preprocess, resolve_preprocess


def test_timm_models_take_their_pretrained_config_and_overrides_win():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    found = resolve_preprocess(vit, 32)
    assert found == Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.9, "bicubic")
    assert resolve_preprocess(vit, 32, crop_pct=1.0, mean=[0.1, 0.2, 0.3]).mean == (0.1, 0.2, 0.3)
    plain = resolve_preprocess(torchvision.models.resnet18(), 64)
    assert plain == Preprocess(64)  # ImageNet's mean/std, crop 0.875, bilinear
    assert Preprocess.from_dict(found.to_dict()) == found


def test_the_eval_transform_resizes_crops_and_normalises():
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    x = Preprocess(32, crop_pct=0.8).eval_transform()(image)
    assert x.shape == (3, 32, 32)
    expected = torch.tensor([(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225])
    assert torch.allclose(x[:, 16, 16], expected, atol=1e-5)


@pytest.mark.parametrize("auto", ["randaugment", "trivialaugment"])
def test_training_augmentation_is_random_per_draw_and_keeps_the_shape(auto):
    image = Image.fromarray((torch.rand(48, 48, 3) * 255).byte().numpy())
    transform = Preprocess(32).train_transform(Augment(True, (0.5, 1.0), auto, random_erasing=0.5))
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(transform(image))
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_a_bad_record_is_refused_by_name():
    with pytest.raises(vl.ConfigError, match=r"preprocess crop_pct: 1\.5 is invalid"):
        Preprocess(32, crop_pct=1.5)
    with pytest.raises(vl.ConfigError, match="expected a mapping with exactly"):
        Preprocess.from_dict({"size": 32}, "x")
