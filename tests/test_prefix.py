"""The frozen-prefix split: exact outputs and gradients, no autograd state before the first adapter, refusals."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

import visionlora as vl
from visionlora.prefix import split_frozen_prefix


def _adapted(model: nn.Module, cfg: vl.LoraConfig) -> nn.Module:
    vl.apply_lora(model, cfg)
    g = torch.Generator().manual_seed(0)
    for layer in model.modules():
        if isinstance(layer, vl.LoraLayer):
            for p in layer.adapters.parameters():  # B is zero at init: give the branch an effect
                p.data = torch.randn(p.shape, generator=g) * 0.1
    return model


CASES = {
    "torchvision-resnet18": (
        lambda: torchvision.models.resnet18(num_classes=5),
        vl.LoraConfig(targets="layer4.*", rank=4, trainable=["fc"]),
        "layer3_1",
    ),
    "timm-resnet18": (
        lambda: timm.create_model("resnet18", pretrained=False, num_classes=5),
        vl.LoraConfig(targets="layer4.*", rank=4, trainable=["fc"]),
        "layer3_1",
    ),
    "timm-vit": (
        lambda: timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8, depth=3
        ),
        vl.LoraConfig(targets=["blocks.2.attn.qkv", "blocks.2.mlp.fc1"], rank=4, trainable=["head"]),
        "blocks_1",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_rest_of_prefix_equals_model_outputs_and_gradients(case):
    build, cfg, boundary = CASES[case]
    torch.manual_seed(0)
    model = _adapted(build(), cfg)
    split = split_frozen_prefix(model)
    assert split.boundary == boundary
    assert not any(p.requires_grad for p in split.prefix.parameters())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in split.rest.named_parameters() if p.requires_grad} == trained
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])

    model.train()
    split.prefix.eval()  # what caching means: the frozen layers run as a fixed feature extractor
    nn.functional.cross_entropy(model(x), y).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    features = split.features(x)
    assert not features.requires_grad
    out = split.rest(features)
    nn.functional.cross_entropy(out, y).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    model.eval()
    with torch.no_grad():
        assert torch.equal(split.rest(split.features(x)), model(x))


def _saved_tensor_count(fn) -> int:
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count


@pytest.mark.parametrize("case", ["torchvision-resnet18", "timm-vit"])
def test_nothing_before_the_first_adapter_records_autograd_state(case):
    build, cfg, _ = CASES[case]
    model = _adapted(build(), cfg).eval()
    split = split_frozen_prefix(model)
    x = torch.randn(2, 3, 32, 32)
    features = split.features(x)
    whole = _saved_tensor_count(lambda: model(x))
    rest = _saved_tensor_count(lambda: split.rest(features))
    assert whole == rest > 0


def test_prefix_runs_in_eval_mode_and_mode_is_restored():
    model = _adapted(torchvision.models.resnet18(num_classes=5), CASES["timm-resnet18"][1]).train()
    split = split_frozen_prefix(model)
    before = model.bn1.running_mean.clone()
    split.features(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.bn1.running_mean, before)  # running statistics untouched
    assert model.bn1.training


def test_refusals_name_the_problem():
    first = torchvision.models.resnet18(num_classes=5)
    vl.apply_lora(first, vl.LoraConfig(targets="conv1", rank=4))
    with pytest.raises(vl.ConfigError, match="first block is already trainable"):
        split_frozen_prefix(first)

    frozen = torchvision.models.resnet18(num_classes=5).requires_grad_(False)
    with pytest.raises(vl.ConfigError, match="no trainable parameter"):
        split_frozen_prefix(frozen)

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow cannot be traced
                x = -x
            return self.head(self.stem(x).mean((2, 3)))

    branchy = Branchy()
    branchy.stem.requires_grad_(False)
    with pytest.raises(vl.ConfigError, match="cannot be traced"):
        split_frozen_prefix(branchy)

    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 3, 3, padding=1).requires_grad_(False)
            self.mix = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.mix(self.stem(x)) + x  # the raw input reaches the trainable part too

    with pytest.raises(vl.ConfigError, match="hands 2 values"):
        split_frozen_prefix(Skip())


def test_recalibrated_batchnorm_holds_the_new_images_statistics():
    model = _adapted(torchvision.models.resnet18(num_classes=5), CASES["torchvision-resnet18"][1]).train()
    split = split_frozen_prefix(model)
    x = torch.randn(12, 3, 32, 32) * 3 + 1  # far from the fresh statistics (mean 0, var 1)
    assert split.recalibrate_batchnorm(x.split(4)) == 15  # bn1 and the BatchNorms of layer1-3
    with torch.no_grad():
        first = model.conv1(x)
    torch.testing.assert_close(model.bn1.running_mean, first.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert model.bn1.momentum == 0.1 and model.bn1.training and model.layer4[0].bn1.num_batches_tracked == 0
