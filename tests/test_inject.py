"""Target selection, errors, per-layer ranks and alphas, trainability, summary."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import visionlora as vl
from tests.conftest import tiny_net
from visionlora.state import lora_layers


def names(model: nn.Module) -> list[str]:
    return [n for n, _ in lora_layers(model)]


@pytest.fixture(scope="module")
def resnet18_layout() -> nn.Module:
    return torchvision.models.resnet18()


def test_wildcard_takes_the_convs_not_the_batchnorms():
    model = torchvision.models.resnet18()
    vl.apply_lora(model, vl.LoraConfig(targets="layer4.*"))
    assert names(model) == [
        "layer4.0.conv1",
        "layer4.0.conv2",
        "layer4.0.downsample.0",
        "layer4.1.conv1",
        "layer4.1.conv2",
    ]
    assert isinstance(model.layer4[0].bn1, nn.BatchNorm2d)


def test_exact_name_in_sequential_matches_only_that_module():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])
    vl.apply_lora(model, vl.LoraConfig(targets="1", rank=2))
    assert names(model) == ["1"]


def test_regex_prefix_and_type_filter():
    model = tiny_net()
    vl.apply_lora(model, vl.LoraConfig(targets="re:(stem|block\\.\\d|fc)", target_types=["Linear"], rank=2))
    assert names(model) == ["fc"]
    model = tiny_net()
    vl.apply_lora(model, vl.LoraConfig(targets="re:(stem|block\\.\\d|fc)", target_types=["Conv2d"], rank=2))
    assert names(model) == ["stem", "block.0", "block.2"]


def test_exclude_removes_layers_from_wildcards():
    model = torchvision.models.resnet18()
    vl.apply_lora(model, vl.LoraConfig(targets="layer4.*", exclude=["*downsample*"]))
    assert "layer4.0.downsample.0" not in names(model) and len(names(model)) == 4


def test_pattern_matching_nothing_names_the_pattern_and_near_names():
    model = torchvision.models.resnet18()
    with pytest.raises(vl.TargetError, match=r"'layer5\.\*'.*no module; near names: layer.*"):
        vl.apply_lora(model, vl.LoraConfig(targets="layer5.*"))
    with pytest.raises(
        vl.TargetError, match=r"target 'layer4.0.conv9': no module of that name; near names: .*layer4.0.conv1"
    ):
        vl.apply_lora(model, vl.LoraConfig(targets="layer4.0.conv9"))


def test_wildcard_over_only_unsupported_modules_lists_their_types():
    model = torchvision.models.resnet18()
    with pytest.raises(vl.TargetError, match=r"'\*bn\*'.*only modules of type BatchNorm2d"):
        vl.apply_lora(model, vl.LoraConfig(targets="*bn*"))


def test_exact_name_of_unsupported_module_names_it_and_its_type():
    model = torchvision.models.resnet18()
    with pytest.raises(vl.UnsupportedModuleError, match=r"'layer4.0.bn1' is a BatchNorm2d"):
        vl.apply_lora(model, vl.LoraConfig(targets="layer4.0.bn1"))
    with pytest.raises(vl.UnsupportedModuleError, match=r"'layer4' is a Sequential.*use 'layer4.\*'"):
        vl.apply_lora(model, vl.LoraConfig(targets="layer4"))
    with pytest.raises(TypeError):  # also catchable as the builtin
        vl.apply_lora(model, vl.LoraConfig(targets="layer4"))


def test_an_embedding_and_a_multihead_attention_projection_are_refused_by_name():
    model = nn.Sequential(nn.Embedding(10, 8), nn.MultiheadAttention(8, 2))
    with pytest.raises(vl.UnsupportedModuleError, match="Embedding"):
        vl.apply_lora(model, vl.LoraConfig(targets="0"))
    with pytest.raises(vl.UnsupportedModuleError, match="reads the weight directly in its fast path"):
        vl.apply_lora(model, vl.LoraConfig(targets="1.out_proj"))


def test_applying_twice_is_an_error_unless_a_new_named_adapter():
    model = tiny_net()
    cfg = vl.LoraConfig(targets="block.*", rank=2)
    vl.apply_lora(model, cfg)
    with pytest.raises(vl.AdapterError, match=r"'block.0' already has adapter 'default'; pass adapter_name="):
        vl.apply_lora(model, cfg)
    vl.apply_lora(model, cfg, adapter_name="second")
    assert list(model.block[0].adapters) == ["default", "second"]
    assert model.block[0].active == {"second": 1.0}


def test_failed_apply_changes_nothing():
    model = tiny_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(vl.TargetError):
        vl.apply_lora(model, vl.LoraConfig(targets=["block.*", "nothing.*"]))
    assert names(model) == [] and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_rank_and_alpha_pattern_precedence_exact_then_first_match():
    model = torchvision.models.resnet18()
    cfg = vl.LoraConfig(
        targets="layer4.*",
        rank=4,
        alpha=8,
        rank_pattern={"layer4.0.*": 16, "layer4.*.conv2": 2, "layer4.1.conv2": 32},
        alpha_pattern={"*.conv1": 1.0, "layer4.0.conv1": 3.0},
    )
    vl.apply_lora(model, cfg)
    got = {n: (layer.adapters["default"].rank, layer.adapters["default"].alpha) for n, layer in lora_layers(model)}
    assert got == {
        "layer4.0.conv1": (16, 3.0),  # first rank pattern; exact alpha name beats the earlier pattern
        "layer4.0.conv2": (16, 8.0),  # 'layer4.0.*' comes before 'layer4.*.conv2'
        "layer4.0.downsample.0": (16, 8.0),
        "layer4.1.conv1": (4, 1.0),
        "layer4.1.conv2": (32, 8.0),  # exact name wins over the earlier 'layer4.*.conv2'
    }
    assert model.layer4[0].conv1.adapters["default"].scale == 3.0 / 16


def test_rank_pattern_that_selects_no_target_is_an_error():
    model = torchvision.models.resnet18()
    with pytest.raises(vl.TargetError, match=r"rank_pattern key 'layer3.\*' selects none of the 5 targeted layers"):
        vl.apply_lora(model, vl.LoraConfig(targets="layer4.*", rank_pattern={"layer3.*": 8}))


def test_only_lora_and_trainable_params_require_grad_and_receive_gradients():
    model = torchvision.models.resnet18(num_classes=3)
    vl.apply_lora(model, vl.LoraConfig(targets="layer4.*", rank=2, trainable=["fc"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n} | {"fc.weight", "fc.bias"}
    assert len(trainable) == 2 * 5 + 2
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable


def test_bias_modes():
    def trained_biases(bias: str) -> set[str]:
        model = tiny_net()
        vl.apply_lora(model, vl.LoraConfig(targets="block.*", rank=2, bias=bias))
        return {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}

    assert trained_biases("none") == set()
    assert trained_biases("lora_only") == {"block.0.base.bias", "block.2.base.bias"}
    assert trained_biases("all") == {"stem.bias", "bn.bias", "block.0.base.bias", "block.2.base.bias", "fc.bias"}


def test_trainable_module_is_not_adapted_by_wildcards_and_conflicts_when_named():
    model = tiny_net()
    vl.apply_lora(model, vl.LoraConfig(targets="*", rank=2, trainable=["fc"]))
    assert "fc" not in names(model) and model.fc.weight.requires_grad
    with pytest.raises(vl.TargetError, match="'fc' is also listed in trainable"):
        vl.apply_lora(tiny_net(), vl.LoraConfig(targets="fc", trainable=["fc"]))


def test_rank_above_usable_and_oversized_adapter_warn_once_each():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Linear(6, 4))
    with pytest.warns(UserWarning) as record:
        vl.apply_lora(model, vl.LoraConfig(targets="*", rank=5))
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert (
        "rank above what the layer can use" in messages[0]
        and "0 (r=5 > 1)" in messages[0]
        and "1 (r=5 > 4)" in messages[0]
    )
    assert "more parameters than the layer" in messages[1]


def test_summary_lists_layers_ranks_and_totals():
    model = torchvision.models.resnet18(num_classes=10)
    vl.apply_lora(
        model, vl.LoraConfig(targets="layer4.*", rank=4, alpha=8, rank_pattern={"layer4.0.*": 16}, trainable=["fc"])
    )
    text = vl.summary(model)
    lines = text.splitlines()
    assert lines[0].split() == [
        "layer",
        "adapter",
        "kind",
        "in/out",
        "kernel",
        "groups",
        "resolution",
        "rank",
        "alpha",
        "family",
        "LoRA",
        "params",
    ]
    row = next(line for line in lines if line.startswith("layer4.0.conv2 "))
    assert row.split() == [
        "layer4.0.conv2",
        "default",
        "Conv2d",
        "512/512",
        "3x3",
        "1",
        "-",  # no probe: resolution not measured
        "16",
        "8",
        "lora",
        f"{16 * 512 * 9 + 512 * 16:,}",
    ]
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    total = sum(p.numel() for p in model.parameters())
    trainable = lora + 512 * 10 + 10
    assert f"LoRA params: {lora:,}" in text
    assert f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)" in text


def test_root_module_and_lora_internals_are_never_targets():
    model = nn.Sequential(nn.Linear(4, 4))
    vl.apply_lora(model, vl.LoraConfig(targets="*", rank=2))
    assert names(model) == ["0"]
    with pytest.raises(vl.TargetError, match="no module of that name"):
        vl.apply_lora(model, vl.LoraConfig(targets="0.base"), adapter_name="x")


def test_lazy_and_parametrized_layers_are_refused():
    with pytest.raises(vl.UnsupportedModuleError, match="lazy layer is not initialised"):
        vl.apply_lora(nn.Sequential(nn.LazyLinear(4)), vl.LoraConfig(targets="0"))
    lin = nn.Linear(4, 4)
    torch.nn.utils.parametrizations.orthogonal(lin)
    with pytest.raises(vl.UnsupportedModuleError, match="parametrizations"):
        vl.apply_lora(nn.Sequential(lin), vl.LoraConfig(targets="0"))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return (
        list(after) == list(before)
        and all(torch.equal(before[k], after[k]) for k in before)
        and not any(isinstance(m, vl.LoraLayer) for m in model.modules())
    )


@pytest.mark.parametrize("name", ["training", "forward", "keys", "to", "a.b", ""])
def test_adapter_names_that_torch_cannot_hold_are_refused_before_any_change(name):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    before = _state(model)
    with pytest.raises(vl.AdapterError, match="adapter name"):
        vl.apply_lora(model, vl.LoraConfig(targets="*", rank=2), adapter_name=name)
    assert _unchanged(model, before)


def test_layers_with_forward_hooks_are_refused():
    with pytest.warns(FutureWarning):
        legacy = nn.utils.weight_norm(nn.Conv2d(3, 4, 3))
    hooked = nn.Conv2d(3, 4, 3)
    hooked.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    for layer in (legacy, hooked, nn.utils.spectral_norm(nn.Linear(4, 4))):
        with pytest.raises(vl.UnsupportedModuleError, match="has forward hooks"):
            vl.apply_lora(nn.Sequential(layer), vl.LoraConfig(targets="0"))


def test_tied_weights_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    with pytest.raises(vl.TargetError, match=r"'0': its weight is tied to '1.weight'"):
        vl.apply_lora(model, vl.LoraConfig(targets="0"))


def test_a_module_reachable_by_two_names_is_refused():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.head = self.fc  # registered twice

        def forward(self, x):
            return self.head(x)

    with pytest.raises(vl.TargetError, match=r"'fc' is the same module object as 'head'"):
        vl.apply_lora(Shared(), vl.LoraConfig(targets="fc"))


def test_huge_rank_is_a_config_error():
    with pytest.raises(vl.ConfigError, match=r"rank_pattern\['1'\]: rank 10000000000000 is invalid"):
        vl.LoraConfig(targets="*", rank_pattern={"1": 10**13})


def test_a_failure_while_building_adapters_leaves_the_model_unchanged(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    before = _state(model)
    calls = []

    def failing_init(a, rank, generator=None):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("simulated out of memory on the second layer")

    monkeypatch.setitem(vl.inject._INITS, "kaiming", failing_init)
    with pytest.raises(MemoryError):
        vl.apply_lora(model, vl.LoraConfig(targets="*", rank=2))
    assert _unchanged(model, before) and vl.list_adapters(model) == []


def test_a_config_edited_after_construction_is_checked_again():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    before = _state(model)
    cfg = vl.LoraConfig(targets="*", rank=2)
    cfg.rank = 0
    with pytest.raises(vl.ConfigError, match="rank 0 is invalid"):
        vl.apply_lora(model, cfg)
    cfg.rank, cfg.init = 2, "xavier"
    with pytest.raises(vl.ConfigError, match=r"init: expected 'kaiming' \| 'gaussian'"):
        vl.apply_lora(model, cfg)
    assert _unchanged(model, before)


def test_a_model_that_is_not_a_module_is_refused():
    with pytest.raises(vl.UnsupportedModuleError, match=r"model: expected a torch\.nn\.Module, got str"):
        vl.apply_lora("resnet50", vl.LoraConfig(targets="*"))


def test_transformer_encoder_layer_linears_are_never_adapted():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    with pytest.raises(vl.TargetError, match="only modules of type"):  # its fast path reads linear1/2.weight directly
        vl.apply_lora(nn.Sequential(layer), vl.LoraConfig(targets="0.linear*"))
    with pytest.raises(vl.UnsupportedModuleError, match="fast path"):
        vl.apply_lora(nn.Sequential(layer), vl.LoraConfig(targets="0.linear1"))


def test_a_target_inside_another_target_is_refused():
    class GatedConv(nn.Conv2d):
        def __init__(self) -> None:
            super().__init__(3, 3, 1)
            self.gate = nn.Linear(3, 3)

    model = nn.Sequential(GatedConv())
    before = _state(model)
    with pytest.raises(vl.TargetError, match=r"'0.gate' lies inside '0', which is adapted too"):
        vl.apply_lora(model, vl.LoraConfig(targets=["0", "0.gate"]))
    assert _unchanged(model, before)


def test_a_weight_registered_twice_on_one_layer_counts_as_tied():
    lin = nn.Linear(4, 4)
    lin.register_parameter("w2", lin.weight)
    with pytest.raises(vl.TargetError, match=r"'0': its weight is tied to '0.w2'"):
        vl.apply_lora(nn.Sequential(lin), vl.LoraConfig(targets="0"))


def test_the_recorded_config_is_a_copy():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    cfg = vl.LoraConfig(targets=["0"], rank=2)
    vl.apply_lora(model, cfg)
    cfg.targets.append("1")
    assert vl.state.adapter_state(model).configs["default"].targets == ["0"]


def test_numbers_too_large_for_a_float_are_config_errors():
    with pytest.raises(vl.ConfigError, match="alpha: expected float"):
        vl.LoraConfig(targets="0", alpha=10**400)
    with pytest.raises(vl.ConfigError, match="alpha_pattern: expected dict"):
        vl.LoraConfig(targets="0", alpha_pattern={"0": 10**400})


def test_module_walk_does_not_loop_on_a_module_that_contains_itself():
    model = nn.Sequential(nn.Linear(4, 4))
    model.add_module("loop", model)  # torch's own state_dict() recurses forever on this; our walk must not
    assert [n for n, _ in vl._tree.iter_modules(model)] == ["0"]


def test_adding_an_adapter_to_a_disabled_model_keeps_it_disabled():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    vl.apply_lora(model, vl.LoraConfig(targets="0", rank=2))
    vl.disable_adapters(model)
    vl.apply_lora(model, vl.LoraConfig(targets="*", rank=2), adapter_name="b")
    assert model[0].disabled and model[1].disabled


def test_the_depthwise_hint_is_only_given_for_grouped_convs():
    with pytest.warns(UserWarning) as record:
        vl.apply_lora(nn.Sequential(nn.Linear(4, 2)), vl.LoraConfig(targets="0", rank=2))
    assert not any("conv_groups" in str(w.message) for w in record)


def test_attach_refuses_values_that_miss_a_layer_or_name_nothing_before_any_change():
    from visionlora.inject import attach, match_targets

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    before = _state(model)
    cfg = vl.LoraConfig(targets="*", rank=2)
    matches = match_targets(model, cfg)
    values = {"0.lora_A.weight": torch.zeros(2, 4), "0.lora_B.weight": torch.zeros(4, 2), "9.weight": torch.zeros(1)}
    with pytest.raises(vl.AdapterError, match=r"missing \['1.lora_A.weight', '1.lora_B.weight'\], naming .*'9.weight'"):
        attach(model, matches, cfg, "default", values=values)
    assert _unchanged(model, before) and vl.list_adapters(model) == []
