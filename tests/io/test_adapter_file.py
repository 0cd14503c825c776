"""Adapter files: round trip onto a fresh model, self-describing metadata, refusal of bad files."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import visionlora as vl
from tests.conftest import assert_rel_close, randomize_lora

CFG = vl.LoraConfig(
    targets=["layer4.*"], rank=4, alpha=8, rank_pattern={"layer4.0.*": 16}, trainable=["fc"], bias="lora_only"
)


def build(seed: int = 0, num_classes: int = 5) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=num_classes).eval()


@pytest.fixture
def saved(tmp_path):
    model = vl.apply_lora(build(), CFG)
    randomize_lora(model)
    with torch.no_grad():
        model.fc.weight.mul_(2)  # the trainable head has been trained too
    path = vl.save_adapter(model, tmp_path / "adapter.safetensors")
    return model, path


X = torch.randn(2, 3, 32, 32)


def test_round_trip_onto_a_freshly_built_model(saved):
    model, path = saved
    fresh = vl.load_adapter(build(), path)
    with torch.no_grad():
        assert_rel_close(fresh(X), model(X), tol=1e-6)
    assert vl.list_adapters(fresh) == ["default"]
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_file_holds_only_lora_and_trainable_tensors_and_describes_itself(saved):
    _, path = saved
    tensors = load_file(path)
    assert set(tensors) == {f"{n}.lora_{ab}.weight" for n in _layer_names() for ab in "AB"} | {"fc.weight", "fc.bias"}
    assert tensors["layer4.0.conv1.lora_A.weight"].shape == (16, 256, 3, 3)
    assert tensors["layer4.1.conv2.lora_B.weight"].shape == (512, 4, 1, 1)
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["visionlora"])
    assert meta["format"] == "visionlora.adapter" and meta["format_version"] == 1
    assert vl.LoraConfig.from_dict(meta["config"]) == CFG and "family" not in meta["config"]  # older versions read it
    plain = {"groups": 1, "dilation": [1, 1], "padding_mode": "zeros", "custom_forward": False}
    assert meta["layers"]["layer4.0.conv1"] == {
        "kind": "Conv2d",
        "rank": 16,
        "alpha": 8.0,
        "resolution": None,
        "geometry": plain,
    }
    assert meta["layers"]["layer4.1.conv2"]["rank"] == 4
    assert meta["extra"] == ["fc.bias", "fc.weight"]


def _layer_names() -> list[str]:
    return ["layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2"]


def test_load_under_another_name_next_to_an_existing_adapter(saved):
    model, path = saved
    with pytest.raises(vl.AdapterError, match="already has adapter 'default'"):
        vl.load_adapter(model, path)
    vl.load_adapter(model, path, adapter_name="copy")
    assert vl.list_adapters(model) == ["default", "copy"]


def _rewrite(path, tmp_path, *, tensors=None, meta=None, name="bad.safetensors"):
    src_tensors = load_file(path)
    with safe_open(path, "pt") as f:
        src_meta = json.loads(f.metadata()["visionlora"])
    new_tensors = tensors(src_tensors) if tensors else src_tensors
    new_meta = meta(src_meta) if meta else src_meta
    out = tmp_path / name
    save_file(new_tensors, out, {"visionlora": new_meta if isinstance(new_meta, str) else json.dumps(new_meta)})
    return out


def _drop(d, key):
    d = dict(d)
    del d[key]
    return d


def _with(d, key, value):
    return {**d, key: value}


BAD_FILES = {
    "missing tensor": (
        dict(tensors=lambda t: _drop(t, "layer4.1.conv2.lora_B.weight")),
        r"missing \['layer4.1.conv2.lora_B.weight'\]",
    ),
    "unexpected tensor": (
        dict(tensors=lambda t: _with(t, "evil.weight", torch.zeros(1))),
        r"unexpected \['evil.weight'\]",
    ),
    "wrong shape": (
        dict(tensors=lambda t: _with(t, "layer4.1.conv2.lora_A.weight", torch.zeros(5, 512, 3, 3))),
        r"layer4.1.conv2.lora_A.weight: shape \(5, 512, 3, 3\) in the file, \(4, 512, 3, 3\) expected for rank 4",
    ),
    "module that does not exist": (
        dict(
            tensors=lambda t: {k.replace("layer4.1.conv2", "layer9.conv"): v for k, v in t.items()},
            meta=lambda m: _with(
                m, "layers", {k.replace("layer4.1.conv2", "layer9.conv"): v for k, v in m["layers"].items()}
            ),
        ),
        r"layer9.conv: no such module in ResNet",
    ),
    "wrong kind": (
        dict(
            meta=lambda m: _with(
                m,
                "layers",
                _with(m["layers"], "layer4.1.conv2", {"kind": "Linear", "rank": 4, "alpha": 8, "resolution": None}),
            )
        ),
        r"layer4.1.conv2: file has a Linear adapter, the model has a Conv2d",
    ),
    "NaN values": (
        dict(tensors=lambda t: _with(t, "fc.weight", torch.full_like(t["fc.weight"], float("nan")))),
        r"tensor 'fc.weight' holds NaN or Inf",
    ),
    "integer dtype": (
        dict(tensors=lambda t: _with(t, "fc.bias", torch.zeros(5, dtype=torch.int64))),
        r"tensor 'fc.bias' has dtype torch.int64",
    ),
    "absurd rank": (
        dict(
            meta=lambda m: _with(
                m,
                "layers",
                _with(m["layers"], "layer4.1.conv2", {"kind": "Conv2d", "rank": 10**9, "alpha": 8, "resolution": None}),
            )
        ),
        r"rank 1000000000 is not an integer in \[1, 65536\]",
    ),
    "metadata not JSON": (dict(meta=lambda m: "{not json"), r"metadata is not valid JSON"),
    "deeply nested JSON": (dict(meta=lambda m: "[" * 200_000), r"metadata is not valid JSON \(RecursionError"),
    "alpha too large for a float": (
        dict(
            meta=lambda m: _with(
                m,
                "layers",
                _with(
                    m["layers"], "layer4.1.conv2", {"kind": "Conv2d", "rank": 4, "alpha": 10**400, "resolution": None}
                ),
            )
        ),
        r"layer 'layer4.1.conv2': alpha 1000.* is not a finite number > 0",
    ),
    "reserved adapter name": (dict(meta=lambda m: _with(m, "adapter_name", "training")), r"reserved by torch.nn"),
    "float8 tensor": (
        dict(tensors=lambda t: _with(t, "fc.bias", torch.zeros(5).to(torch.float8_e4m3fn))),
        r"tensor 'fc.bias' has dtype torch.float8_e4m3fn; expected one of float16",
    ),
    "unknown config key": (
        dict(meta=lambda m: _with(m, "config", _with(m["config"], "rnak", 3))),
        r"stored config is invalid: rnak: unknown key; did you mean 'rank'",
    ),
    "future format version": (
        dict(meta=lambda m: _with(m, "format_version", 99)),
        r"format_version 99 is not supported",
    ),
    "head for another class count": (
        dict(tensors=lambda t: _with(_with(t, "fc.weight", torch.zeros(9, 512)), "fc.bias", torch.zeros(9))),
        r"fc.bias: shape \(9,\) in the file, \(5,\) in the model",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_refused_by_name_and_the_model_is_left_exactly_as_it_was(saved, tmp_path, case):
    _, path = saved
    changes, message = BAD_FILES[case]
    bad = _rewrite(path, tmp_path, **changes)
    model = build(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(vl.AdapterFileError, match=message) as info:
        vl.load_adapter(model, bad)
    assert str(bad) in str(info.value)
    _assert_untouched(model, before, grads)


def _assert_untouched(model, before, grads):
    assert not any(isinstance(m, vl.LoraLayer) for m in model.modules())
    state = model.state_dict()
    assert list(state) == list(before) and all(torch.equal(before[k], state[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert vl.list_adapters(model) == []


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "not a valid safetensors file"),
        (b"\x00" * 7, "not a valid safetensors file"),
        (b"garbage" * 50, "not a valid"),
    ],
)
def test_unreadable_files_are_refused(tmp_path, content, message):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(vl.AdapterFileError, match=message):
        vl.load_adapter(build(), path)


def test_truncated_file_and_missing_file_and_foreign_safetensors(saved, tmp_path):
    _, path = saved
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-1000])
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(vl.AdapterFileError, match=r"truncated.safetensors: not a valid safetensors file"):
        vl.load_adapter(model, truncated)
    _assert_untouched(model, before, {n: True for n, _ in model.named_parameters()})
    with pytest.raises(vl.AdapterFileError, match=r"nope.safetensors: no such file"):
        vl.load_adapter(model, tmp_path / "nope.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(vl.AdapterFileError, match="not an adapter in a format visionlora reads"):
        vl.load_adapter(model, plain)


def test_save_is_atomic_a_failed_write_keeps_the_old_file(saved, tmp_path, monkeypatch):
    model, path = saved
    good = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("visionlora.io.files.save_file", broken_save)
    with pytest.raises(vl.AdapterFileError, match=r"could not be written \(disk full\); the existing one is unchanged"):
        vl.save_adapter(model, path, overwrite=True)
    assert path.read_bytes() == good
    assert sorted(os.listdir(path.parent)) == ["adapter.safetensors"]


def test_saving_an_unknown_adapter_names_the_available_ones(saved, tmp_path):
    model, _ = saved
    with pytest.raises(vl.AdapterError, match=r"no adapter 'style'; it has \['default'\]"):
        vl.save_adapter(model, tmp_path / "a.safetensors", adapter_name="style")


def test_batchnorm_statistics_updated_in_training_travel_with_the_adapter(tmp_path):
    model = vl.apply_lora(build(), CFG)
    randomize_lora(model)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32) * 3 + 1)  # train-mode forward moves every BatchNorm's running stats
    model.eval()
    path = vl.save_adapter(model, tmp_path / "a.safetensors")
    with safe_open(path, "pt") as f:
        buffers = json.loads(f.metadata()["visionlora"])["buffers"]
    assert "bn1.running_mean" in buffers and "layer4.1.bn2.num_batches_tracked" in buffers
    fresh = vl.load_adapter(build(), path)
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))


def test_no_buffers_are_saved_when_training_left_them_alone(saved):
    _, path = saved
    with safe_open(path, "pt") as f:
        assert json.loads(f.metadata()["visionlora"])["buffers"] == []


def test_explicit_invalid_adapter_name_is_refused_before_any_change(saved):
    _, path = saved
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(vl.AdapterError, match=r"adapter name 'a.b' is invalid"):
        vl.load_adapter(model, path, adapter_name="a.b")
    _assert_untouched(model, before, {n: True for n, _ in model.named_parameters()})


def test_a_file_cannot_put_an_adapter_on_a_multihead_attention_projection(tmp_path):
    source = vl.apply_lora(torch.nn.Sequential(torch.nn.Linear(8, 8)), vl.LoraConfig(targets="0", rank=2))
    path = vl.save_adapter(source, tmp_path / "a.safetensors")
    forged = _rewrite(
        path,
        tmp_path,
        tensors=lambda t: {k.replace("0.", "0.out_proj.", 1): v for k, v in t.items()},
        meta=lambda m: _with(m, "layers", {"0.out_proj": m["layers"]["0"]}),
    )
    with pytest.raises(vl.AdapterFileError, match=r"0\.out_proj: file has a Linear adapter, the model has a"):
        vl.load_adapter(torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2)), forged)


def test_saving_to_a_folder_is_refused(saved, tmp_path):
    model, _ = saved
    with pytest.raises(vl.AdapterFileError, match="is a folder; give a file path"):
        vl.save_adapter(model, tmp_path)


def test_shared_layout_round_trips_and_its_shapes_are_checked(tmp_path):
    from tests.conftest import tiny_net

    cfg = vl.LoraConfig(targets="block.*", rank=3, conv_groups="shared")
    model = vl.apply_lora(tiny_net(), cfg)
    randomize_lora(model)
    assert model.block[2].adapters["default"].lora_A.shape == (3, 1, 3, 3)  # one A for the 8 groups
    path = vl.save_adapter(model, tmp_path / "shared.safetensors")
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(vl.load_adapter(tiny_net(), path)(x), model(x))
    per_group = _rewrite(
        path, tmp_path, meta=lambda m: _with(m, "config", _with(m["config"], "conv_groups", "per_group"))
    )
    with pytest.raises(
        vl.AdapterFileError, match=r"block.0.lora_A.weight: shape \(3, 4, 3, 3\) in the file, \(6, 4, 3, 3\)"
    ):
        vl.load_adapter(tiny_net(), per_group)


def test_loading_leaves_the_global_random_stream_alone(saved):
    _, path = saved
    model = build()
    torch.manual_seed(123)
    vl.load_adapter(model, path)
    after_load = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after_load, torch.rand(3))


def test_a_nested_target_in_a_file_is_refused_before_any_change(tmp_path):
    class GatedConv(torch.nn.Conv2d):
        def __init__(self) -> None:
            super().__init__(16, 16, 1)
            self.gate = torch.nn.Linear(16, 16)

    source = vl.apply_lora(torch.nn.Sequential(GatedConv()), vl.LoraConfig(targets="0.gate", rank=2))
    path = vl.save_adapter(source, tmp_path / "gate.safetensors")
    outer = vl.save_adapter(
        vl.apply_lora(torch.nn.Sequential(GatedConv()), vl.LoraConfig(targets="0", rank=2)), tmp_path / "o.safetensors"
    )
    both = _rewrite(
        path,
        tmp_path,
        tensors=lambda t: {**t, **load_file(outer)},
        meta=lambda m: _with(
            m, "layers", {"0": {"kind": "Conv2d", "rank": 2, "alpha": 8.0, "resolution": None}, **m["layers"]}
        ),
    )
    model = torch.nn.Sequential(GatedConv())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(vl.AdapterFileError, match=r"'0.gate' lies inside '0'"):
        vl.load_adapter(model, both)
    _assert_untouched(model, before, {n: True for n, _ in model.named_parameters()})


def test_saving_under_a_file_is_a_clear_error(saved, tmp_path):
    model, path = saved
    with pytest.raises(vl.AdapterFileError, match="cannot create its folder"):
        vl.save_adapter(model, path / "inside.safetensors")
