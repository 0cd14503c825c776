"""Rank schedules: a held adapter runs as its first rank components on every geometry, its held
slices get no gradient, growing changes no output and equals extending A, B and AdamW's state,
and files hold the final rank with the schedule."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import visionlora as vl
from tests.conftest import assert_rel_close, reference_conv_delta
from tests.test_conv_transpose import textbook_delta
from visionlora.errors import AdapterError, ConfigError
from visionlora.lora_math import rank_slice


class WeightSpaceConv(nn.Conv2d):
    """A conv whose forward transforms its weight (as timm's StdConv2d): adapted in weight space."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * 0.5, self.bias)


# name: (base layer, input shape, conv_groups)
CASES = {
    "linear": (lambda: nn.Linear(12, 10), (5, 12), "per_group"),
    "conv2d-grouped-dilated-reflect": (
        lambda: nn.Conv2d(8, 12, 3, padding=2, dilation=2, groups=2, padding_mode="reflect"),
        (2, 8, 9, 9),
        "per_group",
    ),
    "conv2d-depthwise-shared-circular": (
        lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6, padding_mode="circular"),
        (2, 6, 7, 7),
        "shared",
    ),
    "conv1d-strided": (lambda: nn.Conv1d(4, 6, 5, stride=2), (3, 4, 17), "per_group"),
    "conv3d": (lambda: nn.Conv3d(3, 4, (2, 3, 3), padding=1), (2, 3, 4, 6, 6), "per_group"),
    "conv2d-pointwise": (lambda: nn.Conv2d(8, 10, 1), (2, 8, 8, 8), "per_group"),
    "conv-transpose2d-grouped": (
        lambda: nn.ConvTranspose2d(6, 8, 3, stride=2, padding=1, output_padding=1, groups=2),
        (2, 6, 5, 5),
        "per_group",
    ),
    "weight-space-conv": (lambda: WeightSpaceConv(4, 6, 3, padding=1), (2, 4, 6, 6), "per_group"),
}
RANK, HELD, ALPHA = 4, 2, 6.0


def _adapted(case: str, family: str = "lora", schedule: dict | None = None, seed: int = 0) -> nn.Sequential:
    make, _, layout = CASES[case]
    torch.manual_seed(seed)
    model = nn.Sequential(make())
    cfg = vl.LoraConfig(
        targets="0",
        rank=RANK,
        alpha=ALPHA,
        family=family,
        conv_groups=layout,
        rank_schedule={0: HELD, 10: RANK} if schedule is None else schedule,
    )
    with warnings.catch_warnings():  # small layers: adapters as large as the layer, ranks they cannot use
        warnings.simplefilter("ignore")
        return vl.apply_lora(model, cfg)


def _textbook_delta(base: nn.Module, a: torch.Tensor, b: torch.Tensor, keep: int) -> torch.Tensor:
    """s · ΔW of the first ``keep`` rank components, written out per layer kind and group."""
    scale = ALPHA / RANK  # the final rank's scale, held or not
    if isinstance(base, nn.Linear):
        return scale * b[:, :keep] @ a[:keep]
    if isinstance(base, nn.ConvTranspose2d):
        return textbook_delta(a[:, :keep], b[:, :keep], scale, base.groups).to(a.dtype)
    groups = a.shape[0] // RANK
    a_kept = torch.cat([a[j * RANK : j * RANK + keep] for j in range(groups)])
    return reference_conv_delta(a_kept, b[:, :keep], scale, base.groups)


def _randomize(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(p * (1 + 0.2 * noise) if name.endswith("magnitude") else noise * 0.2)


# ---------------------------------------------------------------------------------------------
# The math of a held adapter


@pytest.mark.parametrize("case", [c for c in CASES if c not in ("linear", "weight-space-conv")])
def test_rank_slice_is_the_adapter_of_the_first_components(case):
    layer = _adapted(case)[0]
    _randomize(layer)
    adapter = layer.adapter("default")
    a, b = adapter.lora_A.detach(), adapter.lora_B.detach()
    a_k, b_k = rank_slice(a, b, RANK, HELD, adapter.transposed)
    assert b_k.shape[1] == HELD and a_k.numel() * RANK == a.numel() * HELD
    assert torch.allclose(layer.delta(a_k, b_k, ALPHA / RANK), _textbook_delta(layer.base, a, b, HELD), atol=1e-6)
    assert rank_slice(a, b, RANK, RANK) == (a, b)


@pytest.mark.parametrize("family", ["lora", "dora"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_held_adapter_is_its_first_components_and_its_held_slices_get_no_gradient(case, family):
    if family == "dora" and "transpose" in case:
        pytest.skip("DoRA on ConvTranspose is refused (tests/test_families.py)")
    model = _adapted(case, family)
    layer = model[0]
    adapter = layer.adapter("default")
    assert (adapter.current_rank, adapter.rank) == (HELD, RANK)
    _randomize(model)  # the held-back columns of B too: forward must not read them
    x = torch.randn(CASES[case][1], generator=torch.Generator().manual_seed(2))
    weight = layer.base.weight.detach()
    target = weight + _textbook_delta(layer.base, adapter.lora_A.detach(), adapter.lora_B.detach(), HELD)
    if family == "dora":
        norm = target.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
        target = adapter.magnitude.detach() * target / norm
    expected = functional_call(layer.base, {"weight": target}, (x,))
    y = model(x)
    assert_rel_close(y, expected, 1e-5)
    y.square().sum().backward()
    grad_a, grad_b = adapter.lora_A.grad, adapter.lora_B.grad
    if adapter.transposed:
        assert grad_a[:, HELD:].abs().max() == 0 and grad_a[:, :HELD].abs().max() > 0
    else:
        rows = grad_a.unflatten(0, (-1, RANK))
        assert rows[:, HELD:].abs().max() == 0 and rows[:, :HELD].abs().max() > 0
    assert grad_b[:, HELD:].abs().max() == 0 and grad_b[:, :HELD].abs().max() > 0
    with torch.no_grad():
        merged = vl.merge(copy.deepcopy(model))
        assert_rel_close(merged(x), expected, 1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_growing_changes_no_output_and_trains_the_new_components(case):
    model = _adapted(case)
    adapter = model[0].adapter("default")
    x = torch.randn(CASES[case][1], generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=0.05, weight_decay=0.01)
    for _ in range(3):  # train the held rank: B's live columns move, its held ones stay zero
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    before = model(x)
    assert vl.grow_ranks(model, 10) == {"default": {"0": RANK}}
    assert_rel_close(model(x), before, 1e-6)  # the same ΔW; the convs' sums may run in another order
    model(x).square().mean().backward()
    optimizer.step()
    assert adapter.lora_B[:, HELD:].abs().max() > 0  # the new components train from the next step


def _per_group(t: torch.Tensor, keep: slice) -> torch.Tensor:
    return t.unflatten(0, (-1, RANK))[:, keep].flatten(0, 1)


@pytest.mark.parametrize("case", ["linear", "conv2d-grouped-dilated-reflect"])
def test_growth_is_extending_a_and_b_and_adams_state_with_zero_moments(case):
    """The same run twice: held and grown in place, and with A and B physically rank 2, then extended
    by A's drawn rows and zero columns of B, AdamW's moments extended by zeros under the same step count."""
    model = _adapted(case, schedule={0: HELD, 3: RANK})
    layer, adapter = model[0], model[0].adapter("default")
    a0 = adapter.lora_A.detach().clone()
    x = torch.randn(CASES[case][1], generator=torch.Generator().manual_seed(4))
    goal = torch.randn_like(model(x)) * 0.1
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=0.02, weight_decay=0.0)
    for step in range(1, 7):
        (model(x) - goal).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 2:
            state = optimizer.state[adapter.lora_B]  # held slices: exactly zero moments, the parameter's step
            assert state["exp_avg"][:, HELD:].abs().max() == 0 and state["exp_avg_sq"][:, HELD:].abs().max() == 0
        vl.grow_ranks(model, step)

    linear = isinstance(layer.base, nn.Linear)
    a = (a0[:HELD] if linear else _per_group(a0, slice(0, HELD))).clone().requires_grad_()
    b = torch.zeros(adapter.lora_B.shape[0], HELD, *adapter.lora_B.shape[2:], requires_grad=True)

    def output(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        keep = b.shape[1]
        if linear:
            delta = ALPHA / RANK * b.flatten(1) @ a
        else:
            delta = reference_conv_delta(a, b, ALPHA / RANK, layer.base.groups)
        assert keep in (HELD, RANK)
        return functional_call(layer.base, {"weight": layer.base.weight + delta}, (x,))

    reference = torch.optim.AdamW([a, b], lr=0.02, weight_decay=0.0)
    for step in range(1, 7):
        (output(a, b) - goal).square().mean().backward()
        reference.step()
        reference.zero_grad()
        if step == 3:  # extend: A's own drawn rows, zero columns of B; moments zero, step count kept
            new_rows = a0[HELD:] if linear else _per_group(a0, slice(HELD, RANK))
            if linear:
                a_new = torch.cat([a.detach(), new_rows])
            else:
                a_new = torch.cat([a.detach().unflatten(0, (-1, HELD)), new_rows.unflatten(0, (-1, RANK - HELD))], 1)
                a_new = a_new.flatten(0, 1)
            b_new = torch.cat([b.detach(), torch.zeros_like(b.detach())], 1)
            old = [reference.state[a], reference.state[b]]
            a, b = a_new.requires_grad_(), b_new.requires_grad_()
            reference = torch.optim.AdamW([a, b], lr=0.02, weight_decay=0.0)
            for param, was in zip((a, b), old, strict=True):
                reference.state[param] = {
                    "step": was["step"].clone(),
                    "exp_avg": _extended(was["exp_avg"], linear, param is a),
                    "exp_avg_sq": _extended(was["exp_avg_sq"], linear, param is a),
                }
    assert_rel_close(adapter.lora_B.detach(), b.detach(), 1e-5)
    assert_rel_close(adapter.lora_A.detach(), a.detach(), 1e-5)


def _extended(moment: torch.Tensor, linear: bool, is_a: bool) -> torch.Tensor:
    """An Adam moment of a rank-2 A or B, extended by zeros for the new rank components."""
    if not is_a:
        return torch.cat([moment, torch.zeros_like(moment)], 1)
    if linear:
        return torch.cat([moment, torch.zeros_like(moment)])
    grouped = moment.unflatten(0, (-1, HELD))
    return torch.cat([grouped, torch.zeros_like(grouped)], 1).flatten(0, 1)


def test_held_rows_of_a_change_only_by_adamws_decay_and_held_columns_of_b_stay_zero():
    model = _adapted("linear")
    adapter = model[0].adapter("default")
    a0 = adapter.lora_A.detach().clone()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(2):
        model(torch.randn(4, 12)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.allclose(adapter.lora_A[HELD:], a0[HELD:] * (1 - 0.1 * 0.5) ** 2, rtol=1e-6, atol=0)
    assert adapter.lora_B[:, HELD:].abs().max() == 0 and adapter.lora_B[:, :HELD].abs().max() > 0


# ---------------------------------------------------------------------------------------------
# The API


def test_grow_ranks_follows_steps_or_fractions_and_never_shrinks():
    model = _adapted("linear", schedule={0: 1, 0.5: 3, 0.75: 8})
    assert vl.current_ranks(model) == {"default": {"0": 1}}
    assert "1 of 4" in vl.summary(model)
    with pytest.raises(ConfigError, match=r"fractions of the run.*total_steps"):
        vl.grow_ranks(model, 5)
    assert vl.grow_ranks(model, 4, total_steps=10) == {}
    assert vl.grow_ranks(model, 5, total_steps=10) == {"default": {"0": 3}}
    assert vl.grow_ranks(model, 8, total_steps=10) == {"default": {"0": RANK}}  # capped at the layer's rank
    with pytest.raises(AdapterError, match="at rank 4, and step 2 of its schedule gives 1; ranks never shrink"):
        vl.grow_ranks(model, 2, total_steps=10)
    assert vl.current_ranks(model) == {"default": {"0": RANK}}


def test_a_schedule_that_ends_below_a_layers_rank_is_refused_and_nothing_changes():
    model = nn.Sequential(nn.Linear(12, 30), nn.Linear(30, 20))
    cfg = vl.LoraConfig(targets=["0", "1"], rank=4, rank_pattern={"1": 8}, rank_schedule={0: 2, 5: 4})
    with pytest.raises(ConfigError, match="ends at rank 4, and 1 has rank 8: end the schedule at the largest"):
        vl.apply_lora(model, cfg)
    assert not any(isinstance(m, vl.LoraLayer) for m in model.modules())
    with pytest.raises(ConfigError, match="grows LoRA and DoRA adapters; loha"):
        vl.LoraConfig(targets="0", family_pattern={"0": "loha"}, rank_schedule={0: 2})
    with pytest.raises(ConfigError, match="a key above 1 is a step, a whole number"):
        vl.LoraConfig(targets="0", rank_schedule={0: 2, 500.5: 16})
    with pytest.raises(ConfigError, match="mixes fractions of the run with steps"):
        vl.LoraConfig(targets="0", rank_schedule={0: 2, 0.5: 8, 500: 16})
    assert vl.LoraConfig(targets="0", rank_schedule={0: 2, 2**60: 16, 3.0: 4}).rank_schedule[2**60] == 16  # steps


def test_end_schedules_gives_the_plain_adapter_and_refuses_held_columns_written_from_outside():
    model = _adapted("conv2d-grouped-dilated-reflect")
    adapter = model[0].adapter("default")
    with torch.no_grad():
        adapter.lora_B[:, :HELD].normal_()
        adapter.lora_B[0, HELD] = 1.0
    with pytest.raises(AdapterError, match="beyond rank 2, held back by the rank schedule, are not zero"):
        vl.end_schedules(model)
    assert adapter.current_rank == HELD
    with torch.no_grad():
        adapter.lora_B[0, HELD] = 0.0
    x = torch.randn(2, 8, 9, 9)
    before = model(x)
    vl.end_schedules(model)
    assert (adapter.current_rank, adapter.schedule, vl.current_ranks(model)) == (RANK, {}, {})
    assert_rel_close(model(x), before, 1e-6)


def test_the_file_holds_the_final_rank_and_the_schedule_and_loads_at_full_rank(tmp_path):
    model = _adapted("conv2d-grouped-dilated-reflect", schedule={0: 1, 0.5: RANK})
    adapter = model[0].adapter("default")
    with torch.no_grad():
        adapter.lora_B[:, :1].normal_()
    x = torch.randn(2, 8, 9, 9)
    path = tmp_path / "adapter.safetensors"
    vl.save_adapter(model, path)
    file = vl.read_adapter(path)
    assert file.config.rank_schedule == {0: 1, 0.5: RANK}
    assert file.tensors["0.lora_B.weight"].shape[1] == RANK and file.layers["0"].rank == RANK
    torch.manual_seed(0)
    fresh = vl.load_adapter(nn.Sequential(CASES["conv2d-grouped-dilated-reflect"][0]()), path)
    fresh[0].base.load_state_dict(model[0].base.state_dict())
    assert fresh[0].adapter("default").current_rank == RANK and vl.current_ranks(fresh) == {}
    assert_rel_close(fresh(x), model(x), 1e-6)
