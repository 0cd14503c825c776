"""DoRA, LoHa and LoKr files: LyCORIS' kohya layout both ways (files LyCORIS writes load exactly here,
files visionlora writes load exactly in LyCORIS), and what other formats refuse by name."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import visionlora as vl
from tests.conftest import assert_rel_close, tiny_unet, unet_input
from tests.test_families import randomize
from visionlora.errors import AdapterFileError

lycoris = pytest.importorskip("lycoris")
pytest.importorskip("diffusers")


@pytest.fixture(autouse=True)
def _no_duplicate_time_embedding(monkeypatch):
    """LyCORIS 4.1 targets the UNet's TimestepEmbedding both by type and by name and then asserts on the
    duplicate it made (lora_unet_time_embedding_linear_1); targeting it by type alone avoids that."""
    from lycoris.kohya import LycorisNetworkKohya

    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", ["conv_in", "conv_out"])


ATTENTION = ["*.attn1.to_q", "*.attn1.to_v", "*.attn2.to_k", "*.ff.net.2", "*.proj_in"]


def _output(unet):
    with torch.no_grad():
        return unet(**unet_input()).sample


def _lycoris_unet(unet, path):
    """``unet`` with the file applied by LyCORIS' own kohya loader (``create_network_from_weights``)."""
    from lycoris.kohya import create_network_from_weights

    network, weights = create_network_from_weights(1.0, str(path), None, None, unet, for_inference=True)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    assert len(network.unet_loras) == len({k.split(".")[0] for k in weights})  # every module was read
    return unet


@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("dora", {}),
        ("loha", {}),
        ("loha", {"tucker": True}),
        ("lokr", {}),
        ("lokr", {"lokr_factor": 4, "decompose_both": True}),
        # Not LoKr with a Tucker core: LyCORIS 4.1's create_network_from_weights takes the rank from
        # lokr_w2_a's second dimension, which is b there, and fails on its own such files too.
    ],
)
def test_kohya_files_visionlora_writes_load_exactly_in_lycoris(family, options, tmp_path):
    base = tiny_unet()
    targets = [*ATTENTION, "down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.0.conv_shortcut"]
    cfg = vl.LoraConfig(targets=targets, rank=3, alpha=5, family=family, alpha_pattern={"*.ff.net.2": 2}, **options)
    model = vl.apply_lora(copy.deepcopy(base), cfg)
    randomize(model, std=0.2)
    expected = _output(model)
    assert (expected - _output(base)).abs().max() > 1e-3
    path = vl.export_adapter(model, tmp_path / "a.safetensors", format="kohya")
    keys = load_file(path)
    ending = {"dora": ".dora_scale", "loha": ".hada_w1_a", "lokr": ".lokr_w2"}[family]
    assert any(k.endswith(ending) for k in keys) or family == "lokr"
    assert_rel_close(_output(_lycoris_unet(copy.deepcopy(base), path)), expected, 1e-5)
    # and back: the kept record restores the adapter exactly
    again = vl.load_adapter(copy.deepcopy(base), path)
    assert_rel_close(_output(again), expected, 1e-5)
    assert {s.family for s in vl.read_adapter(path).layers.values()} == {family}


@pytest.mark.parametrize(
    ("algo", "kwargs"),
    [
        ("loha", {}),
        ("loha", {"use_tucker": True, "preset": "unet-convblock-only"}),
        ("lokr", {"factor": 4}),
        ("lokr", {"decompose_both": True, "factor": 8}),
        ("lokr", {"use_tucker": True, "preset": "unet-convblock-only"}),
        ("locon", {"dora_wd": True}),
        ("locon", {"dora_wd": True, "preset": "unet-convblock-only"}),
        ("loha", {"dora_wd": True}),
        ("lokr", {"dora_wd": True, "wd_on_output": False}),
    ],
)
def test_kohya_files_lycoris_writes_load_exactly(algo, kwargs, tmp_path, capsys):
    from lycoris.kohya import create_network

    base = tiny_unet()
    unet = copy.deepcopy(base)
    kwargs = {"preset": "attn-mlp", **kwargs}  # "full" targets the time embedding twice (see above)
    network = create_network(1.0, 4, 2, None, [], unet, algo=algo, conv_dim=2, conv_alpha=1, **kwargs)
    network.apply_to([], unet, apply_text_encoder=False, apply_unet=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in network.named_parameters():
            scale = (
                1 + 0.2 * torch.randn(p.shape, generator=g)
                if "dora_scale" in name
                else torch.randn(p.shape, generator=g) * 0.1
            )
            p.copy_(p * scale if "dora_scale" in name else scale)
    expected = _output(unet)
    path = tmp_path / "lycoris.safetensors"
    network.save_weights(str(path), None, {"ss_network_module": "lycoris.kohya"})
    loaded = vl.load_adapter(copy.deepcopy(base), path)
    assert_rel_close(_output(loaded), expected, 1e-5)
    file = vl.read_adapter(path)
    if "dora_wd" in kwargs:
        axis = "in" if kwargs.get("wd_on_output") is False else "out"
        layer = next(m for m in loaded.modules() if isinstance(m, vl.LoraLayer))
        assert layer.adapter("default").norm_axis == axis
        from visionlora.cli import main

        assert main(["inspect", str(path)]) == 0
        assert f"(m per {axis})" in capsys.readouterr().out  # the file's DoRA convention, said
    assert len(file.layers) == len(network.unet_loras)


def test_files_from_lycoris_own_wrapper_on_any_model_load_exactly(tmp_path):
    from lycoris import create_lycoris

    torch.manual_seed(0)  # LyCORIS runs a conv's ΔW with zero padding whatever its padding_mode: none here
    base = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, groups=2), torch.nn.Flatten(),
        torch.nn.Linear(16 * 36, 6),
    )  # fmt: skip
    model = copy.deepcopy(base)
    network = create_lycoris(model, 1.0, linear_dim=2, linear_alpha=1, algo="lokr", factor=2)
    network.apply_to()
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "w.safetensors"
    network.save_weights(str(path), None, None)
    assert all(k.startswith("lycoris_") for k in load_file(path))
    loaded = vl.load_adapter(copy.deepcopy(base), path)
    with torch.no_grad():
        assert_rel_close(loaded(x), expected, 1e-5)


@pytest.mark.parametrize("family", ["loha", "lokr"])
def test_peft_and_diffusers_exports_refuse_loha_and_lokr_by_name(family, tmp_path):
    model = vl.apply_lora(tiny_unet(), vl.LoraConfig(targets=ATTENTION, rank=2, family=family))
    for fmt in ("peft", "diffusers"):
        with pytest.raises(AdapterFileError, match=f"(?i)is a {family} adapter, which {fmt} files cannot hold"):
            vl.export_adapter(model, tmp_path / fmt, format=fmt)
        assert not (tmp_path / fmt).exists()


def test_dora_peft_folders_load_both_ways_with_equal_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 6)
    )
    x = torch.randn(2, 3, 6, 6)
    # PEFT writes, visionlora reads
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(target_modules=["0", "3"], r=2, lora_alpha=6, use_dora=True)
    )
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        expected = theirs(x)
    ours = vl.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert {m.adapter("default").family for m in ours.modules() if isinstance(m, vl.LoraLayer)} == {"dora"}
    with torch.no_grad():
        assert_rel_close(ours(x), expected, 1e-5)
    # visionlora writes, PEFT reads
    model = vl.apply_lora(copy.deepcopy(base), vl.LoraConfig(targets=["0", "3"], rank=3, alpha=2, family="dora"))
    randomize(model)
    vl.export_adapter(model, tmp_path / "ours", format="peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        assert_rel_close(loaded(x), model(x), 1e-5)


def randomize_peft(model) -> None:
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(p * (1 + 0.2 * noise) if "magnitude" in name else noise * 0.1)


def test_dora_diffusers_files_load_in_diffusers_and_back(tmp_path):
    base = tiny_unet()
    model = vl.apply_lora(copy.deepcopy(base), vl.LoraConfig(targets=ATTENTION, rank=2, alpha=3, family="dora"))
    randomize(model, std=0.2)
    expected = _output(model)
    path = vl.export_adapter(model, tmp_path / "d.safetensors", format="diffusers")
    assert any(k.endswith(".lora_magnitude_vector") for k in load_file(path))
    theirs = copy.deepcopy(base)
    theirs.load_lora_adapter(str(path), prefix="unet")
    assert_rel_close(_output(theirs), expected, 1e-5)
    assert_rel_close(_output(vl.load_adapter(copy.deepcopy(base), path)), expected, 1e-5)


def test_dora_mixed_with_lora_or_per_input_channel_is_refused_by_peft_exports(tmp_path):
    base = tiny_unet()
    cfg = vl.LoraConfig(targets=ATTENTION, rank=2, family="dora", family_pattern={"*.ff.net.2": "lora"})
    model = vl.apply_lora(copy.deepcopy(base), cfg)
    with pytest.raises(AdapterFileError, match=r"mixes DoRA .* and LoRA .* layers"):
        vl.export_adapter(model, tmp_path / "p", format="peft")
    assert vl.export_adapter(model, tmp_path / "k.safetensors", format="kohya").is_file()


def test_a_kohya_dora_export_says_that_diffusers_drops_dora_scale(tmp_path, caplog):
    """diffusers 0.3x filters dora_scale out of kohya files (with its own warning) and loads plain LoRA."""
    model = vl.apply_lora(tiny_unet(), vl.LoraConfig(targets=ATTENTION, rank=2, family="dora"))
    with caplog.at_level("WARNING", logger="visionlora"):
        vl.export_adapter(model, tmp_path / "k.safetensors", format="kohya")
    assert "drops dora_scale from kohya files" in caplog.text


def test_lora_files_keep_the_config_older_versions_read_and_bad_family_files_are_refused(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    base = torch.nn.Sequential(torch.nn.Linear(8, 10))
    path = vl.save_adapter(
        vl.apply_lora(copy.deepcopy(base), vl.LoraConfig(targets="0", rank=2)), tmp_path / "a.safetensors"
    )
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["visionlora"])["config"]
    assert not {"family", "family_pattern", "lokr_factor", "decompose_both", "tucker"} & set(config)
    # LoKr factors that do not split the kernel: refused on load, the model unchanged
    save_file(
        {"lora_unet_0.lokr_w1": torch.ones(3, 2), "lora_unet_0.lokr_w2": torch.ones(3, 4)},
        str(tmp_path / "k.safetensors"),
    )
    fresh = copy.deepcopy(base)
    with pytest.raises(AdapterFileError, match=r"does not split a kernel of shape \(10, 8\)"):
        vl.load_adapter(fresh, tmp_path / "k.safetensors")
    assert isinstance(fresh[0], torch.nn.Linear)
    # a dora_scale that fits no channel layout
    save_file(
        {"lora_unet_0.lora_down.weight": torch.ones(2, 8), "lora_unet_0.lora_up.weight": torch.ones(10, 2),
         "lora_unet_0.dora_scale": torch.ones(8, 1, 2)},
        str(tmp_path / "d.safetensors"),
    )  # fmt: skip
    with pytest.raises(AdapterFileError, match="magnitude"):
        vl.load_adapter(copy.deepcopy(base), tmp_path / "d.safetensors")


def test_a_diffusers_file_whose_metadata_and_tensors_disagree_on_dora_is_refused(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    model = vl.apply_lora(tiny_unet(), vl.LoraConfig(targets=ATTENTION, rank=2))
    path = vl.export_adapter(model, tmp_path / "d.safetensors", format="diffusers")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    meta = json.loads(header["lora_adapter_metadata"])
    meta["unet.use_dora"] = True
    save_file(load_file(path), str(path), metadata=header | {"lora_adapter_metadata": json.dumps(meta)})
    with pytest.raises(AdapterFileError, match="use_dora=True but it holds no lora_magnitude_vector"):
        vl.read_adapter(path)
