"""LoRA layer math against textbook formulas, over every conv configuration torch accepts."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from torch import nn

import visionlora as vl
from tests.conftest import assert_rel_close, conv_magnitude, randomize_lora, reference_conv, reference_conv_delta
from tests.strategies import ConvCase, conv_cases
from visionlora.lora_math import conv_delta, linear_delta, lora_scale, lora_shapes, max_useful_rank

CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def test_lora_scale_is_alpha_over_r_or_sqrt_r():
    assert lora_scale(8, 4) == 2.0
    assert lora_scale(8, 16, rslora=True) == 2.0
    assert lora_scale(3, 9, rslora=True) == pytest.approx(1.0)


def test_linear_delta_is_scaled_b_at_a():
    a, b = torch.randn(3, 7), torch.randn(5, 3)
    expected = torch.stack(
        [torch.stack([0.5 * sum(b[o, k] * a[k, i] for k in range(3)) for i in range(7)]) for o in range(5)]
    )
    torch.testing.assert_close(linear_delta(a, b, 0.5), expected)


@pytest.mark.parametrize(
    "groups,in_ch,out_ch,kernel", [(1, 4, 6, (3, 3)), (2, 4, 6, (1, 3)), (4, 4, 8, (3, 2)), (3, 3, 3, (5, 5))]
)
def test_conv_delta_matches_per_group_formula_and_kernel_shape(groups, in_ch, out_ch, kernel):
    conv = nn.Conv2d(in_ch, out_ch, kernel, groups=groups)
    a_shape, b_shape = lora_shapes(conv, 2)
    a, b = torch.randn(a_shape), torch.randn(b_shape)
    delta = conv_delta(a, b, 1.5, groups)
    assert delta.shape == conv.weight.shape
    torch.testing.assert_close(delta, reference_conv_delta(a, b, 1.5, groups))
    for block in delta.reshape(groups, out_ch // groups, -1):
        assert torch.linalg.matrix_rank(block) <= 2


def test_max_useful_rank():
    assert max_useful_rank(nn.Linear(10, 4)) == 4
    assert max_useful_rank(nn.Conv2d(8, 16, 3)) == 16  # min(16, 8·9)
    assert max_useful_rank(nn.Conv2d(8, 8, 3, groups=8)) == 1  # depthwise: one output per group


def _check_conv_case(case: ConvCase) -> None:
    torch.manual_seed(0)
    conv = CONV_TYPES[case.dims](**case.kwargs())
    model = nn.Sequential(conv)
    x = torch.randn(2, case.in_channels, *case.size)
    base_out = conv(x)
    w0 = conv.weight.detach().clone()
    with pytest.warns(UserWarning) if _warns(conv, case.rank, case.conv_groups) else contextlib.nullcontext():
        vl.apply_lora(model, vl.LoraConfig(targets="0", rank=case.rank, alpha=case.alpha, conv_groups=case.conv_groups))
    layer = model[0]
    assert torch.equal(model(x), base_out)  # fresh adapter: B = 0

    randomize_lora(model, seed=1)
    adapter = layer.adapters["default"]
    scale = case.alpha / case.rank
    delta = reference_conv_delta(adapter.lora_A.detach(), adapter.lora_B.detach(), scale, case.groups)
    assert delta.shape == conv.weight.shape
    delta64 = reference_conv_delta(adapter.lora_A.double(), adapter.lora_B.double(), scale, case.groups)
    for block in delta64.detach().reshape(case.groups, case.out_channels // case.groups, -1):
        assert torch.linalg.matrix_rank(block) <= case.rank
    if case.conv_groups == "shared":  # one factorisation: the whole (out × in/g·k) kernel matrix has rank <= r
        assert torch.linalg.matrix_rank(delta64.detach().reshape(case.out_channels, -1)) <= case.rank
    expected = reference_conv(conv, x, w0 + delta)
    abs_delta = reference_conv_delta(adapter.lora_A.detach().abs(), adapter.lora_B.detach().abs(), scale, case.groups)
    magnitude = conv_magnitude(conv, x, w0.abs() + abs_delta)  # the scale fp32 rounding is relative to

    unmerged = model(x)
    assert_rel_close(unmerged, expected, magnitude=magnitude)
    fast, layer.fast = layer.fast, None  # the reference forward alone (tests/test_fastpaths.py compares the two)
    assert_rel_close(model(x), expected, magnitude=magnitude)
    layer.fast = fast
    unmerged.sum().backward()
    assert conv.weight.grad is None and (conv.bias is None or conv.bias.grad is None)
    assert adapter.lora_A.grad is not None and adapter.lora_B.grad is not None

    with torch.no_grad():
        vl.merge(model)
        assert_rel_close(model(x), expected, magnitude=magnitude)
        assert_rel_close(model(x), unmerged, magnitude=magnitude)
        vl.unmerge(model)
    assert torch.equal(conv.weight, w0)
    assert_rel_close(model(x), unmerged, magnitude=magnitude)


def _warns(conv: nn.Module, rank: int, conv_groups: str) -> bool:
    a_shape, b_shape = lora_shapes(conv, rank, conv_groups)
    too_big = math.prod(a_shape) + math.prod(b_shape) > conv.weight.numel()
    return rank > max_useful_rank(conv, conv_groups) or too_big


DEPTHWISE_MULTIPLIER = ConvCase(2, 4, 12, (3, 3), (1, 1), "same", (2, 2), 4, True, "reflect", 2, 8.0, (9, 9))
DEPTHWISE_SHARED = ConvCase(2, 6, 6, (3, 3), (2, 2), 1, (1, 1), 6, False, "circular", 3, 8.0, (9, 9), "shared")
EVEN_SAME = ConvCase(2, 6, 4, (4, 2), (1, 1), "same", (3, 1), 2, False, "circular", 5, 3.0, (11, 8))
STRIDED_REPLICATE = ConvCase(2, 3, 6, (3, 3), (2, 3), (1, 2), (1, 2), 3, True, "replicate", 4, 16.0, (10, 10))


@settings(max_examples=150, deadline=None)
@given(conv_cases(dims=2))
@example(DEPTHWISE_MULTIPLIER)
@example(DEPTHWISE_SHARED)
@example(EVEN_SAME)
@example(STRIDED_REPLICATE)
def test_conv2d_fresh_unmerged_merged_reference_agree(case):
    _check_conv_case(case)


@settings(max_examples=30, deadline=None)
@given(conv_cases(dims=1))
def test_conv1d_agrees_with_reference(case):
    _check_conv_case(case)


CANCELLING_3D = ConvCase(3, 1, 1, (1, 1, 1), (1, 1, 1), 0, (1, 1, 1), 1, False, "zeros", 3, 8.0, (7, 7, 7))


@settings(max_examples=20, deadline=None)
@given(conv_cases(dims=3))
@example(CANCELLING_3D)  # outputs ~1e-4 summed from terms ~1: rounding is relative to the terms
def test_conv3d_agrees_with_reference(case):
    _check_conv_case(case)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rslora", [True, False])
def test_linear_fresh_unmerged_merged_reference_agree(bias, rslora):
    torch.manual_seed(0)
    lin = nn.Linear(12, 7, bias=bias)
    model = nn.Sequential(lin)
    x = torch.randn(3, 5, 12)
    base_out = lin(x)
    w0 = lin.weight.detach().clone()
    vl.apply_lora(model, vl.LoraConfig(targets="0", rank=3, alpha=6, rslora=rslora))
    assert torch.equal(model(x), base_out)
    randomize_lora(model)
    ad = model[0].adapters["default"]
    scale = 6 / math.sqrt(3) if rslora else 6 / 3
    expected = x @ (w0 + scale * ad.lora_B.detach() @ ad.lora_A.detach()).T + (lin.bias if bias else 0)
    assert_rel_close(model(x), expected)
    with torch.no_grad():
        vl.merge(model)
        assert_rel_close(model(x), expected)
        vl.unmerge(model)
    assert torch.equal(lin.weight, w0)


def test_dropout_applies_to_the_branch_input_only_in_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    vl.apply_lora(model, vl.LoraConfig(targets="0", rank=4, dropout=0.5))
    randomize_lora(model)
    x = torch.randn(64, 16)
    model.train()
    torch.manual_seed(1)
    y_train = model(x)
    torch.manual_seed(1)
    ad = model[0].adapters["default"]
    x_drop = F.dropout(x, 0.5, True)
    expected = model[0].base(x) + ad.scale * (x_drop @ ad.lora_A.T @ ad.lora_B.T)
    assert_rel_close(y_train, expected)
    model.eval()
    expected_eval = model[0].base(x) + ad.scale * (x @ ad.lora_A.T @ ad.lora_B.T)
    assert_rel_close(model(x), expected_eval)


def test_gaussian_init_has_std_one_over_r_and_kaiming_is_bounded():
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    vl.apply_lora(
        model, vl.LoraConfig(targets="0", rank=8, init="gaussian"), generator=torch.Generator().manual_seed(0)
    )
    vl.apply_lora(
        model, vl.LoraConfig(targets="1", rank=8), adapter_name="k", generator=torch.Generator().manual_seed(0)
    )
    a_gauss = model[0].adapters["default"].lora_A
    assert a_gauss.std().item() == pytest.approx(1 / 8, rel=0.05)
    a_kaiming = model[1].adapters["k"].lora_A
    assert a_kaiming.abs().max().item() <= 1 / math.sqrt(256) + 1e-6  # kaiming_uniform(a=√5) bound = 1/√fan_in
    assert torch.count_nonzero(model[0].adapters["default"].lora_B) == 0


def test_generator_makes_init_reproducible():
    def build():
        m = nn.Sequential(nn.Conv2d(4, 4, 3))
        return vl.apply_lora(m, vl.LoraConfig(targets="0", rank=2), generator=torch.Generator().manual_seed(7))

    assert torch.equal(build()[0].adapters["default"].lora_A, build()[0].adapters["default"].lora_A)


def test_same_outputs_as_peft_for_plain_linear_and_conv():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    ours = vl.apply_lora(copy.deepcopy(base), vl.LoraConfig(targets=["0", "2"], rank=2, alpha=12))
    randomize_lora(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["0", "2"], r=2, lora_alpha=12))
    with torch.no_grad():
        for idx in ("0", "2"):
            peft_layer = theirs.base_model.model.get_submodule(idx)
            ad = ours.get_submodule(idx).adapters["default"]
            peft_layer.lora_A["default"].weight.copy_(ad.lora_A.reshape(peft_layer.lora_A["default"].weight.shape))
            peft_layer.lora_B["default"].weight.copy_(ad.lora_B.reshape(peft_layer.lora_B["default"].weight.shape))
    x = torch.randn(2, 3, 6, 6)
    assert_rel_close(ours(x), theirs(x))


@pytest.mark.parametrize("conv", [nn.Conv2d(64, 64, 3, groups=64), nn.Conv2d(32, 128, 7, groups=32)])
def test_shared_layout_keeps_depthwise_adapters_smaller_than_the_layer(conv):
    shared = nn.Sequential(copy.deepcopy(conv))
    vl.apply_lora(shared, vl.LoraConfig(targets="0", rank=4, conv_groups="shared"))  # no warning (warnings fail)
    ad = shared[0].adapters["default"]
    assert ad.lora_A.shape == (4, 1, *conv.kernel_size)
    assert ad.lora_A.numel() + ad.lora_B.numel() == 4 * (conv.out_channels + conv.kernel_size[0] ** 2)
    assert ad.lora_A.numel() + ad.lora_B.numel() < conv.weight.numel()
    with pytest.warns(UserWarning) as record:
        vl.apply_lora(nn.Sequential(copy.deepcopy(conv)), vl.LoraConfig(targets="0", rank=4))
    assert any(
        "more parameters than the layer" in str(w.message) and "conv_groups='shared'" in str(w.message) for w in record
    )


def test_conv_delta_shared_layout_reuses_one_a_for_every_group():
    a, b = torch.randn(2, 3, 3, 3), torch.randn(8, 2, 1, 1)  # groups = 4, in/g = 3, out/g = 2
    delta = conv_delta(a, b, 0.5, 4)
    for j in range(4):
        expected = 0.5 * b[2 * j : 2 * j + 2, :, 0, 0] @ a.reshape(2, -1)
        torch.testing.assert_close(delta[2 * j : 2 * j + 2].reshape(2, -1), expected)
