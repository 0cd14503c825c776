"""Adapted models under torch.compile, autocast, channels_last, state_dict and deepcopy."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import visionlora as vl
from tests.conftest import assert_rel_close, randomize_lora, tiny_net

X = torch.randn(2, 3, 12, 12)


def adapted(seed: int = 0):
    model = tiny_net(seed)
    vl.apply_lora(model, vl.LoraConfig(targets=["stem", "block.*", "fc"], rank=2, alpha=4))
    randomize_lora(model)
    return model


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    model = adapted()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_rel_close(compiled(X), model(X))
    compiled(X).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(X).sum().backward()
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, g in grads.items():
        assert_rel_close(g, dict(model.named_parameters())[n].grad, tol=1e-5)


def test_autocast_bf16_is_close_to_fp32():
    model = adapted()
    with torch.no_grad():
        reference = model(X)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(X)
    assert out.dtype == torch.bfloat16
    assert_rel_close(out.float(), reference, tol=3e-2)


def test_channels_last_inputs_and_model():
    model = adapted()
    with torch.no_grad():
        reference = model(X)
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        assert_rel_close(model_cl(X.to(memory_format=torch.channels_last)), reference)


def test_state_dict_round_trips_into_an_identically_adapted_model():
    model = adapted(seed=0)
    other = adapted(seed=1)
    other.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(other(X), model(X))


def test_deepcopy_is_independent():
    model = adapted()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(clone(X), model(X))
        clone.block[0].adapters["default"].lora_B.add_(1.0)
        assert not torch.equal(clone(X), model(X))
    assert vl.list_adapters(clone) == ["default"]
    vl.merge(clone)
    assert not model.block[0].merged


def test_torch_compile_fullgraph_weight_space_layer():
    timm_layers = pytest.importorskip("timm.layers")
    torch._dynamo.reset()
    model = nn.Sequential(timm_layers.StdConv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3))
    vl.apply_lora(model, vl.LoraConfig(targets=["0", "2"], rank=2))
    randomize_lora(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_rel_close(compiled(X), model(X))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_merge_equals_unmerged_and_unmerge_is_exact(dtype):
    model = adapted().to("cuda", dtype)
    x = X.to("cuda", dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = model(x)
        vl.merge(model)
        merged = model(x)
        vl.unmerge(model)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert_rel_close(merged.float(), unmerged.float(), tol=tol)
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())


def test_state_dict_of_a_merged_model_holds_unmerged_weights():
    model = adapted(seed=0)
    with torch.no_grad():
        expected = model(X)
        vl.merge(model)
        state = model.state_dict()
        other = adapted(seed=1)
        other.load_state_dict(state, strict=True)  # other is unmerged: the weights must be W, not W + ΔW
        assert_rel_close(other(X), expected)
        vl.merge(other)  # loading into a merged model unmerges it first
        other.load_state_dict(adapted(seed=2).state_dict())
        assert not other.block[0].merged
        assert torch.equal(other(X), adapted(seed=2)(X))


def test_lora_layers_are_freed_without_the_cycle_collector():
    import gc
    import weakref

    model = adapted()
    ref = weakref.ref(model.block[0])
    gc.disable()
    try:
        del model
        assert ref() is None
    finally:
        gc.enable()
