"""kohya LoRA/LoCon files: per-module alphas, the weight-space formula A1111/ComfyUI apply, diffusers'
kohya converter, and import of files visionlora did not write (Tucker ``lora_mid`` included)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import visionlora as vl
from tests.conftest import assert_rel_close, randomize_lora, tiny_pipeline, tiny_unet, unet_input
from tests.conftest import unet_from as _fresh
from tests.conftest import unet_output as _out

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

CONV = "down_blocks.0.resnets.0.conv1"
QUERY = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _adapted(alpha_pattern=None):
    unet = tiny_unet()
    base = copy.deepcopy(unet.state_dict())
    cfg = vl.LoraConfig(
        targets=["preset:unet-locon"],
        rank=4,
        alpha=6.0,
        rank_pattern={"*.resnets.*": 2},
        alpha_pattern=alpha_pattern or {},
    )
    vl.apply_lora(unet, cfg, example_input=unet_input(1))
    randomize_lora(unet, std=0.05)
    with torch.no_grad():
        expected = unet(**unet_input()).sample
    return unet, base, expected


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_locon_layout_with_one_alpha_and_each_modules_scale_folded_into_up(tmp_path):
    unet, _, _ = _adapted({"*.attn2.*": 1.5})
    path = vl.export_adapter(unet, tmp_path / "k.safetensors", format="kohya")
    tensors = _read(path)
    conv = "lora_unet_" + CONV.replace(".", "_")
    assert tensors[f"{conv}.lora_down.weight"].shape == (2, 32, 3, 3)
    assert tensors[f"{conv}.lora_up.weight"].shape == (32, 2, 1, 1)
    assert {t.item() for k, t in tensors.items() if k.endswith(".alpha")} == {6.0}
    assert tensors[f"{conv}.alpha"].dtype == torch.float32
    # attn2's true alpha is 1.5: its up carries the factor 1.5 / 6, the shared alpha's modules are untouched.
    attn2 = QUERY.replace("attn1", "attn2")
    native = vl.read_adapter(vl.save_adapter(unet, tmp_path / "n.safetensors"))
    up = tensors["lora_unet_" + attn2.replace(".", "_") + ".lora_up.weight"]
    assert_rel_close(up, native.tensors[f"{attn2}.lora_B.weight"] * 0.25, 1e-7)
    assert torch.equal(tensors[f"{conv}.lora_up.weight"], native.tensors[f"{CONV}.lora_B.weight"])
    assert all(k.startswith("lora_unet_") for k in tensors)


def test_the_weight_space_formula_of_a1111_and_comfyui_gives_the_merged_weights(tmp_path):
    unet, original, _ = _adapted({"*.attn2.*": 1.5, "*.resnets.0.*": 0.5})
    path = vl.export_adapter(unet, tmp_path / "k.safetensors", format="kohya")
    tensors = _read(path)
    merged = vl.merged_state_dict(unet)
    layers = vl.read_adapter(path).layers
    assert len(layers) > 20
    for name in layers:
        key = "lora_unet_" + name.replace(".", "_")
        up, down = tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"]
        weight = original[f"{name}.weight"]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        expected = weight + tensors[f"{key}.alpha"].item() / down.shape[0] * delta
        assert_rel_close(merged[f"{name}.weight"], expected, 1e-5)


@pytest.mark.parametrize("alphas", [None, {"down_blocks.*": 2.0}, {"*.attn2.*": 1.5, "*.resnets.0.*": 0.5}])
def test_diffusers_kohya_converter_loads_it_exactly(alphas, tmp_path):
    # Ranks 4/2 and alphas that differ per module: the file's one alpha is what diffusers reads right.
    unet, base, expected = _adapted(alphas)
    path = vl.export_adapter(unet, tmp_path / "k.safetensors", format="kohya")
    folder = tiny_pipeline(tmp_path / "pipe", _fresh(base))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.load_lora_weights(str(path))
    assert_rel_close(_out(pipe.unet), expected, 1e-5)
    assert (expected - _out(_fresh(base))).abs().max() > 1e-2


def test_visionlora_reads_its_kohya_export_back_with_the_true_ranks_and_alphas(tmp_path):
    unet, base, expected = _adapted({"*.attn2.*": 1.5})
    path = vl.export_adapter(unet, tmp_path / "k.safetensors", format="kohya", dtype=torch.float16)
    assert {t.dtype for k, t in _read(path).items() if not k.endswith(".alpha")} == {torch.float16}
    native = vl.read_adapter(vl.export_adapter(unet, tmp_path / "n.safetensors", dtype=torch.float16))
    back = vl.read_adapter(path)
    assert back.format == "kohya" and not back.flat_names
    assert back.layers == native.layers and back.config == native.config
    folded = {f"{n}.lora_B.weight" for n, spec in native.layers.items() if spec.alpha != 6.0}
    assert folded and all(".attn2." in k for k in folded)
    # Bit for bit where the module's alpha is the file's; within fp16 rounding where B carried the fold.
    assert all(torch.equal(back.tensors[k], t) for k, t in native.tensors.items() if k not in folded)
    for key in folded:
        assert_rel_close(back.tensors[key].float(), native.tensors[key].float(), 2e-3)
    assert_rel_close(_out(vl.load_adapter(_fresh(base), path)), expected, 2e-3)


def test_files_from_elsewhere_map_by_flattened_name_and_tucker_mid_is_folded_exactly(tmp_path):
    unet = tiny_unet()
    base = copy.deepcopy(unet.state_dict())
    g = torch.Generator().manual_seed(0)
    down, mid, up = (
        torch.randn(3, 32, 1, 1, generator=g),
        torch.randn(3, 3, 3, 3, generator=g),
        torch.randn(32, 3, 1, 1),
    )
    q_down, q_up = torch.randn(2, 32, 1, 1, generator=g), torch.randn(32, 2, 1, 1, generator=g)  # a Linear, stored 1x1
    conv, query = "lora_unet_" + CONV.replace(".", "_"), "lora_unet_" + QUERY.replace(".", "_")
    file = {
        f"{conv}.lora_down.weight": down,
        f"{conv}.lora_mid.weight": mid,
        f"{conv}.lora_up.weight": up,
        f"{conv}.alpha": torch.tensor(1.5),
        f"{query}.lora_down.weight": q_down,
        f"{query}.lora_up.weight": q_up,  # no .alpha: alpha = rank
    }
    save_file(file, str(tmp_path / "theirs.safetensors"), metadata={"ss_network_module": "lycoris.kohya"})
    read = vl.read_adapter(tmp_path / "theirs.safetensors")
    assert read.format == "kohya" and read.flat_names
    assert {n: (s.rank, s.alpha) for n, s in read.layers.items()} == {
        CONV.replace(".", "_"): (3, 1.5),
        QUERY.replace(".", "_"): (2, 2.0),
    }
    vl.load_adapter(unet, tmp_path / "theirs.safetensors")
    merged = vl.merged_state_dict(unet)
    # Tucker: ΔW[o, i, h, w] = Σ_a Σ_b up[o, a] · mid[a, b, h, w] · down[b, i], scaled by alpha / r.
    tucker = torch.einsum("oa,abhw,bi->oihw", up.flatten(1), mid, down.flatten(1))
    assert_rel_close(merged[f"{CONV}.weight"], base[f"{CONV}.weight"] + 0.5 * tucker, 1e-5)
    assert_rel_close(merged[f"{QUERY}.weight"], base[f"{QUERY}.weight"] + q_up.flatten(1) @ q_down.flatten(1), 1e-5)
    reference = _fresh(base)
    reference.load_state_dict(merged)
    assert_rel_close(_out(unet), _out(reference), 1e-5)


def test_keys_that_cannot_be_mapped_are_listed(tmp_path):
    unet, _, _ = _adapted()
    tensors = _read(vl.export_adapter(unet, tmp_path / "k.safetensors", format="kohya"))
    cases = {
        "vae": ({"lora_vae_decoder_x.lora_down.weight": torch.zeros(2, 4)}, "lora_vae_decoder"),
        "oft": ({"lora_unet_x.oft_blocks": torch.zeros(2, 4, 4)}, "lora_unet_x.oft_blocks"),
    }
    for name, (extra, listed) in cases.items():
        save_file(tensors | extra, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(vl.AdapterFileError, match=rf"1 keys cannot be mapped .*\['{listed}"):
            vl.read_adapter(tmp_path / f"{name}.safetensors")
    save_file(tensors | {"lora_unet_x.hada_w1_a": torch.zeros(2, 4)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(vl.AdapterFileError, match="layer 'x': a loha module needs hada_w1_b, hada_w2_a, hada_w2_b"):
        vl.read_adapter(tmp_path / "loha.safetensors")
    renamed = {k.replace("down_blocks_0_resnets_0", "down_blocks_7_resnets_0"): v for k, v in tensors.items()}
    save_file(renamed, str(tmp_path / "other.safetensors"))
    with pytest.raises(vl.AdapterFileError, match=r"cannot be mapped onto a UNet2DConditionModel: .*down_blocks_7"):
        vl.load_adapter(_fresh(tiny_unet().state_dict()), tmp_path / "other.safetensors")
    with pytest.raises(vl.AdapterFileError, match="flattened"):
        vl.export_adapter(tmp_path / "other.safetensors", tmp_path / "p", format="peft")


def test_load_adapter_says_which_format_it_found(tmp_path, caplog):
    unet, base, _ = _adapted()
    path = vl.export_adapter(unet, tmp_path / "k.safetensors", format="kohya")
    with caplog.at_level("INFO", logger="visionlora"):
        vl.load_adapter(_fresh(base), path)
    assert f"{path}: read as a kohya adapter with {len(vl.read_adapter(path).layers)} LoRA layers" in caplog.text


def test_lycoris_kohya_loader_applies_the_export_exactly(tmp_path, monkeypatch):
    """LyCORIS' own reader of kohya files (``lycoris.kohya.create_network_from_weights``), on ranks 4/2
    and alphas 6/2/1.5 that differ per module: the file's one alpha and folded ups give every module
    its true scale there too."""
    kohya = pytest.importorskip("lycoris.kohya")
    unet, base, expected = _adapted({"down_blocks.*": 2.0, "*.attn2.*": 1.5})
    path = vl.export_adapter(unet, tmp_path / "k.safetensors", format="kohya")
    target = _fresh(base)
    # Only the file's modules: LyCORIS' default presets would also wrap the whole UNet afresh.
    for preset in ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE"):
        monkeypatch.setattr(kohya.LycorisNetworkKohya, preset, [])
    monkeypatch.setattr(kohya.LycorisNetworkKohya, "TEXT_ENCODER_TARGET_REPLACE_NAME", [])
    network, _ = kohya.create_network_from_weights(1.0, str(path), None, None, target, for_inference=True)
    network.apply_to(None, target, apply_text_encoder=False, apply_unet=True)
    assert len(network.unet_loras) == len(vl.read_adapter(path).layers)
    assert_rel_close(_out(target), expected, 1e-5)
