"""SDXL adapter files: kohya names as sd-scripts writes them (SGM UNet layout, lora_te1_/lora_te2_) and
the diffusers layout, both loaded by diffusers' own StableDiffusionXLPipeline.load_lora_weights, and
files written by sd-scripts' naming and by diffusers read exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import visionlora as vl
from tests.conftest import assert_rel_close, randomize_lora, sdxl_input, tiny_sdxl_pipeline

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

IDS = torch.tensor([[0, 5, 9, 12, 1, 1, 1, 1]])
QUERY = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_q"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


def _pipe(folder):
    return diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))


def _outputs(pipe) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {
            "unet": pipe.unet(**sdxl_input()).sample,
            "text_encoder": pipe.text_encoder(IDS)[0],
            "text_encoder_2": pipe.text_encoder_2(IDS)[0],
        }


@pytest.fixture(scope="module")
def adapted(folder):
    """The pipeline with LoRA on the UNet (ranks 4/2, alphas 8/2/3 by module) and both text encoders."""
    pipe = _pipe(folder)
    unet_cfg = vl.LoraConfig(
        targets=["preset:unet-attention"],
        rank=4,
        alpha=8,
        rank_pattern={"*.attn2.*": 2},
        alpha_pattern={"down_blocks.*": 2, "*.to_out.0": 3},
    )
    vl.apply_lora(pipe.unet, unet_cfg)
    targets = ["*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj", "*.self_attn.out_proj"]
    vl.apply_lora(pipe.text_encoder, vl.LoraConfig(targets=targets, rank=2, alpha=4))
    vl.apply_lora(pipe.text_encoder_2, vl.LoraConfig(targets=[*targets, "*.mlp.fc1"], rank=3, alpha=1.5))
    for i, part in enumerate((pipe.unet, pipe.text_encoder, pipe.text_encoder_2)):
        randomize_lora(part, seed=i, std=0.1)
    return pipe, _outputs(pipe)


def _export(pipe, path, fmt):
    return vl.export_adapter(
        pipe.unet, path, format=fmt, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2
    )


def _keys(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_diffusers_sdxl_loader_applies_every_part_exactly(folder, adapted, fmt, tmp_path):
    pipe, expected = adapted
    path = _export(pipe, tmp_path / f"{fmt}.safetensors", fmt)
    base = _outputs(_pipe(folder))
    fresh = _pipe(folder)
    fresh.load_lora_weights(str(path))
    got = _outputs(fresh)
    for part in expected:
        assert (expected[part] - base[part]).abs().max() > 1e-3, part  # the adapter does something
        assert_rel_close(got[part], expected[part], 1e-5)


def test_kohya_sdxl_names_are_sd_scripts_sgm_layout_and_both_text_encoders(adapted, tmp_path):
    pipe, _ = adapted
    keys = _keys(_export(pipe, tmp_path / "k.safetensors", "kohya"))
    # The tiny UNet has one ResNet per block (SDXL: 2), so its first attention sits in input_blocks.3.
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_q.lora_down.weight" in keys
    assert "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_out_0.alpha" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_k.lora_up.weight" in keys
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1.lora_up.weight" in keys
    assert not any(k.startswith("lora_unet_down_blocks") for k in keys)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_visionlora_reads_its_sdxl_exports_back_with_names_ranks_and_alphas(folder, adapted, fmt, tmp_path):
    pipe, expected = adapted
    path = _export(pipe, tmp_path / f"{fmt}.safetensors", fmt)
    fresh = _pipe(folder)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        back = vl.read_adapter(path, component=part)
        native = vl.read_adapter(vl.save_adapter(getattr(pipe, part), tmp_path / f"{fmt}-{part}.safetensors"))
        assert back.layers == native.layers, part
        vl.load_adapter(getattr(fresh, part), path, component=part)
    got = _outputs(fresh)
    for part in expected:
        assert_rel_close(got[part], expected[part], 1e-5)


def test_a_file_named_as_sd_scripts_names_sdxl_loras_maps_onto_the_model(folder, adapted, tmp_path):
    """What sd-scripts writes: SGM names, each module's true alpha and B, no visionlora record."""
    from visionlora.io.kohya import flat_name, kohya_name, sgm_names
    from visionlora.state import original_state_dict

    pipe, expected = adapted
    sgm = sgm_names(list(original_state_dict(pipe.unet)))
    assert sgm is not None and sgm[QUERY] == "input_blocks.3.1.transformer_blocks.1.attn2.to_q"
    tensors = {}
    for part, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        record = vl.read_adapter(vl.save_adapter(getattr(pipe, part), tmp_path / f"{part}.safetensors"))
        for name, spec in record.layers.items():
            key = prefix + (flat_name(sgm[name]) if part == "unet" else kohya_name(part, name))
            tensors[f"{key}.lora_down.weight"] = record.tensors[f"{name}.lora_A.weight"]
            tensors[f"{key}.lora_up.weight"] = record.tensors[f"{name}.lora_B.weight"]
            tensors[f"{key}.alpha"] = torch.tensor(spec.alpha)
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, str(theirs), metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl"})
    fresh = _pipe(folder)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert vl.read_adapter(theirs, component=part).flat_names
        vl.load_adapter(getattr(fresh, part), theirs, component=part)
    got = _outputs(fresh)
    for part in expected:
        assert_rel_close(got[part], expected[part], 1e-5)


def test_a_file_written_by_diffusers_save_lora_weights_loads_exactly(folder, tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    def lora_state(model):  # what diffusers' training scripts pass to save_lora_weights
        return {k.replace(".default", ""): v for k, v in model.state_dict().items() if ".lora_" in k}

    pipe = _pipe(folder)
    unet = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    inject_adapter_in_model(unet, pipe.unet)
    te = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    inject_adapter_in_model(te, pipe.text_encoder)
    inject_adapter_in_model(te, pipe.text_encoder_2)
    torch.manual_seed(0)
    for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        for name, p in part.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.1)
    expected = _outputs(pipe)
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        str(tmp_path / "saved"),
        unet_lora_layers=lora_state(pipe.unet),
        text_encoder_lora_layers=lora_state(pipe.text_encoder),
        text_encoder_2_lora_layers=lora_state(pipe.text_encoder_2),
        unet_lora_adapter_metadata=unet.to_dict(),  # alpha 8 != rank: kept in the header
        text_encoder_lora_adapter_metadata=te.to_dict(),
        text_encoder_2_lora_adapter_metadata=te.to_dict(),
    )
    path = tmp_path / "saved" / "pytorch_lora_weights.safetensors"
    fresh = _pipe(folder)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert vl.read_adapter(path, component=part).format == "diffusers"
        vl.load_adapter(getattr(fresh, part), path, component=part)
    got = _outputs(fresh)
    for part in expected:
        assert_rel_close(got[part], expected[part], 1e-5)


def test_an_sdxl_query_keeps_its_true_rank_in_the_kohya_header(adapted, tmp_path):
    pipe, _ = adapted
    path = _export(pipe, tmp_path / "k.safetensors", "kohya")
    spec = vl.read_adapter(path).layers[QUERY]
    assert (spec.rank, spec.alpha) == (2, 2.0)
    unet = copy.deepcopy(pipe.unet)
    assert vl.read_adapter(vl.save_adapter(unet, tmp_path / "n.safetensors")).layers[QUERY] == spec


def test_sgm_names_of_a_unet_laid_out_as_sdxl_base_are_sd_scripts_names():
    """SDXL base's block layout (2 ResNets per block, attention in the lower two levels), tiny widths."""
    from visionlora.io.kohya import sgm_names

    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 2),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4,
    )
    sgm = sgm_names(list(unet.state_dict()))
    assert sgm is not None
    expected = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
        ),
        "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k": (
            "input_blocks.8.1.transformer_blocks.1.attn2.to_k"
        ),
        "down_blocks.2.attentions.1.proj_in": "input_blocks.8.1.proj_in",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.2": "middle_block.1.transformer_blocks.0.ff.net.2",
        "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0": (
            "output_blocks.2.1.transformer_blocks.0.attn1.to_out.0"
        ),
        "up_blocks.1.attentions.0.proj_out": "output_blocks.3.1.proj_out",
        "up_blocks.2.resnets.2.conv1": "output_blocks.8.0.in_layers.2",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "add_embedding.linear_1": "label_emb.0.0",
    }
    assert {k: sgm[k] for k in expected} == expected
    assert (
        sgm_names(list(diffusers.UNet2DConditionModel(**{**unet.config, "addition_embed_type": None}).state_dict()))
        is None
    )
