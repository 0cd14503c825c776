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
from visionlora.layers import _tall_t_mm, conv_delta, linear_delta, lora_scale, lora_shapes, max_useful_rank

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


def _two_adapter_linear(dtype: torch.dtype, bias: bool) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 7, bias=bias)).to(dtype)
    vl.apply_lora(model, vl.LoraConfig(targets="0", rank=3, alpha=6))
    vl.apply_lora(model, vl.LoraConfig(targets="0", rank=2, alpha=5, rslora=True), adapter_name="second")
    randomize_lora(model)
    vl.set_adapter(model, {"default": 0.7, "second": -1.3})
    return model


def _textbook_linear(layer: vl.LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """base(x) + Σ w · s · (x Aᵀ) Bᵀ, through autograd's own matmuls."""
    y = F.linear(x, layer.base.weight, layer.base.bias)
    for name, w in layer.active.items():
        ad = layer.adapters[name]
        y = y + w * ad.scale * ((x @ ad.lora_A.T) @ ad.lora_B.T)
    return y


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("train_base", [True, False])
@pytest.mark.parametrize("tokens", [(3, 5), (3, 1001)], ids=["few-tokens", "tokens-split-over-threads"])
def test_linear_fast_path_outputs_and_gradients_are_the_textbook_formulas(bias, train_base, tokens):
    model = _two_adapter_linear(torch.float64, bias)
    layer = model[0]
    layer.base.requires_grad_(train_base)
    x = torch.randn(*tokens, 12, dtype=torch.float64, requires_grad=True)
    params = [x, *(p for p in model.parameters() if p.requires_grad)]
    with _threads(4):  # 3003 tokens: A's and B's gradients are summed over 3 slices of them
        y = model(x)
        assert type(y.grad_fn).__name__ == "_LinearLoraBackward"  # the fast path ran
        expected = _textbook_linear(layer, x)
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(y)
        ours = torch.autograd.grad(y, params, g)
        theirs = torch.autograd.grad(expected, params, g)
    names = ["x", *(n for n, p in model.named_parameters() if p.requires_grad)]
    for name, a, b in zip(names, ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    if x.numel() < 1000:  # double backward (a gradient penalty) goes through the backward's own ops
        assert torch.autograd.gradgradcheck(lambda x: model(x), (x,))


def _graph_ops(y: torch.Tensor) -> set[str]:
    """Names of the autograd nodes that produced y."""
    seen, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [next_fn for next_fn, _ in node.next_functions]
    return {type(node).__name__ for node in seen}


CONV_GRADIENT_CASES = {
    "pointwise": nn.Conv2d(6, 8, 1),
    "pointwise-grouped": nn.Conv2d(12, 16, 1, groups=2),
    "pointwise-strided-grouped": nn.Conv2d(12, 16, 1, stride=(2, 3), groups=2),
    "pointwise-same-reflect": nn.Conv1d(4, 6, 1, padding="same", padding_mode="reflect"),
    "pointwise-3d": nn.Conv3d(8, 8, 1, groups=2, bias=False),
    "pointwise-3d-strided": nn.Conv3d(8, 8, 1, stride=2, groups=2, bias=False),
    "3x3-grouped-dilated": nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2),
    "1x3x3-circular": nn.Conv3d(3, 5, (1, 3, 3), stride=(1, 2, 1), padding=1, padding_mode="circular"),
    "pointwise-padded": nn.Conv2d(4, 6, 1, padding=1, padding_mode="replicate"),
}


def _two_adapter_conv(conv: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(copy.deepcopy(conv).double())
    vl.apply_lora(model, vl.LoraConfig(targets="0", rank=2, alpha=5))
    vl.apply_lora(model, vl.LoraConfig(targets="0", rank=1, alpha=3, rslora=True), adapter_name="second")
    randomize_lora(model)
    vl.set_adapter(model, {"default": 0.7, "second": -1.3})
    return model


def _assert_conv_is_the_textbook_formula(model: nn.Sequential, x: torch.Tensor) -> set[str]:
    """model(x) and its gradients (x, A, B, bias) against conv(x, W + Σ w·s·ΔW) through autograd's
    own ops, in float64; returns the names of the autograd nodes model(x) ran."""
    layer, conv = model[0], model[0].base
    x.requires_grad_(True)
    y = model(x)
    delta = sum(
        w
        * reference_conv_delta(layer.adapters[n].lora_A, layer.adapters[n].lora_B, layer.adapters[n].scale, conv.groups)
        for n, w in layer.active.items()
    )
    expected = reference_conv(conv, x, conv.weight + delta)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    params = [x, *(p for p in model.parameters() if p.requires_grad)]
    g = torch.randn_like(y)
    names = ["x", *(n for n, p in model.named_parameters() if p.requires_grad)]
    for name, a, b in zip(
        names, torch.autograd.grad(y, params, g), torch.autograd.grad(expected, params, g), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    return _graph_ops(y)


@pytest.mark.parametrize("layout", ["contiguous", "channels-last", "unbatched"])
@pytest.mark.parametrize("case", list(CONV_GRADIENT_CASES))
def test_conv_outputs_and_gradients_are_the_textbook_formulas(case, layout):
    conv = CONV_GRADIENT_CASES[case]
    model = _two_adapter_conv(conv)
    x = torch.randn(3, conv.in_channels, *[9] * (conv.weight.dim() - 2), dtype=torch.float64)
    if layout == "channels-last" and conv.weight.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "unbatched":
        x = x[0]
    ops = _assert_conv_is_the_textbook_formula(model, x)
    if layout == "contiguous":  # the batched-GEMM form ran where it applies
        assert ("BaddbmmBackward0" in ops) == (conv.groups == 1)
        assert ("BmmBackward0" in ops) == (case in ("pointwise", "pointwise-same-reflect"))


@pytest.mark.parametrize(
    ("kernel", "batch", "size", "gemm"),
    [
        (1, 16, 4, True),  # few samples: GEMMs
        (3, 16, 4, True),
        (1, 17, 4, False),  # many samples of few positions: the convs
        (3, 17, 4, False),
        (1, 17, 7, True),  # pointwise with 49 positions per sample: GEMMs
        (3, 17, 7, False),  # not pointwise: the convs
    ],
)
def test_conv_takes_the_gemm_form_where_it_was_measured_faster_and_is_exact_either_way(kernel, batch, size, gemm):
    model = _two_adapter_conv(nn.Conv2d(4, 6, kernel, padding=kernel // 2))
    ops = _assert_conv_is_the_textbook_formula(model, torch.randn(batch, 4, size, size, dtype=torch.float64))
    assert ("BaddbmmBackward0" in ops) == gemm


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 6, 1), nn.Conv2d(4, 6, 3, padding=1), nn.Conv1d(4, 6, 3)])
def test_conv_adapter_passes_an_empty_batch_through(conv):
    model = _two_adapter_conv(conv)
    x = torch.randn(0, 4, *[8] * (conv.weight.dim() - 2), dtype=torch.float64)
    assert torch.equal(model(x), model[0].base(x))
    assert model(x).shape[0] == 0


@pytest.mark.parametrize(
    "conv", [nn.Conv2d(16, 32, 1), nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(16, 32, 1, stride=2)]
)
def test_conv_keeps_for_backward_only_the_input_and_the_rank_r_activations(conv):
    model = vl.apply_lora(nn.Sequential(conv), vl.LoraConfig(targets="0", rank=4))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    x = torch.randn(5, 16, 12, 12, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    h_bytes = y.shape[0] * 4 * y[0, 0].numel() * 4  # h: n × r × positions, float32
    assert sorted(saved.values()) == sorted([h_bytes, x.untyped_storage().nbytes()])


@pytest.mark.parametrize("n", [1, 511, 1024, 1025, 3003, 4096])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_tall_transposed_product_equals_the_plain_product(n, threads):
    p, q = torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 7, dtype=torch.float64)
    with _threads(threads):
        torch.testing.assert_close(_tall_t_mm(p, q), p.t() @ q, rtol=1e-12, atol=1e-12)
        q_strided = torch.randn(7, n, dtype=torch.float64).t()  # not contiguous: the plain product
        torch.testing.assert_close(_tall_t_mm(p, q_strided), p.t() @ q_strided, rtol=1e-12, atol=1e-12)


def test_linear_under_torch_func_transforms_gives_the_textbook_gradients_and_outputs():
    model = _two_adapter_linear(torch.float64, True)
    layer = model[0]
    x = torch.randn(4, 12, dtype=torch.float64)
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(model, {**frozen, **p}, (x,)).square().sum()

    grads = torch.func.grad(loss)(trained)
    expected = torch.autograd.grad(_textbook_linear(layer, x).square().sum(), [model.get_parameter(n) for n in trained])
    for (name, g), e in zip(grads.items(), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=name)
    per_sample = torch.func.vmap(lambda row: model(row))(x)
    torch.testing.assert_close(per_sample, _textbook_linear(layer, x), rtol=1e-12, atol=1e-12)


def test_linear_fast_path_in_float32_matches_the_textbook_formula_to_rounding():
    model = _two_adapter_linear(torch.float32, True)
    x = torch.randn(4, 6, 12, requires_grad=True)
    y = model(x)
    expected = _textbook_linear(model[0], x)
    assert_rel_close(y, expected)
    g = torch.randn_like(y)
    params = [x, *(p for p in model.parameters() if p.requires_grad)]
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(expected, params, g), strict=True):
        assert_rel_close(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_linear_adds_the_branch_so_small_updates_show(dtype):
    # W + s·B·A rounded to bf16/fp16 would lose a branch this small; the added branch keeps it.
    model = nn.Sequential(nn.Linear(16, 16, bias=False)).to(dtype)
    with torch.no_grad():  # large weights whose products cancel: base output 0
        model[0].weight.copy_(64.0 * torch.tensor([1.0, -1.0]).repeat(16, 8))
    vl.apply_lora(model, vl.LoraConfig(targets="0", rank=2, alpha=2))
    with torch.no_grad():
        model[0].adapters["default"].lora_A.fill_(0.01)
        model[0].adapters["default"].lora_B.fill_(0.01)
    x = torch.ones(2, 16, dtype=dtype)
    y = model(x)
    assert type(y.grad_fn).__name__ != "_LinearLoraBackward"
    assert torch.equal(model[0].base(x), torch.zeros(2, 16, dtype=dtype))
    torch.testing.assert_close(y.float(), torch.full((2, 16), 0.0032), rtol=0.01, atol=0)  # 16 · 0.01 · 0.01 · 2


@pytest.mark.parametrize("case", ["dropout", "autocast", "weight_space"])
def test_linear_falls_back_to_the_branch_form_where_the_fast_path_would_change_results(case):
    model = _two_adapter_linear(torch.float32, True)
    x = torch.randn(4, 12)
    if case == "dropout":
        model[0].adapters["second"].dropout = 0.5
        model.train()
        assert type(model(x).grad_fn).__name__ != "_LinearLoraBackward"
        model.eval()  # dropout is off in eval: the fast path runs
        assert type(model(x).grad_fn).__name__ == "_LinearLoraBackward"
    elif case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert type(model(x).grad_fn).__name__ != "_LinearLoraBackward"
    else:
        model[0].weight_space = True
        y = model(x)
        assert type(y.grad_fn).__name__ != "_LinearLoraBackward"
        assert_rel_close(y, _textbook_linear(model[0], x))


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
