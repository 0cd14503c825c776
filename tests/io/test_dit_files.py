"""Flux and SD3 LoRA files: diffusers' loaders, sd-scripts/ComfyUI's fused original layout, PEFT
prefixes, both directions exact, and the original layouts checked by diffusers' own converters."""

from __future__ import annotations

import inspect

import pytest
import torch
from safetensors.torch import load_file, save_file

import visionlora as vl
from tests.conftest import (
    randomize_lora,
    tiny_flux_pipeline,
    tiny_flux_transformer,
    tiny_sd3_pipeline,
    tiny_sd3_transformer,
    transformer_output,
)
from visionlora.errors import AdapterFileError
from visionlora.io.dit import diffusers_state_dict, original_state_dict
from visionlora.io.formats import file_components

diffusers = pytest.importorskip("diffusers")
MODELS = {"flux": tiny_flux_transformer, "sd3": tiny_sd3_transformer}
PIPELINES = {"flux": (tiny_flux_pipeline, "FluxPipeline"), "sd3": (tiny_sd3_pipeline, "StableDiffusion3Pipeline")}


def with_constants(module, name: str, **replace: str):
    """diffusers' function ``name`` with literal constants replaced (its converters hard-code
    FLUX.1's width, 3072, which a test-sized model does not have); the code is otherwise theirs."""
    source = inspect.getsource(getattr(module, name))
    for old, new in replace.items():
        assert old in source, old
        source = source.replace(old, new)
    namespace = dict(vars(module))
    exec(source, namespace)
    return namespace[name]


def trained(family: str, **overrides):
    """A tiny transformer with random LoRA of mixed ranks and alphas on every preset layer."""
    model = MODELS[family]()
    targets = [f"preset:{family}-all", "norm_out.linear"]
    if family == "flux":
        targets.append("preset:flux-modulation")
    cfg = {
        "targets": targets,
        "rank": 4,
        "alpha": 6.0,
        "rank_pattern": {"*.to_k": 2, "*.add_v_proj": 3},
        "alpha_pattern": {"*.to_v": 1.5},
    }
    vl.apply_lora(model, vl.LoraConfig(**(cfg | overrides)))
    randomize_lora(model)
    return model


def comfy_apply(base: torch.nn.Module, family: str, lora: dict[str, torch.Tensor]) -> torch.Tensor:
    """What ComfyUI computes for a kohya file on the original checkpoint: for each module,
    W += alpha / rank · up @ down with rank = down's rows; the result mapped back to diffusers."""
    state = original_state_dict(base.state_dict(), family)
    flat = {k.removesuffix(".weight").replace(".", "_"): k for k in state if k.endswith(".weight")}
    for key in [k for k in lora if k.endswith(".lora_down.weight")]:
        module = key.removeprefix("lora_unet_").removesuffix(".lora_down.weight")
        down, up = lora[key].double(), lora[key.replace("lora_down", "lora_up")].double()
        alpha = float(lora[key.replace("lora_down.weight", "alpha")])
        weight = flat[module]
        state[weight] = (state[weight].double() + alpha / down.shape[0] * up @ down).float()
    fresh = MODELS[family]()
    fresh.load_state_dict(diffusers_state_dict(state, family))
    return transformer_output(fresh)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_original_layout_is_the_one_diffusers_own_converters_read(family):
    import diffusers.loaders.single_file_utils as sfu

    model = MODELS[family](num_layers=2, **({"num_single_layers": 2} if family == "flux" else {}))
    state = model.state_dict()
    original = original_state_dict(state, family)
    if family == "flux":
        convert = with_constants(
            sfu, "convert_flux_transformer_checkpoint_to_diffusers", **{"inner_dim = 3072": "inner_dim = 16"}
        )
        assert original["double_blocks.0.img_attn.qkv.weight"].shape == (48, 16)
        assert original["single_blocks.1.linear1.weight"].shape == (112, 16)
    else:
        convert = sfu.convert_sd3_transformer_checkpoint_to_diffusers
        assert original["joint_blocks.0.x_block.attn2.qkv.weight"].shape == (48, 16)
    converted = convert(dict(original))
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)
    back = diffusers_state_dict({f"model.diffusion_model.{k}": v for k, v in original.items()}, family)
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_diffusers_file_loads_in_the_pipelines_own_loader(tmp_path, family):
    model = trained(family)
    want = transformer_output(model)
    path = vl.export_adapter(model, tmp_path / "lora.safetensors", format="diffusers")
    assert all(k.startswith("transformer.") for k in load_file(path))
    build, cls = PIPELINES[family]
    pipe = getattr(diffusers, cls).from_pretrained(str(build(tmp_path / "pipe")))
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(transformer_output(pipe.transformer), want, atol=1e-5, rtol=0)
    back = MODELS[family]()
    vl.load_adapter(back, path)
    torch.testing.assert_close(transformer_output(back), want, atol=1e-5, rtol=0)


def test_flux_kohya_file_is_fused_as_sd_scripts_writes_it_and_reads_in_diffusers_and_comfyui(tmp_path, monkeypatch):
    import diffusers.loaders.lora_conversion_utils as lcu
    import diffusers.loaders.lora_pipeline as lp

    model = trained("flux")
    want = transformer_output(model)
    path = vl.export_adapter(model, tmp_path / "lora.safetensors", format="kohya")
    lora = load_file(path)
    # q, k, v of a double block stack into one qkv LoRA of rank 4 + 2 + 4; linear1 holds q, k, v and the MLP.
    assert lora["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (10, 16)
    assert lora["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (48, 10)
    assert lora["lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight"].shape == (4 + 4 + 3, 16)
    assert lora["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (14, 16)
    assert lora["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (112, 14)
    assert {"lora_unet_double_blocks_0_img_mod_lin.alpha", "lora_unet_final_layer_adaLN_modulation_1.alpha"} <= set(
        lora
    )
    assert not any("transformer_blocks" in k for k in lora)
    torch.testing.assert_close(comfy_apply(MODELS["flux"](), "flux", lora), want, atol=1e-5, rtol=0)
    # diffusers' kohya Flux converter, its split of linear1 sized for this model instead of FLUX.1's 3072
    convert = with_constants(
        lcu, "_convert_kohya_flux_lora_to_diffusers", **{"dims=[3072, 3072, 3072, 12288]": "dims=[16, 16, 16, 64]"}
    )
    monkeypatch.setattr(lp, "_convert_kohya_flux_lora_to_diffusers", convert)
    # diffusers drops kohya's top-level keys (norm_out): the blocks' LoRA alone for its loader
    blocks = trained("flux", targets=["preset:flux-all", "preset:flux-modulation"])
    path = vl.export_adapter(blocks, tmp_path / "blocks.safetensors", format="kohya")
    pipe = diffusers.FluxPipeline.from_pretrained(str(tiny_flux_pipeline(tmp_path / "pipe")))
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(transformer_output(pipe.transformer), transformer_output(blocks), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_kohya_file_round_trips_exactly_with_and_without_visionlora_record(tmp_path, family):
    model = trained(family)
    want = transformer_output(model)
    path = vl.export_adapter(model, tmp_path / "lora.safetensors", format="kohya")
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(path), str(bare))  # as another tool would copy it: no header
    ranks = {n: s.rank for n, s in vl.read_adapter(path).layers.items()}
    for file in (path, bare):
        read = vl.read_adapter(file)
        assert read.component == "transformer" and not read.flat_names
        # the block-diagonal fused LoRA splits back to each module's own rank
        assert {n: s.rank for n, s in read.layers.items()} == ranks
        back = MODELS[family]()
        vl.load_adapter(back, file)
        torch.testing.assert_close(transformer_output(back), want, atol=1e-5, rtol=0)


def test_sd3_kohya_names_and_the_last_blocks_swapped_context_modulation(tmp_path):
    model = trained("sd3", targets=["preset:sd3-all", "*.norm1_context.linear", "*.norm1.linear", "norm_out.linear"])
    want = transformer_output(model)
    path = vl.export_adapter(model, tmp_path / "lora.safetensors", format="kohya")
    lora = load_file(path)
    assert "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight" in lora
    assert lora["lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight"].shape[0] == 48
    torch.testing.assert_close(comfy_apply(MODELS["sd3"](), "sd3", lora), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_dense_fused_lora_from_another_trainer_splits_exactly_sharing_A(tmp_path, family):
    model = MODELS[family]()
    state = original_state_dict(model.state_dict(), family)
    g = torch.Generator().manual_seed(3)
    lora = {}
    fused = ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "double_blocks.0.txt_mod.lin"]
    if family == "sd3":
        fused = ["joint_blocks.0.context_block.attn.qkv", "joint_blocks.1.context_block.adaLN_modulation.1"]
    for name in fused:
        rows, width = state[f"{name}.weight"].shape
        key = "lora_unet_" + name.replace(".", "_")
        lora[f"{key}.lora_down.weight"] = torch.randn(5, width, generator=g)
        lora[f"{key}.lora_up.weight"] = torch.randn(rows, 5, generator=g) * 0.1
        lora[f"{key}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "dense.safetensors"
    save_file(lora, str(path))
    read = vl.read_adapter(path)
    assert all(s.rank == 5 for s in read.layers.values())  # shared A: every part keeps the full rank
    vl.load_adapter(model, path)
    comfy = comfy_apply(MODELS[family](), family, lora)
    torch.testing.assert_close(transformer_output(model), comfy, atol=1e-5, rtol=0)


def test_peft_prefixed_transformer_keys_import_exactly(tmp_path):
    model = trained("flux")
    want = transformer_output(model)
    path = vl.export_adapter(model, tmp_path / "lora.safetensors", format="diffusers")
    tensors = {k.replace("transformer.", "transformer.base_model.model.", 1): v for k, v in load_file(path).items()}
    for name, keys in {
        "prefixed": tensors,
        "peft_only": {k.removeprefix("transformer."): v for k, v in tensors.items()},
    }.items():
        file = tmp_path / f"{name}.safetensors"
        save_file(keys, str(file), metadata=dict(_header(path)))
        back = MODELS["flux"]()
        vl.load_adapter(back, file)
        torch.testing.assert_close(transformer_output(back), want, atol=1e-5, rtol=0)


def _header(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "peft", "visionlora"])
def test_one_unknown_key_is_refused_and_the_model_left_bit_for_bit(tmp_path, fmt):
    model = trained("flux")
    path = vl.export_adapter(model, tmp_path / "lora", format=fmt)
    weights = path / "adapter_model.safetensors" if fmt == "peft" else path
    tensors, header = load_file(weights), _header(weights)
    extra = {
        "kohya": "lora_unet_double_blocks_0_img_attn_qkvx.lora_down.weight",
        "diffusers": "transformer.transformer_blocks.0.attn.to_qq.lora_A.weight",
        "peft": "base_model.model.transformer_blocks.0.attn.to_qq.lora_A.weight",
        "visionlora": "transformer_blocks.0.attn.to_qq.lora_A.weight",
    }[fmt]
    tensors[extra] = torch.zeros(2, 16)
    save_file(tensors, str(weights), metadata=header)
    target = MODELS["flux"]()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(AdapterFileError, match=r"to_qq|qkvx"):
        vl.load_adapter(target, path)
    after = target.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _text_out(encoder: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return encoder(torch.tensor([[0, 5, 9, 1]])).last_hidden_state


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_a_flux_pipeline_file_loads_every_part_onto_the_pipeline_and_merges_from_the_cli(tmp_path, fmt, caplog):
    from visionlora.cli import main

    folder = tiny_flux_pipeline(tmp_path / "pipe")
    trained_pipe = diffusers.FluxPipeline.from_pretrained(str(folder))
    vl.apply_lora(trained_pipe.transformer, vl.LoraConfig(targets=["preset:flux-attention"], rank=4, alpha=2))
    vl.apply_lora(trained_pipe.text_encoder, vl.LoraConfig(targets=["*.q_proj", "*.v_proj", "*.out_proj"], rank=2))
    t5 = vl.LoraConfig(targets=["*.SelfAttention.q", "*.SelfAttention.o"], rank=2)
    vl.apply_lora(trained_pipe.text_encoder_2, t5)
    for part in (trained_pipe.transformer, trained_pipe.text_encoder, trained_pipe.text_encoder_2):
        randomize_lora(part)
    kwargs = {"text_encoder": trained_pipe.text_encoder, "text_encoder_2": trained_pipe.text_encoder_2}
    path = vl.export_adapter(trained_pipe.transformer, tmp_path / "style.safetensors", format=fmt, **kwargs)
    # diffusers' Flux loader reads no T5 LoRA: its format holds the part, and the export says so
    assert ("read no T5 LoRA" in caplog.text) == (fmt == "diffusers")
    names = load_file(path)
    if fmt == "kohya":
        assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in names)
        assert any(k.startswith("lora_te3_encoder_block_0_layer_0_SelfAttention_q") for k in names)
    assert file_components(path) == ["transformer", *kwargs]
    pipe = diffusers.FluxPipeline.from_pretrained(str(folder))
    with pytest.raises(AdapterFileError, match="loaded onto one FluxTransformer2DModel"):
        vl.load_adapter(pipe.transformer, path)
    vl.load_adapter(pipe, path)
    torch.testing.assert_close(transformer_output(pipe.transformer), transformer_output(trained_pipe.transformer))
    for part in kwargs:
        torch.testing.assert_close(_text_out(getattr(pipe, part)), _text_out(getattr(trained_pipe, part)))
    assert main(["merge", "--base", str(folder), "--adapter", str(path), "--out", str(tmp_path / "merged")]) == 0
    merged = diffusers.FluxPipeline.from_pretrained(str(tmp_path / "merged"))
    torch.testing.assert_close(transformer_output(merged.transformer), transformer_output(trained_pipe.transformer))
    for part in kwargs:
        torch.testing.assert_close(_text_out(getattr(merged, part)), _text_out(getattr(trained_pipe, part)))


def test_comfyui_saved_flux_lora_and_a_peft_folder_with_a_component_prefix_read_exactly(tmp_path):
    model = trained("flux")
    want = transformer_output(model)
    kohya = load_file(vl.export_adapter(model, tmp_path / "k.safetensors", format="kohya"))
    comfy = {}
    for key, tensor in kohya.items():  # ComfyUI's LoraSave: diffusion_model.<original dotted name>
        stem, _, part = key.partition(".")
        dotted = original_name(stem.removeprefix("lora_unet_"))
        comfy[f"diffusion_model.{dotted}.{part}"] = tensor
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    back = MODELS["flux"]()
    vl.load_adapter(back, tmp_path / "comfy.safetensors")
    torch.testing.assert_close(transformer_output(back), want, atol=1e-5, rtol=0)
    folder = vl.export_adapter(model, tmp_path / "peft", format="peft")
    weights = folder / "adapter_model.safetensors"
    save_file({f"transformer.{k}": v for k, v in load_file(weights).items()}, str(weights), metadata=_header(weights))
    back = MODELS["flux"]()
    vl.load_adapter(back, folder)
    torch.testing.assert_close(transformer_output(back), want, atol=1e-5, rtol=0)


def original_name(flat: str) -> str:
    from visionlora.io.dit import flat_original_names

    return flat_original_names([flat], "flux")[1][flat]


def test_an_sd_scripts_shaped_flux1_dev_lora_maps_onto_the_real_architecture_as_diffusers_converts_it(tmp_path):
    """FLUX.1-dev's real sizes (19 double, 38 single blocks, 3072 wide; built on the meta device):
    every sd-scripts module name maps onto the model, and the split equals diffusers' own kohya
    converter, run unmodified at these sizes, for a dense (sd-scripts' default) fused LoRA."""
    import diffusers.loaders.lora_conversion_utils as lcu

    from visionlora.io.report import describe_adapter

    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel(num_layers=19, num_single_layers=38, guidance_embeds=True)
    shapes = {k: v.shape for k, v in original_state_dict(model.state_dict(), "flux").items()}
    g = torch.Generator().manual_seed(0)
    lora = {}
    for name, shape in shapes.items():
        if name.startswith(("double_blocks.", "single_blocks.")) and name.endswith(".weight") and len(shape) == 2:
            key = "lora_unet_" + name.removesuffix(".weight").replace(".", "_")
            lora[f"{key}.lora_down.weight"] = torch.randn(2, shape[1], generator=g) * 0.02
            lora[f"{key}.lora_up.weight"] = torch.randn(shape[0], 2, generator=g) * 0.02
            lora[f"{key}.alpha"] = torch.tensor(1.0)
    assert len(lora) == 3 * (19 * 10 + 38 * 3)
    path = tmp_path / "flux1-dev-lora.safetensors"
    save_file(lora, str(path), metadata={"ss_network_module": "networks.lora_flux"})
    report = describe_adapter(path, model)
    (part,) = report.parts
    assert report.loads and part.record is not None and len(part.record.layers) == 19 * 14 + 38 * 6
    ours = part.record
    theirs = lcu._convert_kohya_flux_lora_to_diffusers(dict(lora))
    for module in (
        "transformer_blocks.0.attn.to_k",
        "transformer_blocks.18.attn.add_v_proj",
        "single_transformer_blocks.37.proj_mlp",
        "single_transformer_blocks.5.attn.to_q",
        "transformer_blocks.3.norm1_context.linear",
    ):
        a, b = ours.tensors[f"{module}.lora_A.weight"], ours.tensors[f"{module}.lora_B.weight"]
        scale = ours.layers[module].alpha / ours.layers[module].rank
        ta, tb = theirs[f"transformer.{module}.lora_A.weight"], theirs[f"transformer.{module}.lora_B.weight"]
        torch.testing.assert_close((b @ a) * scale, tb @ ta, atol=1e-9, rtol=1e-5)


def test_a_one_model_file_loads_onto_a_pipelines_transformer(tmp_path):
    model = trained("flux")
    path = vl.save_adapter(model, tmp_path / "native.safetensors")
    pipe = diffusers.FluxPipeline.from_pretrained(str(tiny_flux_pipeline(tmp_path / "pipe")))
    vl.load_adapter(pipe, path)
    torch.testing.assert_close(transformer_output(pipe.transformer), transformer_output(model), atol=1e-6, rtol=0)
