"""DoRA, LoHa and LoKr: the math against the textbook formulas, the layers against PEFT's DoRA and
LyCORIS' LoHa/LoKr modules on the same weights, merge/unmerge, configs, files and resizing."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionlora as vl
from tests.conftest import assert_rel_close, reference_conv
from visionlora.branches import param_count
from visionlora.errors import AdapterFileError, ConfigError
from visionlora.family_math import (
    channel_norm,
    decompose,
    factorization,
    hadamard_delta,
    kronecker_delta,
    tucker_rebuild,
)

FAMILIES = ("dora", "loha", "lokr")


def randomize(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Random non-zero values in every adapter tensor (a magnitude near its initial norm), as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." not in name:
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            p.copy_(p * (1 + 0.2 * noise) if name.endswith("magnitude") else noise * std)


# ---------------------------------------------------------------------------------------------
# The math


def test_factorization_is_lycoris_for_every_size_and_factor():
    lycoris = pytest.importorskip("lycoris.functional.general")
    for dim in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 12, 16, 64):
            assert factorization(dim, factor) == lycoris.factorization(dim, factor), (dim, factor)


def test_hadamard_and_kronecker_deltas_are_the_textbook_products():
    g = torch.Generator().manual_seed(0)
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((6, 2), (2, 12), (6, 2), (2, 12)))
    delta = hadamard_delta(w1a, w1b, w2a, w2b, 0.5, (6, 3, 2, 2))
    for o, c in ((0, 0), (5, 11), (3, 7)):
        expected = 0.5 * sum(w1a[o, i] * w1b[i, c] for i in range(2)) * sum(w2a[o, i] * w2b[i, c] for i in range(2))
        assert math.isclose(delta.reshape(6, 12)[o, c].item(), expected.item(), rel_tol=1e-12)
    core, wa, wb = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((2, 2, 3), (2, 5), (2, 4)))
    rebuilt = tucker_rebuild(core, wa, wb)
    o, c, k = 4, 1, 2
    expected = sum(core[i, j, k] * wa[i, o] * wb[j, c] for i in range(2) for j in range(2))
    assert math.isclose(rebuilt[o, c, k].item(), expected.item(), rel_tol=1e-12)
    w1, w2 = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
    kron = kronecker_delta(w1, w2, 2.0, (8, 15, 3))
    for a, b, c, d, t in ((0, 0, 0, 0, 0), (1, 3, 2, 4, 2), (1, 2, 0, 3, 1)):
        assert kron[a * 4 + b, c * 5 + d, t].item() == pytest.approx(2.0 * (w1[a, c] * w2[b, d, t]).item(), rel=1e-12)


def test_decompose_gives_each_output_channel_the_magnitude_as_its_norm():
    g = torch.Generator().manual_seed(1)
    w, d = torch.randn(8, 3, 3, 3, generator=g), torch.randn(8, 3, 3, 3, generator=g)
    m = torch.rand(8, 1, 1, 1, generator=g) + 0.5
    out = decompose(w, d, m)
    assert torch.allclose(channel_norm(out), m.flatten(), rtol=1e-6)
    assert torch.allclose(out / (w + d), (m.flatten() / channel_norm(w + d)).reshape(8, 1, 1, 1).expand_as(out))
    m_in = torch.rand(1, 3, 1, 1, generator=g) + 0.5
    assert torch.allclose(channel_norm(decompose(w, d, m_in, "in"), "in"), m_in.flatten(), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# DoRA against PEFT's


def _two_layers() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 25, 7))


def _peft_dora(base: nn.Module, ours: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(target_modules=["0", "3"], r=rank, lora_alpha=alpha, use_dora=True, lora_dropout=dropout)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for idx in ("0", "3"):
            layer, ad = theirs.base_model.model.get_submodule(idx), ours.get_submodule(idx).adapter("default")
            layer.lora_A["default"].weight.copy_(ad.lora_A)
            layer.lora_B["default"].weight.copy_(ad.lora_B)
            magnitude = layer.lora_magnitude_vector["default"].weight
            magnitude.copy_(ad.magnitude.reshape(magnitude.shape))
    return theirs


def test_dora_outputs_and_gradients_equal_peft_dora_on_the_same_weights():
    base = _two_layers()
    ours = vl.apply_lora(copy.deepcopy(base), vl.LoraConfig(targets=["0", "3"], rank=2, alpha=3, family="dora"))
    randomize(ours)
    theirs = _peft_dora(base, ours, 2, 3)
    x = torch.randn(3, 4, 5, 5)
    y_ours, y_theirs = ours(x), theirs(x)
    assert_rel_close(y_ours, y_theirs, 1e-5)
    assert (y_ours - base(x)).abs().max() > 1e-2  # the adapter does something
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    for idx in ("0", "3"):
        ad, layer = ours.get_submodule(idx).adapter("default"), theirs.base_model.model.get_submodule(idx)
        assert_rel_close(ad.lora_A.grad, layer.lora_A["default"].weight.grad, 1e-4)
        assert_rel_close(ad.lora_B.grad, layer.lora_B["default"].weight.grad, 1e-4)
        assert_rel_close(
            ad.magnitude.grad.flatten(), layer.lora_magnitude_vector["default"].weight.grad.flatten(), 1e-4
        )


def test_dora_with_dropout_in_training_is_peft_dora_on_the_same_mask():
    base = _two_layers()
    cfg = vl.LoraConfig(targets=["0", "3"], rank=2, alpha=3, family="dora", dropout=0.3)
    ours = vl.apply_lora(copy.deepcopy(base), cfg).train()
    randomize(ours)
    theirs = _peft_dora(base, ours, 2, 3, dropout=0.3)
    x = torch.randn(3, 4, 5, 5)
    torch.manual_seed(5)
    y_ours = ours(x)
    torch.manual_seed(5)
    assert_rel_close(y_ours, theirs.train()(x), 1e-5)


def test_a_fresh_dora_adapter_changes_nothing_and_starts_at_the_weight_norm():
    base = _two_layers()
    model = vl.apply_lora(copy.deepcopy(base), vl.LoraConfig(targets=["0", "3"], rank=2, family="dora"))
    x = torch.randn(2, 4, 5, 5)
    assert_rel_close(model(x), base(x), 1e-6)
    conv = model.get_submodule("0")
    assert torch.allclose(conv.adapter("default").magnitude.flatten(), channel_norm(conv.base.weight))


# ---------------------------------------------------------------------------------------------
# LoHa and LoKr against LyCORIS'


def _lycoris_module(family: str, layer: nn.Module, ours: vl.LoraLayer, **options):
    modules = pytest.importorskip("lycoris.modules")
    cls = modules.LohaModule if family == "loha" else modules.LokrModule
    ad = ours.adapter("default")
    module = cls("x", layer, 1.0, lora_dim=ad.rank, alpha=ad.alpha, **options)
    with torch.no_grad():
        for key, tensor in ad.tensors().items():
            target = module.dora_scale if key == "magnitude" else getattr(module, key)
            target.copy_(tensor.reshape(target.shape))
    module.apply_to()
    return module


LYCORIS_CASES = [
    ("loha", nn.Linear(12, 10), {}, {}),
    ("loha", nn.Conv2d(6, 8, 3, padding=1), {}, {}),
    ("loha", nn.Conv2d(6, 8, 3, padding=1), {"tucker": True}, {"use_tucker": True}),
    ("loha", nn.Conv2d(6, 8, 3, padding=2, dilation=2, groups=2), {}, {}),
    ("loha", nn.Conv1d(4, 6, 5, stride=2), {}, {}),
    ("loha", nn.Conv3d(4, 4, 3, padding=1), {"tucker": True}, {"use_tucker": True}),
    ("lokr", nn.Linear(64, 48), {}, {}),
    ("lokr", nn.Linear(64, 48), {"lokr_factor": 4}, {"factor": 4}),
    ("lokr", nn.Linear(64, 48), {"decompose_both": True, "lokr_factor": 16}, {"decompose_both": True, "factor": 16}),
    ("lokr", nn.Conv2d(32, 48, 3, padding=1), {}, {}),
    ("lokr", nn.Conv2d(32, 48, 3, padding=1), {"tucker": True}, {"use_tucker": True}),
    ("lokr", nn.Conv2d(32, 32, 3, padding=1, groups=4), {}, {}),
    ("lokr", nn.Conv2d(8, 8, 3, padding=1), {}, {}),  # both halves full: scale 1
    ("lokr", nn.Conv1d(16, 24, 3), {"lokr_factor": 2}, {"factor": 2}),
]


@pytest.mark.parametrize(("family", "layer", "ours_options", "their_options"), LYCORIS_CASES)
def test_loha_and_lokr_equal_lycoris_modules_on_the_same_weights(family, layer, ours_options, their_options):
    torch.manual_seed(0)
    layer = copy.deepcopy(layer)
    model = vl.apply_lora(
        nn.Sequential(copy.deepcopy(layer)), vl.LoraConfig(targets="0", rank=2, alpha=3, family=family, **ours_options)
    )
    randomize(model, std=0.3)
    ours = model.get_submodule("0")
    shapes = {k: tuple(t.shape) for k, t in ours.adapter("default").tensors().items()}
    _lycoris_module(family, layer, ours, **their_options)
    x = (
        torch.randn(2, layer.in_features)
        if isinstance(layer, nn.Linear)
        else torch.randn(2, layer.in_channels, *([9] * (layer.weight.dim() - 2)))
    )
    with torch.no_grad():
        expected, actual = layer(x), model(x)
    assert (actual - ours.base(x)).abs().max() > 1e-3, shapes
    assert_rel_close(actual, expected, 1e-5)
    if isinstance(layer, nn.Linear):
        x = torch.randn(2, layer.in_features)


@pytest.mark.parametrize("family", ["loha", "lokr"])
def test_loha_and_lokr_with_a_magnitude_equal_lycoris_weight_decomposition(family):
    """LyCORIS' DoRA on LoHa/LoKr (``dora_scale``), per output and per input channel."""
    for wd_on_out in (True, False):
        torch.manual_seed(1)
        layer = nn.Conv2d(16, 24, 3, padding=1)
        model = vl.apply_lora(nn.Sequential(copy.deepcopy(layer)), vl.LoraConfig(targets="0", rank=2, family=family))
        ours = model.get_submodule("0")
        ours.adapter("default").decompose_weight(layer.weight, "out" if wd_on_out else "in")
        randomize(model, std=0.3)
        _lycoris_module(family, layer, ours, weight_decompose=True, wd_on_out=wd_on_out)
        x = torch.randn(2, 16, 6, 6)
        with torch.no_grad():
            assert_rel_close(model(x), layer(x), 1e-5)


# ---------------------------------------------------------------------------------------------
# Every geometry: merged == unmerged == the reference formula


def _random_conv(rng: random.Random) -> nn.Module:
    dims = rng.choice((1, 2, 3))
    groups = rng.choice((1, 2, 4))
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    k = rng.choice((1, 2, 3))
    return cls(
        groups * rng.choice((1, 2, 3)),
        groups * rng.choice((2, 3, 4)),
        k,
        stride=rng.choice((1, 2)),
        padding=rng.choice((0, 1)),
        dilation=rng.choice((1, 2)),
        groups=groups,
        bias=rng.random() < 0.5,
        padding_mode=rng.choice(("zeros", "reflect", "circular")) if k > 1 else "zeros",
    )


@pytest.mark.filterwarnings("ignore:adapter has more parameters", "ignore:rank above what the layer can use")
@pytest.mark.parametrize("family", FAMILIES)
def test_every_conv_geometry_runs_the_reference_formula_merged_and_unmerged(family):
    rng = random.Random(7)
    for i in range(25):
        conv = _random_conv(rng)
        cfg = vl.LoraConfig(targets="0", rank=rng.choice((1, 2, 3)), alpha=2, family=family, tucker=rng.random() < 0.5)
        cfg.conv_groups = "shared" if family == "dora" and conv.groups > 1 and rng.random() < 0.5 else "per_group"
        model = vl.apply_lora(nn.Sequential(copy.deepcopy(conv)), cfg)
        randomize(model, seed=i, std=0.3)
        layer = model.get_submodule("0")
        ad = layer.adapter("default")
        w = conv.weight.double()
        delta = ad.factor_delta(w.shape, layer.delta, torch.float64)
        expected_weight = decompose(w, delta, ad.magnitude.double()) if family == "dora" else w + delta
        size = [rng.choice((5, 6, 7)) for _ in range(conv.weight.dim() - 2)]
        x = torch.randn(2, conv.in_channels, *size, dtype=torch.float64)
        with torch.no_grad():
            expected = reference_conv(conv.double(), x, expected_weight)
            conv.float()
        trained = model(x.float()).detach()  # with gradients on: DoRA runs PEFT's form, the others W + ΔW
        with torch.no_grad():
            actual = model(x.float())
            vl.merge(model)
            merged = model(x.float())
            vl.unmerge(model)
        for output in (trained, actual, merged):
            assert_rel_close(output, expected, 1e-5, magnitude=expected.abs().max().item())


@pytest.mark.filterwarnings("ignore:adapter has more parameters")
@pytest.mark.parametrize("family", FAMILIES)
def test_unmerge_restores_bf16_weights_bit_for_bit(family):
    model = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 4)).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vl.apply_lora(model, vl.LoraConfig(targets=["0", "2"], rank=2, family=family))
    randomize(model)
    vl.merge(model)
    assert not torch.equal(model.get_submodule("0").base.weight, before["0.weight"])
    vl.unmerge(model)
    for key, value in before.items():
        assert torch.equal(model.get_submodule(key.rsplit(".", 1)[0]).base.get_parameter(key.rsplit(".", 1)[1]), value)


# ---------------------------------------------------------------------------------------------
# Configs, budgets, refusals


def test_family_pattern_gives_each_layer_its_family_and_summary_shows_it():
    model = vl.apply_lora(
        _two_layers(), vl.LoraConfig(targets=["0", "3"], rank=2, family="lokr", family_pattern={"3": "loha"})
    )
    assert [model.get_submodule(n).adapter("default").family for n in ("0", "3")] == ["lokr", "loha"]
    table = vl.summary(model)
    assert "lokr" in table and "loha" in table


def test_rank_budget_counts_each_familys_real_parameters():
    for family in ("lora", *FAMILIES):
        model = nn.Sequential(nn.Conv2d(32, 32, 3), nn.Conv2d(32, 64, 3), nn.Flatten(), nn.Linear(64, 32))
        cfg = vl.LoraConfig(targets=["0", "1", "3"], family=family, rank_budget=6000)
        vl.apply_lora(model, cfg)
        spent = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert spent <= 6000, family
        layers = [(n, model.get_submodule(n)) for n in ("0", "1", "3")]
        assert spent == sum(param_count(m.base, family, m.adapter("default").rank, cfg) for _, m in layers)
        if family != "lokr":  # LoKr on these layers cannot reach 6000 values: its W2 turns full at r = 4
            assert spent > 6000 * 0.5, family  # the budget is used, not wasted


def test_non_lora_families_on_conv_transpose_are_refused_by_name():
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 3))
    with pytest.raises(ConfigError, match="ConvTranspose2d takes family 'lora' only"):
        vl.apply_lora(model, vl.LoraConfig(targets="0", family="dora"))
    assert isinstance(model[0], nn.ConvTranspose2d)  # unchanged


def test_unknown_family_and_bad_factor_are_config_errors():
    with pytest.raises(ConfigError, match="family"):
        vl.LoraConfig.from_dict({"targets": ["x"], "family": "lycoris"})
    with pytest.raises(ConfigError, match="lokr_factor"):
        vl.LoraConfig(targets="x", lokr_factor=0)


def test_extract_lora_refuses_other_families_by_name():
    base = _two_layers()
    with pytest.raises(ConfigError, match="extract_lora"):
        vl.extract_lora(base, copy.deepcopy(base), vl.LoraConfig(targets="0", family="loha"))


# ---------------------------------------------------------------------------------------------
# Native files, resizing


@pytest.mark.filterwarnings("ignore:adapter has more parameters")
@pytest.mark.parametrize("family", FAMILIES)
def test_native_file_round_trip_reproduces_every_family(family, tmp_path):
    base = _two_layers()
    model = vl.apply_lora(copy.deepcopy(base), vl.LoraConfig(targets=["0", "3"], rank=3, family=family, tucker=True))
    randomize(model)
    path = tmp_path / "a.safetensors"
    vl.save_adapter(model, path)
    loaded = vl.load_adapter(copy.deepcopy(base), path)
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(loaded(x), model(x))
    assert vl.read_adapter(path).layers["0"].family == family


def test_a_file_whose_family_tensors_do_not_fit_the_layer_is_refused_before_any_change(tmp_path):
    from safetensors.torch import load_file, save_file

    base = _two_layers()
    model = vl.apply_lora(copy.deepcopy(base), vl.LoraConfig(targets=["0", "3"], rank=2, family="loha"))
    path = tmp_path / "a.safetensors"
    vl.save_adapter(model, path)
    tensors = load_file(path)
    tensors["0.hada_w1_b"] = torch.zeros(2, 5)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    save_file(tensors, path, metadata=meta)
    fresh = copy.deepcopy(base)
    with pytest.raises(AdapterFileError, match=r"0\.hada_w1_b: shape"):
        vl.load_adapter(fresh, path)
    assert not any(isinstance(m, vl.LoraLayer) for m in fresh.modules())


@pytest.mark.parametrize("family", ["loha", "lokr"])
def test_resize_turns_loha_and_lokr_into_lora_with_the_reported_error(family, tmp_path):
    base = _two_layers()
    model = vl.apply_lora(copy.deepcopy(base), vl.LoraConfig(targets=["0", "3"], rank=2, family=family))
    randomize(model, std=0.3)
    x = torch.randn(2, 4, 5, 5)
    before = model(x).detach()
    deltas = {n: model.get_submodule(n).delta_weight() for n in ("0", "3")}
    report = vl.resize_adapter(model, rank=3)
    for row in report:
        layer = model.get_submodule(row.name)
        assert layer.adapter("default").family == "lora" and row.new_rank == 3
        actual = (layer.delta_weight() - deltas[row.name]).norm() / deltas[row.name].norm()
        assert actual.item() == pytest.approx(row.relative_error, rel=1e-3, abs=1e-6)
    exact = vl.apply_lora(
        copy.deepcopy(base), vl.LoraConfig(targets=["0", "3"], rank=2, family=family), adapter_name="x"
    )
    randomize(exact, std=0.3)
    y = exact(x).detach()
    vl.resize_adapter(exact, rank=64, adapter_name="x")  # at full rank the LoRA is ΔW itself
    assert_rel_close(exact(x), y, 1e-5)
    vl.save_adapter(exact, tmp_path / "r.safetensors", adapter_name="x")
    assert vl.read_adapter(tmp_path / "r.safetensors").config.family == "lora"
    assert before.shape == y.shape


def test_weighted_combination_of_two_families_is_the_weighted_sum_of_their_changes():
    base = _two_layers()
    model = vl.apply_lora(copy.deepcopy(base), vl.LoraConfig(targets=["0", "3"], rank=2, family="dora"))
    vl.apply_lora(model, vl.LoraConfig(targets=["0", "3"], rank=2, family="lokr"), adapter_name="k")
    randomize(model, std=0.2)
    layer = model.get_submodule("0")
    w = layer.base.weight
    d1 = layer.adapter("default").delta(w, layer.delta)
    d2 = layer.adapter("k").delta(w, layer.delta)
    vl.set_adapter(model, {"default": 0.7, "k": -0.4})
    x = torch.randn(2, 4, 5, 5)
    expected = F.conv2d(x, w + 0.7 * d1 - 0.4 * d2, layer.base.bias, padding=1)
    assert_rel_close(layer(x), expected, 1e-5)


def test_the_hadamard_product_has_autograd_s_gradients():
    g = torch.Generator().manual_seed(2)
    factors = [
        torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((5, 2), (2, 7), (5, 2), (2, 7))
    ]
    assert torch.autograd.gradcheck(lambda *f: hadamard_delta(*f, 0.7, (5, 7)), factors)


def test_review_cases_a_full_kron_lokr_a_merged_dora_export_and_unbatched_input(tmp_path):
    """LoKr of two full halves keeps scale 1 in files too; a merged DoRA model exports W' not W''; DoRA's
    training form takes an unbatched conv input."""
    from safetensors.torch import load_file

    lokr = vl.apply_lora(nn.Sequential(nn.Linear(64, 64)), vl.LoraConfig(targets="0", rank=4, alpha=16, family="lokr"))
    randomize(lokr, std=0.3)
    ad = lokr[0].adapter("default")
    assert ad.scale == 1.0 and set(ad.tensors()) == {"lokr_w1", "lokr_w2"}
    path = vl.export_adapter(lokr, tmp_path / "k.safetensors", format="kohya")
    written = load_file(path)
    assert torch.equal(written["lora_unet_0.lokr_w1"], ad.lokr_w1.detach())  # nothing folded in: LyCORIS' scale is 1

    torch.manual_seed(0)
    dora = vl.apply_lora(nn.Sequential(nn.Linear(16, 16)), vl.LoraConfig(targets="0", rank=2, family="dora"))
    randomize(dora, std=0.3)
    x = torch.randn(3, 16)
    expected = dora(x).detach()
    vl.merge(dora)
    out = vl.export_merged(dora, tmp_path / "m.safetensors")
    plain = nn.Sequential(nn.Linear(16, 16))
    plain.load_state_dict(load_file(out))
    assert_rel_close(plain(x), expected, 1e-5)

    conv = vl.apply_lora(
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1)), vl.LoraConfig(targets="0", rank=2, family="dora")
    )
    randomize(conv, std=0.3)
    x = torch.randn(16, 16, 2)  # unbatched (C, H, W) with H = out channels
    trained = conv(x)
    with torch.no_grad():
        assert_rel_close(trained, conv(x), 1e-5)
