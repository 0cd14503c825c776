"""merge / unmerge / merge_and_unload: exact, reversible, refusing non-finite results."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import visionlora as vl
from tests.conftest import assert_rel_close, randomize_lora, reference_conv_delta, tiny_net
from visionlora.state import lora_layers


def textbook_merged_copy(
    base: nn.Module, adapted: nn.Module, alphas: dict[str, float], weights: dict[str, float]
) -> nn.Module:
    """A copy of the un-adapted ``base`` with W + Σ weight · (alpha / r) · ΔW written in by the textbook formula.

    ``alphas`` and ``weights`` are per adapter name, as the test configured them; r is read off B's shape.
    """
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in lora_layers(adapted):
            target = ref.get_submodule(name)
            for adapter_name, w in weights.items():
                if adapter_name not in layer.adapters:
                    continue
                a, b = layer.adapters[adapter_name].lora_A, layer.adapters[adapter_name].lora_B
                scale = alphas[adapter_name] / b.shape[1]
                if isinstance(target, nn.Linear):
                    delta = scale * b @ a
                else:
                    delta = reference_conv_delta(a, b, scale, target.groups)
                target.weight += w * delta
    return ref


def test_dilated_resnet_merged_equals_unmerged_equals_reference():
    torch.manual_seed(0)
    base = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True]).eval()
    model = copy.deepcopy(base)
    vl.apply_lora(
        model, vl.LoraConfig(targets=["layer3.5.*", "layer4.*"], rank=4, alpha=8, rank_pattern={"layer4.0.*": 16})
    )
    assert model.layer4[1].conv2.base.dilation == (4, 4)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))  # freshly adapted: B = 0
    randomize_lora(model, std=0.05)
    with torch.no_grad():
        expected = textbook_merged_copy(base, model, {"default": 8.0}, {"default": 1.0})(x)
        unmerged = model(x)
        assert not torch.allclose(unmerged, base(x))
        assert_rel_close(unmerged, expected)
        vl.merge(model)
        assert_rel_close(model(x), expected)
        vl.unmerge(model)
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), _plain_state(model).values(), strict=True))


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".adapters." not in k}


def _standardize(weight: torch.Tensor, eps: float) -> torch.Tensor:
    flat = weight.reshape(weight.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, unbiased=False, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape_as(weight)


def test_timm_std_conv_is_adapted_on_its_effective_weight():
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    conv = timm_layers.StdConv2d(4, 6, 3, padding=1, eps=1e-6)
    model = nn.Sequential(conv)
    x = torch.randn(2, 4, 9, 9)
    w0 = conv.weight.detach().clone()
    vl.apply_lora(model, vl.LoraConfig(targets="0", rank=2, alpha=4))
    assert model[0].weight_space
    randomize_lora(model)
    ad = model[0].adapters["default"]
    with torch.no_grad():
        expected = F.conv2d(
            x, _standardize(w0 + reference_conv_delta(ad.lora_A, ad.lora_B, 2.0, 1), 1e-6), conv.bias, padding=1
        )
        unmerged = model(x)
        assert_rel_close(unmerged, expected)
        vl.merge(model)
        assert_rel_close(model(x), unmerged)
        vl.unmerge(model)
    assert torch.equal(conv.weight, w0)


def _pad_same(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """TensorFlow-style 'SAME' padding for this input size: total = max((ceil(i/s) - 1)·s + k - i, 0)."""
    pads = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride), strict=True):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


@pytest.mark.parametrize("cls_name", ["ScaledStdConv2d", "Conv2dSame", "StdConv2dSame"])
def test_other_timm_weight_or_input_transforming_convs_match_their_textbook_forms(cls_name):
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    conv = getattr(timm_layers, cls_name)(4, 6, 3, stride=2)
    model = nn.Sequential(conv)
    w0 = conv.weight.detach().clone()
    vl.apply_lora(model, vl.LoraConfig(targets="0", rank=3, alpha=6))
    randomize_lora(model)
    x = torch.randn(2, 4, 11, 11)
    with torch.no_grad():
        ad = model[0].adapters["default"]
        w = w0 + reference_conv_delta(ad.lora_A, ad.lora_B, 6 / 3, 1)
        if cls_name == "ScaledStdConv2d":  # gain · (fan_in^-1/2) · standardised W, then a plain conv
            w = conv.gain * w0[0].numel() ** -0.5 * _standardize(w, conv.eps)
            expected = F.conv2d(x, w, conv.bias, conv.stride, conv.padding)
        elif cls_name == "Conv2dSame":  # input padded 'SAME' for its size, then an unpadded conv
            expected = F.conv2d(_pad_same(x, (3, 3), (2, 2)), w, conv.bias, conv.stride)
        else:
            expected = F.conv2d(_pad_same(x, (3, 3), (2, 2)), _standardize(w, conv.eps), conv.bias, conv.stride)
        unmerged = model(x)
        assert_rel_close(unmerged, expected)
        vl.merge(model)
        assert_rel_close(model(x), unmerged)


def test_weight_space_layers_refuse_input_dropout():
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(timm_layers.StdConv2d(4, 6, 3))
    with pytest.raises(vl.ConfigError, match="'0': dropout: StdConv2d transforms its weight or input"):
        vl.apply_lora(model, vl.LoraConfig(targets="0", dropout=0.1))
    assert isinstance(model[0], timm_layers.StdConv2d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_unmerge_is_bit_exact_after_100_cycles(dtype):
    model = tiny_net().to(dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    vl.apply_lora(model, vl.LoraConfig(targets=["block.*", "fc", "stem"], rank=2, alpha=16))
    randomize_lora(model, std=0.3)
    for _ in range(100):
        vl.merge(model)
        vl.unmerge(model)
    assert all(torch.equal(original[k], v) for k, v in _plain_state(model).items())


def test_merge_math_is_float32_for_half_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    w0 = model[0].weight.detach().clone()
    vl.apply_lora(model, vl.LoraConfig(targets="0", rank=4))
    randomize_lora(model)
    ad = model[0].adapters["default"]
    expected = (w0.float() + ad.scale * ad.lora_B.float() @ ad.lora_A.float()).to(torch.bfloat16)
    vl.merge(model)
    assert torch.equal(model[0].base.weight, expected)


def test_non_finite_merge_raises_and_leaves_every_weight_untouched():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).to(torch.float16)
    vl.apply_lora(model, vl.LoraConfig(targets="*", rank=2, alpha=2))
    with torch.no_grad():
        model[0].adapters["default"].lora_B.fill_(0.01)
        model[1].adapters["default"].lora_B.fill_(300.0)  # 300 · 300 · 2 overflows fp16 (max 65504)
        model[1].adapters["default"].lora_A.fill_(300.0)
    before = [m.base.weight.clone() for m in model]
    with pytest.raises(vl.MergeError, match=r"NaN/Inf; the weights were left untouched"):
        vl.merge(model)
    assert all(torch.equal(b, m.base.weight) for b, m in zip(before, model, strict=True))
    assert not any(m.merged for m in model)


def test_merge_is_idempotent_and_forward_uses_the_merged_weight_only():
    model = tiny_net()
    vl.apply_lora(model, vl.LoraConfig(targets="block.*", rank=2))
    randomize_lora(model)
    vl.merge(model)
    merged_weight = model.block[0].base.weight.clone()
    vl.merge(model)
    assert torch.equal(model.block[0].base.weight, merged_weight)
    with pytest.raises(vl.AdapterError, match=r"call vl.unmerge"):
        vl.set_adapter(model, "default")


def test_merge_and_unload_gives_original_classes_and_same_outputs():
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=7).eval()
    model = copy.deepcopy(base)
    vl.apply_lora(model, vl.LoraConfig(targets="layer4.*", rank=4, trainable=["fc"]))
    randomize_lora(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        adapted = model(x)
        plain = vl.merge_and_unload(model)
        assert plain is model
        assert_rel_close(plain(x), adapted)
    assert not any(isinstance(m, vl.LoraLayer) for m in plain.modules())
    assert [type(m) for m in plain.modules()] == [type(m) for m in base.modules()]
    assert list(plain.state_dict()) == list(base.state_dict())
    assert "_visionlora_configs" not in plain.__dict__
    assert base.load_state_dict(plain.state_dict(), strict=True)


def test_the_merge_finiteness_check_is_exact_even_when_the_sum_overflows():
    from visionlora.merge import all_finite

    big = torch.full((4,), 3e38)  # every element finite, their float32 sum is not
    assert all_finite(big) and all_finite(torch.zeros(3, dtype=torch.int64))
    assert all_finite(torch.full((1000,), 60000.0, dtype=torch.float16))  # summed in float32, not fp16
    for bad in (float("nan"), float("inf"), float("-inf")):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            t = torch.ones(5, dtype=dtype)
            t[3] = bad
            assert not all_finite(t), (bad, dtype)
    assert not all_finite(torch.tensor([float("inf"), float("-inf")]))  # their sum is NaN
