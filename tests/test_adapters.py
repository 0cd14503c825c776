"""Several named adapters: switch, weighted combination, disable, delete."""

from __future__ import annotations

import copy

import pytest
import torch

import visionlora as vl
from tests.conftest import assert_rel_close, randomize_lora, tiny_net
from tests.test_merge import textbook_merged_copy


@pytest.fixture
def two_adapters():
    base = tiny_net()
    model = copy.deepcopy(base)
    vl.apply_lora(model, vl.LoraConfig(targets="block.*", rank=2, alpha=4))
    vl.apply_lora(model, vl.LoraConfig(targets=["block.0", "fc"], rank=3, alpha=3), adapter_name="b")
    randomize_lora(model, std=0.2)
    return base, model


X = torch.randn(2, 3, 12, 12)
ALPHAS = {"default": 4.0, "b": 3.0}


def test_new_adapter_is_active_and_switching_selects_each(two_adapters):
    base, model = two_adapters
    assert vl.list_adapters(model) == ["default", "b"]
    assert vl.active_adapters(model) == {"b": 1.0}
    with torch.no_grad():
        for active in ("default", "b"):
            vl.set_adapter(model, active)
            assert_rel_close(model(X), textbook_merged_copy(base, model, ALPHAS, {active: 1.0})(X))
        assert not torch.allclose(model(X), base(X))


def test_weighted_combination_unmerged_equals_merged_equals_reference(two_adapters):
    base, model = two_adapters
    vl.set_adapter(model, {"default": 0.5, "b": -1.5})
    assert model.block[0].active == {"default": 0.5, "b": -1.5} and model.block[2].active == {"default": 0.5}
    with torch.no_grad():
        expected = textbook_merged_copy(base, model, ALPHAS, {"default": 0.5, "b": -1.5})(X)
        unmerged = model(X)
        assert_rel_close(unmerged, expected)
        vl.merge(model)
        assert_rel_close(model(X), expected)
        vl.unmerge(model)


def test_disable_gives_base_outputs_exactly(two_adapters):
    base, model = two_adapters
    with torch.no_grad():
        vl.disable_adapters(model)
        assert torch.equal(model(X), base(X))
        with pytest.raises(vl.AdapterError, match="enable_adapters"):
            vl.merge(model)
        vl.enable_adapters(model)
        assert not torch.equal(model(X), base(X))


def test_delete_adapter_and_last_delete_restores_plain_modules(two_adapters):
    base, model = two_adapters
    vl.delete_adapter(model, "b")
    assert vl.list_adapters(model) == ["default"]
    assert isinstance(model.fc, torch.nn.Linear) and not isinstance(model.fc, vl.LoraLayer)
    vl.delete_adapter(model, "default")
    assert not any(isinstance(m, vl.LoraLayer) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(X), base(X))


def test_unknown_adapter_names_are_listed(two_adapters):
    _, model = two_adapters
    with pytest.raises(vl.AdapterError, match=r"unknown adapter\(s\) \['c'\]; the model has \['default', 'b'\]"):
        vl.set_adapter(model, ["default", "c"])
    with pytest.raises(vl.AdapterError, match="invalid"):
        vl.apply_lora(model, vl.LoraConfig(targets="stem"), adapter_name="a.b")


def test_new_adapter_trains_alone(two_adapters):
    _, model = two_adapters
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "block.0.adapters.b.lora_A",
        "block.0.adapters.b.lora_B",
        "fc.adapters.b.lora_A",
        "fc.adapters.b.lora_B",
    }


@pytest.mark.parametrize("bad", [{"default": "x"}, {"default": float("nan")}, {"default": True}, 3, {1: 1.0}])
def test_set_adapter_refuses_bad_names_and_weights(two_adapters, bad):
    _, model = two_adapters
    with pytest.raises(vl.AdapterError, match="set_adapter"):
        vl.set_adapter(model, bad)
    assert vl.active_adapters(model) == {"b": 1.0}


def test_set_adapter_takes_numpy_weights_and_refuses_overflowing_ones(two_adapters):
    import numpy as np

    _, model = two_adapters
    vl.set_adapter(model, {"default": np.float32(0.5)})
    assert vl.active_adapters(model) == {"default": 0.5}
    with pytest.raises(vl.AdapterError, match="weights finite numbers"):
        vl.set_adapter(model, {"default": 10**400})


@pytest.mark.parametrize(
    "call", [vl.list_adapters, lambda m: vl.set_adapter(m, "a"), lambda m: vl.delete_adapter(m, "a")]
)
def test_functions_given_no_model_say_so(call):
    with pytest.raises(vl.UnsupportedModuleError, match=r"model: expected a torch\.nn\.Module, got NoneType"):
        call(None)
