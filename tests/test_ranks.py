"""Rank allocation: patterns, resolution from a probe pass, budgets, and what is recorded."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torchvision
from safetensors import safe_open
from torch import nn

import visionlora as vl
from tests.conftest import tiny_unet
from visionlora.ranks import budget_ranks, rank_for_resolution
from visionlora.state import lora_layers


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4)


def allocation(model: nn.Module) -> dict[str, tuple[int | None, int]]:
    return {n: (layer.adapter("default").resolution, layer.adapter("default").rank) for n, layer in lora_layers(model)}


def test_rank_for_resolution_takes_the_largest_threshold_not_above():
    thresholds = {32: 16, 8: 8, 0: 4}
    assert [rank_for_resolution(r, thresholds, 99) for r in (64, 32, 31, 8, 7, 0)] == [16, 16, 8, 8, 4, 4]
    assert rank_for_resolution(3, {8: 8}, 2) == 2  # below every threshold: the config's rank


@pytest.mark.parametrize("size", [64, 128])
def test_resnet_ranks_follow_the_feature_map_size_at_each_input_size(size):
    model = resnet18()
    cfg = vl.LoraConfig(targets=["layer*.*"], rank_by_resolution={16: 16, 8: 8, 0: 2})
    vl.apply_lora(model, cfg, example_input=torch.randn(1, 3, size, size))
    got = allocation(model)
    for name, (resolution, rank) in got.items():
        stage = int(name[len("layer")])
        expected_resolution = size // 2 ** (stage + 1)  # stem /4, then /2 per stage after the first
        assert resolution == expected_resolution, name
        assert rank == (16 if expected_resolution >= 16 else 8 if expected_resolution >= 8 else 2), name
    assert len(got) == 19  # 4 stages × 2 blocks × 2 convs + 3 downsample convs


def test_probe_leaves_the_model_exactly_as_it_was():
    model = resnet18().train()
    model.layer1.eval()  # a mix of modes must come back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = vl.LoraConfig(targets="layer4.*", rank_by_resolution={0: 2})
    vl.apply_lora(model, cfg, example_input=torch.randn(2, 3, 64, 64))
    assert {n: model.get_submodule(n).training for n in modes} == modes
    plain = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".adapters." not in k}
    assert all(torch.equal(state[k], plain[k]) for k in state)  # BatchNorm running statistics included
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_wrapper_takes_its_layers_mode():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model[0].eval()
    vl.apply_lora(model, vl.LoraConfig(targets="*", rank=2, dropout=0.5))
    assert not model[0].training and model[1].training


def test_rank_by_resolution_without_example_input_says_what_is_missing():
    with pytest.raises(vl.ConfigError, match=r"rank_by_resolution needs .* pass example_input= to apply_lora"):
        vl.apply_lora(resnet18(), vl.LoraConfig(targets="layer4.*", rank_by_resolution={0: 4}))


def test_rank_pattern_overrides_the_resolution_rule():
    model = resnet18()
    cfg = vl.LoraConfig(targets="layer4.*", rank_by_resolution={0: 2}, rank_pattern={"layer4.0.conv1": 12})
    vl.apply_lora(model, cfg, example_input=torch.randn(1, 3, 64, 64))
    ranks = {n: r for n, (_, r) in allocation(model).items()}
    assert ranks.pop("layer4.0.conv1") == 12 and set(ranks.values()) == {2}


def test_classifier_after_pooling_is_resolution_one():
    model = resnet18()
    vl.apply_lora(
        model, vl.LoraConfig(targets="fc", rank_by_resolution={1: 3}), example_input=torch.randn(1, 3, 64, 64)
    )
    assert allocation(model) == {"fc": (1, 3)}


def test_vit_token_linears_take_the_patch_grid():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=3)
    vl.apply_lora(model, vl.LoraConfig(targets="blocks.0.*", rank=2), example_input=torch.randn(1, 3, 64, 64))
    # 64 px / 16 = a 4 × 4 patch grid: 16 tokens + the class token, floor(sqrt(17)) = 4
    assert {res for res, _ in allocation(model).values()} == {4}


def test_unet_attention_linears_take_their_blocks_resolution_cross_attention_included():
    unet = tiny_unet()
    example = {
        "sample": torch.randn(1, 4, 16, 16),
        "timestep": torch.tensor([10]),
        "encoder_hidden_states": torch.randn(1, 7, 24),
    }
    cfg = vl.LoraConfig(targets=["*.to_q", "*.to_k", "*.to_v", "*.to_out.0"], rank_by_resolution={16: 8, 0: 2})
    vl.apply_lora(unet, cfg, example_input=example)
    got = allocation(unet)
    # down_blocks.0 and up_blocks.1 work at 16 × 16; down_blocks.1, the mid block and up_blocks.0 at 8 × 8
    for name, (resolution, rank) in got.items():
        at_16 = name.startswith(("down_blocks.0.", "up_blocks.1."))
        assert (resolution, rank) == ((16, 8) if at_16 else (8, 2)), name
    assert got["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == (16, 8)  # its input: 7 text tokens


def lora_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)


@pytest.mark.parametrize("budget", [60_000, 250_000, 1_000_000])
def test_budget_is_never_exceeded_and_higher_resolution_gets_higher_rank(budget):
    model = resnet18()
    cfg = vl.LoraConfig(targets=["layer3.*", "layer4.*"], rank_budget=budget)
    vl.apply_lora(model, cfg, example_input=torch.randn(1, 3, 128, 128))
    assert lora_params(model) <= budget
    got = allocation(model)
    layer3 = min(r for n, (_, r) in got.items() if n.startswith("layer3"))
    layer4 = max(r for n, (_, r) in got.items() if n.startswith("layer4"))
    assert layer3 >= layer4  # layer3 runs at 8 × 8, layer4 at 4 × 4


def test_budget_without_a_probe_spreads_ranks_evenly_and_pattern_ranks_are_paid_first():
    model = resnet18()
    cfg = vl.LoraConfig(targets="layer4.*", rank_budget=100_000, rank_pattern={"layer4.0.conv1": 8})
    vl.apply_lora(model, cfg)
    got = {n: r for n, (_, r) in allocation(model).items()}
    assert got.pop("layer4.0.conv1") == 8
    assert len(set(got.values())) == 1
    assert lora_params(model) <= 100_000


def test_a_budget_below_rank_one_everywhere_is_an_error():
    with pytest.raises(vl.ConfigError, match=r"rank_budget: 1000 parameters are fewer than the .* rank 1"):
        vl.apply_lora(resnet18(), vl.LoraConfig(targets="layer4.*", rank_budget=1000))


def test_budget_ranks_rounds_down_and_respects_caps():
    per_rank = lambda r: 10 * r  # noqa: E731
    ranks = budget_ranks({"a": per_rank, "b": per_rank}, {"a": 4.0, "b": 1.0}, {"a": 3, "b": 100}, budget=200)
    assert ranks["a"] == 3  # capped
    assert sum(ranks[n] * 10 for n in ranks) <= 200
    assert ranks["b"] >= 1


def test_budget_and_resolution_rules_are_exclusive_and_thresholds_valid():
    with pytest.raises(vl.ConfigError, match="set one of them"):
        vl.LoraConfig(targets="x", rank_budget=10, rank_by_resolution={0: 4})
    with pytest.raises(vl.ConfigError, match=r"rank_by_resolution\[8\]: rank 0 is invalid"):
        vl.LoraConfig(targets="x", rank_by_resolution={8: 0})


def test_allocation_is_recorded_in_the_file_and_the_summary(tmp_path):
    model = resnet18()
    vl.apply_lora(
        model, vl.LoraConfig(targets="layer4.*", rank_by_resolution={0: 3}), example_input=torch.randn(1, 3, 64, 64)
    )
    path = vl.save_adapter(model, tmp_path / "a.safetensors")
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["visionlora"])
    spec = meta["layers"]["layer4.1.conv2"]
    assert {k: spec[k] for k in ("kind", "rank", "alpha", "resolution")} == {
        "kind": "Conv2d",
        "rank": 3,
        "alpha": 8.0,
        "resolution": 2,
    }
    assert meta["config"]["rank_by_resolution"] == {"0": 3}
    fresh = vl.load_adapter(resnet18(), path)
    assert allocation(fresh) == allocation(model)
    row = next(line for line in vl.summary(fresh).splitlines() if line.startswith("layer4.1.conv2 "))
    assert row.split()[6:8] == ["2", "3"]  # resolution, rank
    assert math.isclose(fresh.layer4[1].conv2.adapter("default").scale, 8.0 / 3)


def test_example_input_as_a_tuple_of_positional_arguments_and_outputs_unchanged():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x, y):
            return self.bn(self.a(x)).mean() + self.b(y).mean()

    torch.manual_seed(0)
    model = TwoInputs()
    x, y = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32, 32)
    model.eval()
    before = model(x, y)
    model.train()
    cfg = vl.LoraConfig(targets=["a", "b"], rank_by_resolution={16: 4, 0: 2})
    vl.apply_lora(model, cfg, example_input=(x, y))
    assert allocation(model) == {"a": (16, 4), "b": (16, 4)}  # x at 16 stays 16; y at 32 halves to 16
    assert model.training
    model.eval()
    assert torch.equal(model(x, y), before)  # BatchNorm statistics untouched by the probe


def test_a_budget_that_pattern_ranks_already_exceed_is_an_error():
    cfg = vl.LoraConfig(targets="layer4.*", rank_budget=10_000, rank_pattern={"layer4.*": 64})
    with pytest.raises(vl.ConfigError, match=r"rank_budget: 10000 parameters are fewer than the \d+ that rank_pattern"):
        vl.apply_lora(resnet18(), cfg)


def test_channels_last_linears_and_pooled_heads_of_a_convnext():
    timm = pytest.importorskip("timm")
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=3)  # MLP Linears see (B, H, W, C)
    targets = ["stages.0.blocks.0.*", "stages.3.blocks.0.mlp.*", "head.fc"]
    cfg = vl.LoraConfig(targets=targets, rank=2, conv_groups="shared")  # conv_dw is depthwise
    vl.apply_lora(model, cfg, example_input=torch.randn(1, 3, 64, 64))
    got = {n: res for n, (res, _) in allocation(model).items()}
    assert got["stages.0.blocks.0.conv_dw"] == 16 and got["stages.0.blocks.0.mlp.fc1"] == 16  # 64 / 4
    assert got["stages.3.blocks.0.mlp.fc2"] == 2  # 64 / 32
    assert got["head.fc"] == 1  # after global pooling


def test_a_probe_that_the_model_rejects_is_a_config_error_and_changes_nothing():
    model = torchvision.models.vit_b_16(image_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(vl.ConfigError, match=r"example_input: the probe forward pass of VisionTransformer failed"):
        vl.apply_lora(model, vl.LoraConfig(targets="heads.head"), example_input=torch.randn(1, 3, 64, 64))
    assert not any(isinstance(m, vl.LoraLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
