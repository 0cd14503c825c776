"""Each fast path of visionlora.fastpaths against the reference forward of visionlora.layers.

A fast path must give the reference's outputs and gradients (here in float64 to 1e-12, where the
two differ only by the order of float sums), run where its measurement says it pays, and decline
(return None, so the reference runs) wherever it would change results.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionlora as vl
from tests.conftest import assert_rel_close, randomize_lora, reference_conv, reference_conv_delta
from visionlora.fastpaths import _tall_t_mm, conv_gemm


def _reference(model: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The output of ``model`` (one LoRA layer) through the reference forward alone, and its input."""
    layer = model[0]
    fast, layer.fast = layer.fast, None
    try:
        x_ref = x.detach().clone().requires_grad_(x.requires_grad)
        return model(x_ref), [x_ref]
    finally:
        layer.fast = fast


def _assert_same_as_reference(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> None:
    """y = model(x) through its fast path, and its gradients, equal the reference forward's to 1e-12."""
    expected, (x_ref,) = _reference(model, x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.randn_like(y)
    ours = torch.autograd.grad(y, [x, *params], g, retain_graph=True)
    theirs = torch.autograd.grad(expected, [x_ref, *params], g)
    names = ["x", *(n for n, p in model.named_parameters() if p.requires_grad)]
    for name, a, b in zip(names, ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


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
        _assert_same_as_reference(model, x, y)
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
    _assert_same_as_reference(model, x, y)
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
    batched = x.dim() == conv.weight.dim()
    assert (conv_gemm(model[0], x) is not None) == (batched and conv.groups == 1)
    # The batched-GEMM form runs on ungrouped convs whose output is contiguous (channels-last is not).
    assert ("BaddbmmBackward0" in ops) == (batched and conv.groups == 1 and x.is_contiguous())
    if layout == "contiguous":  # A as a GEMM too where the conv is pointwise, unstrided, unpadded
        assert ("BmmBackward0" in ops) == (case in ("pointwise", "pointwise-same-reflect"))


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_runs_b_as_a_gemm_on_a_non_contiguous_input_and_a_through_the_conv(kernel):
    # As in ShuffleNet: the conv gets one half of a tensor's channels, a view that is not contiguous.
    model = _two_adapter_conv(nn.Conv2d(4, 6, kernel, padding=kernel // 2))
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64).chunk(2, dim=1)[1]
    assert not x.is_contiguous()
    ops = _assert_conv_is_the_textbook_formula(model, x)
    assert "BaddbmmBackward0" in ops and "BmmBackward0" not in ops


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
    x = torch.randn(batch, 4, size, size, dtype=torch.float64)
    assert (conv_gemm(model[0], x) is not None) == gemm
    ops = _assert_conv_is_the_textbook_formula(model, x)
    assert ("BaddbmmBackward0" in ops) == gemm


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 6, 1), nn.Conv2d(4, 6, 3, padding=1), nn.Conv1d(4, 6, 3)])
def test_conv_adapter_passes_an_empty_batch_through(conv):
    model = _two_adapter_conv(conv)
    x = torch.randn(0, 4, *[8] * (conv.weight.dim() - 2), dtype=torch.float64)
    assert conv_gemm(model[0], x) is None  # the reshapes of the GEMM form would fail on no samples
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
    assert "AddmmBackward0" in _graph_ops(y)  # the branch added into the base output
    assert torch.equal(model[0].base(x), torch.zeros(2, 16, dtype=dtype))
    reference, _ = _reference(model, x)
    torch.testing.assert_close(y, reference, rtol=0, atol=0)  # here both round the same
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_linear_adds_the_branch_with_one_rounding_at_most_as_far_off_as_the_reference(dtype):
    model = _two_adapter_linear(torch.float64, True)
    x = torch.randn(64, 12, dtype=torch.float64)
    exact = _textbook_linear(model[0], x)
    low = model.to(dtype)
    y = low(x.to(dtype))
    assert "AddmmBackward0" in _graph_ops(y) and "_LinearLoraBackward" not in _graph_ops(y)
    reference, _ = _reference(low, x.to(dtype))
    ours, theirs = (y.double() - exact).abs().mean(), (reference.double() - exact).abs().mean()
    assert ours <= theirs * 1.05, (ours, theirs)  # never worse than the reference, to noise
    assert_rel_close(y, exact, tol=1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_linear_with_dropout_adds_the_branches_as_the_reference_does_with_the_same_masks():
    model = _two_adapter_linear(torch.float64, True)
    for name in ("default", "second"):
        model[0].adapters[name].dropout = 0.3
    model.train()
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    y = model(x)
    assert "AddmmBackward0" in _graph_ops(y) and "_LinearLoraBackward" not in _graph_ops(y)
    torch.manual_seed(7)  # the reference draws the same dropout masks in the same order
    _assert_same_as_reference(model, x, y)
