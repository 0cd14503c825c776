"""LoRA on ConvTranspose1d/2d/3d: merged == unmerged == conv_transpose on W + ΔW (the textbook
formula), on every geometry torch accepts; output_size, files, and refusals by name."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionlora as vl
from tests.conftest import assert_rel_close

TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
FUNCTION = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def textbook_delta(a: torch.Tensor, b: torch.Tensor, scale: float, groups: int) -> torch.Tensor:
    """ΔW[i, o, k] = scale · Σ_t A[i, t, k] · B[g(i)·out/g + o, t], written out loop by loop."""
    inputs, rank, out = a.shape[0], a.shape[1], b.shape[0]
    delta = torch.zeros(inputs, out // groups, *a.shape[2:], dtype=torch.float64)
    for i in range(inputs):
        group = i // (inputs // groups)
        for o in range(out // groups):
            row = group * (out // groups) + o
            for t in range(rank):
                delta[i, o] += a[i, t].double() * b[row, t].flatten()[0].double()
    return delta * scale


def random_config(rng: random.Random) -> dict:
    dims = rng.choice([1, 2, 2, 3])
    groups = rng.choice([1, 1, 2, 4])
    stride = rng.randint(1, 3)
    dilation = rng.randint(1, 2)
    return {
        "dims": dims,
        "in": groups * rng.randint(1, 3),
        "out": groups * rng.randint(1, 3),
        "kernel": rng.randint(1, 3),
        "stride": stride,
        "padding": rng.randint(0, 2),
        "output_padding": rng.randint(0, max(stride, dilation) - 1),
        "dilation": dilation,
        "groups": groups,
        "bias": rng.random() < 0.5,
        "rank": rng.randint(1, 4),
    }


@pytest.mark.parametrize("seed", range(40))
def test_merged_unmerged_and_the_textbook_formula_agree_on_random_geometries(seed):
    c = random_config(random.Random(seed))
    torch.manual_seed(seed)
    layer = TRANSPOSED[c["dims"]](
        c["in"],
        c["out"],
        c["kernel"],
        c["stride"],
        c["padding"],
        c["output_padding"],
        c["groups"],
        c["bias"],
        c["dilation"],
    )
    model = nn.Sequential(layer)
    x = torch.randn(2, c["in"], *([5] * c["dims"]))
    with warnings.catch_warnings():  # tiny layers: the adapter may outgrow the layer
        warnings.simplefilter("ignore")
        vl.apply_lora(model, vl.LoraConfig(targets=["0"], rank=c["rank"], alpha=3.0))
    adapter = model[0].adapters["default"]
    with torch.no_grad():
        adapter.lora_B.normal_(std=0.3)
    delta = textbook_delta(adapter.lora_A, adapter.lora_B, 3.0 / c["rank"], c["groups"])
    weight = layer.weight.double() + delta
    bias = None if layer.bias is None else layer.bias.double()
    geometry = (c["stride"], c["padding"], c["output_padding"], c["groups"], c["dilation"])
    reference = FUNCTION[c["dims"]](x.double(), weight, bias, *geometry)
    unmerged = model(x)
    assert_rel_close(unmerged.double(), reference, 1e-5)
    original = layer.weight.detach().clone()
    vl.merge(model)
    assert_rel_close(model(x).double(), reference, 1e-5)
    vl.unmerge(model)
    assert torch.equal(model[0].base.weight, original)  # bit for bit


def test_output_size_reaches_the_branch_and_the_base_alike():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1))
    vl.apply_lora(model, vl.LoraConfig(targets=["0"], rank=2))
    with torch.no_grad():
        model[0].adapters["default"].lora_B.normal_()
    x = torch.randn(1, 4, 5, 5)
    for size in ([9, 9], [10, 10]):  # both output sizes stride 2 allows
        y = model[0](x, output_size=size)
        merged = F.conv_transpose2d(
            x, model[0].base.weight + model[0].delta_weight(), model[0].base.bias, 2, 1, 1 if size[0] == 10 else 0
        )
        assert y.shape[-2:] == tuple(size)
        assert_rel_close(y, merged, 1e-5)


def test_saved_and_loaded_exactly_and_refused_by_the_formats_with_no_transposed_lora(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, groups=2))
    vl.apply_lora(model, vl.LoraConfig(targets=["0", "1"], rank=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.2)
    x = torch.randn(1, 3, 8, 8)
    path = vl.save_adapter(model, tmp_path / "a.safetensors")
    assert vl.read_adapter(path).layers["1"].kind == "ConvTranspose2d"
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, groups=2))
    fresh.load_state_dict({k.replace("base.", ""): v for k, v in model.state_dict().items() if "lora_" not in k})
    vl.load_adapter(fresh, path)
    assert torch.equal(fresh(x), model(x))
    for fmt in ("peft", "diffusers", "kohya"):
        with pytest.raises(vl.AdapterFileError, match=r"1: a ConvTranspose2d, for which .* has no LoRA layer"):
            vl.export_adapter(model, tmp_path / f"x-{fmt}", format=fmt)
    wide = nn.Sequential(nn.ConvTranspose2d(4, 4, 3, groups=2))
    with pytest.raises(vl.ConfigError, match="per_group layout only"):
        vl.apply_lora(wide, vl.LoraConfig(targets=["0"], rank=2, conv_groups="shared"))


def test_resize_and_extract_work_per_group_on_transposed_convs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(8, 12, 3, stride=2, groups=2))
    vl.apply_lora(model, vl.LoraConfig(targets=["0"], rank=3, alpha=6.0))
    with torch.no_grad():
        model[0].adapters["default"].lora_B.normal_(std=0.3)
    layer = model[0]
    before = layer.delta_weight(torch.float64)
    report = vl.resize_adapter(model, rank=3)  # the same rank: the same ΔW (refactored by SVD)
    assert report[0].relative_error < 1e-12
    torch.testing.assert_close(layer.delta_weight(torch.float64), before, atol=1e-6, rtol=1e-5)
    # rank 1: per group, the best rank-1 approximation of that group's (out/g) x (in/g · k) block
    vl.resize_adapter(model, rank=1)
    blocks = before.reshape(2, 4, 6, 9).transpose(1, 2).reshape(2, 6, 36)
    u, sv, vh = torch.linalg.svd(blocks, full_matrices=False)
    best = (u[:, :, :1] * sv[:, None, :1]) @ vh[:, :1]
    got = layer.delta_weight(torch.float64).reshape(2, 4, 6, 9).transpose(1, 2).reshape(2, 6, 36)
    torch.testing.assert_close(got, best, atol=1e-6, rtol=1e-5)
    # extract: a fine-tuned weight whose change has rank 2 per group comes back exactly at rank 2
    base = nn.Sequential(nn.ConvTranspose2d(8, 12, 3, stride=2, groups=2))
    tuned = nn.Sequential(nn.ConvTranspose2d(8, 12, 3, stride=2, groups=2))
    tuned.load_state_dict(base.state_dict())
    change = torch.randn(2, 6, 2) @ torch.randn(2, 2, 36)  # per group (out/g) x (in/g · k), rank 2
    with torch.no_grad():
        tuned[0].weight += change.reshape(2, 6, 4, 9).transpose(1, 2).reshape(8, 6, 3, 3)
    vl.extract_lora(base, tuned, vl.LoraConfig(targets=["0"], rank=2, alpha=2.0))
    x = torch.randn(1, 8, 5, 5)
    assert_rel_close(base(x), tuned(x), 1e-5)
