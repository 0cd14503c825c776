"""SVD resizing and extraction, checked against truncated SVDs computed here from ΔW."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

import visionlora as vl
from tests.conftest import assert_rel_close, randomize_lora, reference_conv_delta
from visionlora.state import lora_layers


def grouped_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1),
        nn.Conv2d(16, 32, 3, padding=1, groups=4),  # per-group ΔW: 4 blocks of (8, 4·9)
        nn.Flatten(),
        nn.Linear(32 * 6 * 6, 10),
    ).eval()


X = torch.randn(2, 4, 6, 6)


def deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """scale · ΔW of every adapted layer, by the textbook formula, as (groups, out / g, f) blocks."""
    out = {}
    for name, layer in lora_layers(model):
        ad = layer.adapter("default")
        groups = getattr(layer.base, "groups", 1)
        a, b = ad.lora_A.detach().double(), ad.lora_B.detach().double()
        linear = isinstance(layer.base, nn.Linear)
        delta = ad.scale * b @ a if linear else reference_conv_delta(a, b, ad.scale, groups)
        out[name] = delta.reshape(groups, delta.shape[0] // groups, -1)
    return out


def adapted(rank: int = 6) -> nn.Module:
    model = vl.apply_lora(grouped_net(), vl.LoraConfig(targets="*", rank=rank, alpha=12))
    randomize_lora(model, std=0.3)
    return model


def test_resize_to_the_full_rank_is_exact():
    model = adapted()
    with torch.no_grad():
        before = model(X)
    report = vl.resize_adapter(model, rank=6)
    assert all(r.new_rank == 6 and r.relative_error < 1e-6 for r in report)
    with torch.no_grad():
        assert_rel_close(model(X), before)


def test_resize_to_a_lower_rank_matches_the_truncated_svd_error():
    model = adapted()
    before = deltas(model)
    report = {r.name: r for r in vl.resize_adapter(model, rank=2)}
    after = deltas(model)
    for name, delta in before.items():
        s = torch.linalg.svdvals(delta)  # per group
        expected = math.sqrt((s[:, 2:] ** 2).sum().item() / (s**2).sum().item())
        actual = ((after[name] - delta).norm() / delta.norm()).item()
        assert report[name].new_rank == 2 and report[name].old_rank == 6
        assert report[name].relative_error == pytest.approx(expected, rel=1e-6)
        assert actual == pytest.approx(expected, rel=1e-5)  # and the new factors realise exactly that
    layer = model[1]
    assert layer.adapter("default").lora_A.shape == (4 * 2, 4, 3, 3)
    assert layer.adapter("default").scale == pytest.approx(12 / 6)  # scale kept, alpha = scale · r'


def test_energy_picks_the_smallest_rank_keeping_that_share():
    model = adapted()
    before = deltas(model)
    report = {r.name: r for r in vl.resize_adapter(model, energy=0.9)}
    for name, delta in before.items():
        power = (torch.linalg.svdvals(delta) ** 2).sum(dim=0)
        kept = torch.cumsum(power, 0) / power.sum()
        r = report[name].new_rank
        assert kept[r - 1] >= 0.9 - 1e-9 and (r == 1 or kept[r - 2] < 0.9)


def test_resize_a_file_and_load_it(tmp_path):
    model = adapted()
    path = vl.save_adapter(model, tmp_path / "a.safetensors")
    report = vl.resize_adapter(path, rank=3, out=tmp_path / "small.safetensors")
    vl.resize_adapter(model, rank=3)
    small = vl.load_adapter(grouped_net(), tmp_path / "small.safetensors")
    assert [r.new_rank for r in report] == [3, 3, 3]
    with torch.no_grad():
        assert_rel_close(small(X), model(X), tol=1e-5)


def test_resize_arguments_are_checked():
    model = adapted()
    with pytest.raises(vl.ConfigError, match=r"exactly one of rank= .* or energy="):
        vl.resize_adapter(model)
    with pytest.raises(vl.ConfigError, match=r"energy=1.5 is invalid"):
        vl.resize_adapter(model, energy=1.5)
    with pytest.raises(vl.ConfigError, match="give out="):
        vl.resize_adapter("adapter.safetensors", rank=2)


def test_extracting_an_exactly_low_rank_fine_tune_is_exact():
    base = grouped_net()
    tuned = copy.deepcopy(base)
    torch.manual_seed(1)
    with torch.no_grad():  # fine-tune = base + a rank-3 change per group / per matrix
        for module in (tuned[0], tuned[1], tuned[3]):
            w = module.weight
            groups = getattr(module, "groups", 1)
            flat = w.reshape(groups, w.shape[0] // groups, -1)
            flat += torch.randn(groups, flat.shape[1], 3) @ torch.randn(groups, 3, flat.shape[2]) * 0.1
        tuned[3].bias += 1.0
    vl.extract_lora(base, tuned, vl.LoraConfig(targets="*", rank=3, alpha=5, bias="lora_only"))
    with torch.no_grad():
        assert_rel_close(base(X), tuned(X), tol=1e-5)
        vl.merge(base)
        for i in (0, 1, 3):
            assert_rel_close(base[i].base.weight, tuned[i].weight, tol=1e-5)


def test_extraction_of_a_full_rank_change_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12))
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned[0].weight += torch.randn(12, 16) * 0.1
    delta = (tuned[0].weight - base[0].weight).double()
    vl.extract_lora(base, tuned, vl.LoraConfig(targets="0", rank=4))
    approx = deltas(base)["0"][0]
    u, s, vh = torch.linalg.svd(delta)
    torch.testing.assert_close(approx, u[:, :4] @ torch.diag(s[:4]) @ vh[:4], rtol=1e-6, atol=1e-6)


def test_extraction_copies_the_new_head_and_batchnorm_statistics(tmp_path):
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=3).eval()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.fc.weight.mul_(3)
        tuned.layer4[1].bn2.running_mean.add_(0.5)
        tuned.layer4[1].conv2.weight.add_(torch.randn_like(tuned.layer4[1].conv2.weight) * 0.01)
    vl.extract_lora(base, tuned, vl.LoraConfig(targets="layer4.1.conv2", rank=4, trainable=["fc"]))
    path = vl.save_adapter(base, tmp_path / "x.safetensors")
    torch.manual_seed(0)
    fresh = vl.load_adapter(torchvision.models.resnet18(num_classes=3).eval(), path)
    assert torch.equal(fresh.fc.weight, tuned.fc.weight)
    assert torch.equal(fresh.layer4[1].bn2.running_mean, tuned.layer4[1].bn2.running_mean)


def test_extraction_refuses_models_that_do_not_match():
    base = grouped_net()
    other = nn.Sequential(nn.Conv2d(4, 16, 3), nn.Conv2d(16, 32, 3, groups=4), nn.Flatten(), nn.Linear(4, 10))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(vl.TargetError, match=r"lacks, or has other shapes for: 3\.weight"):
        vl.extract_lora(base, other, vl.LoraConfig(targets="*", rank=2))
    assert not any(isinstance(m, vl.LoraLayer) for m in base.modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_a_non_finite_fine_tune_is_refused_before_any_change():
    base = grouped_net()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned[3].weight[0, 0] = float("nan")
    with pytest.raises(vl.TargetError, match=r"'?3'?: the fine-tuned weight holds NaN or Inf"):
        vl.extract_lora(base, tuned, vl.LoraConfig(targets="*", rank=2))
    assert not any(isinstance(m, vl.LoraLayer) for m in base.modules())


def test_split_svd_allocates_on_the_inputs_device():
    from visionlora.extract import split_svd

    u, s, vh = torch.randn(1, 4, 3, device="meta"), torch.rand(1, 3, device="meta"), torch.randn(1, 3, 5, device="meta")
    b, a = split_svd(u, s, vh, rank=2, scale=1.0)
    assert b.device.type == a.device.type == "meta" and b.shape == (1, 4, 2) and a.shape == (1, 2, 5)


def test_energy_must_be_a_number():
    with pytest.raises(vl.ConfigError, match=r"energy='0\.9' is invalid"):
        vl.resize_adapter(adapted(), energy="0.9")
