"""Merged checkpoints load in the original architecture, with no visionlora code, and give the same outputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file

import visionlora as vl
from tests.conftest import assert_rel_close, randomize_lora, tiny_net

X = torch.randn(2, 3, 32, 32)


def adapted_resnet(num_classes: int = 5):
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=num_classes).eval()
    model = copy.deepcopy(base)
    vl.apply_lora(model, vl.LoraConfig(targets="layer4.*", rank=4, alpha=8, trainable=["fc"]))
    randomize_lora(model, std=0.05)
    with torch.no_grad():
        model.fc.weight.mul_(2)
    return base, model


def test_torchvision_checkpoint_has_the_original_keys_and_loads_strictly(tmp_path):
    base, model = adapted_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = vl.export_merged(model, tmp_path / "merged.safetensors")
    state = load_file(path)
    assert sorted(state) == sorted(base.state_dict())  # safetensors stores keys sorted
    torch.manual_seed(7)
    fresh = torchvision.models.resnet18(num_classes=5).eval()
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert_rel_close(fresh(X), model(X))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # exporting changes nothing


def test_timm_loads_it_through_pretrained_cfg_overlay_with_a_new_head(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    heads = vl.replace_head(model, 7)
    vl.apply_lora(model, vl.LoraConfig(targets="preset:resnet-last-blocks", rank=4, trainable=heads))
    randomize_lora(model, std=0.05)
    model.eval()
    path = vl.export_merged(model, tmp_path / "merged.safetensors")
    loaded = timm.create_model(
        "resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=7), num_classes=7
    ).eval()
    with torch.no_grad():
        assert_rel_close(loaded(X), model(X))


def test_already_merged_models_and_weighted_combinations_export_once(tmp_path):
    model = vl.apply_lora(tiny_net(), vl.LoraConfig(targets="block.*", rank=2))
    vl.apply_lora(model, vl.LoraConfig(targets=["block.0", "fc"], rank=2), adapter_name="b")
    randomize_lora(model, std=0.2)
    vl.set_adapter(model, {"default": 0.5, "b": 2.0})
    with torch.no_grad():
        expected = model(X)
        vl.merge(model)
        path = vl.export_merged(model, tmp_path / "m.safetensors")
    plain = tiny_net(seed=3)
    plain.load_state_dict(load_file(path), strict=True)
    with torch.no_grad():
        assert_rel_close(plain(X), expected)


def test_dtype_casts_after_float32_merge_math(tmp_path):
    _, model = adapted_resnet()
    state = load_file(vl.export_merged(model, tmp_path / "half.safetensors", dtype=torch.float16))
    assert all(v.dtype == torch.float16 for k, v in state.items() if "num_batches_tracked" not in k)
    assert state["layer1.0.bn1.num_batches_tracked"].dtype == torch.int64
    layer = model.layer4[0].conv1
    expected = (layer.base.weight.float() + layer.delta_weight(torch.float32)).half()
    assert torch.equal(state["layer4.0.conv1.weight"], expected)


def test_an_overflowing_export_raises_and_keeps_the_old_file(tmp_path):
    _, model = adapted_resnet()
    path = vl.export_merged(model, tmp_path / "m.safetensors")
    good = path.read_bytes()
    with torch.no_grad():
        model.layer4[0].conv1.adapter("default").lora_B.fill_(1e4)
        model.layer4[0].conv1.adapter("default").lora_A.fill_(1e4)
    with pytest.raises(vl.MergeError, match=r"NaN/Inf in layer4\.0\.conv1\.weight; nothing was written"):
        vl.export_merged(model, path, dtype=torch.float16, overwrite=True)
    assert path.read_bytes() == good


def test_diffusers_unet_exports_a_folder_that_from_pretrained_loads(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from tests.conftest import tiny_unet

    unet = tiny_unet()
    vl.apply_lora(unet, vl.LoraConfig(targets="preset:unet-attention", rank=4, alpha=4))
    randomize_lora(unet, std=0.05)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")  # an earlier, sharded export: replaced whole
    (tmp_path / "unet" / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"stale")
    with pytest.raises(vl.AdapterFileError, match="exists; pass overwrite=True"):
        vl.export_merged(unet, tmp_path / "unet")
    folder = vl.export_merged(unet, tmp_path / "unet", overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = diffusers.UNet2DConditionModel.from_pretrained(folder).eval()
    args = (torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 7, 24))
    with torch.no_grad():
        assert_rel_close(loaded(*args).sample, unet(*args).sample)
    assert not any(isinstance(m, vl.LoraLayer) for m in loaded.modules())


def test_a_pipeline_folder_gets_its_unet_replaced_and_loads_as_a_pipeline(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from tests.conftest import tiny_pipeline, tiny_unet, unet_input

    source = tiny_pipeline(tmp_path / "pipe", tiny_unet())
    unet = diffusers.UNet2DConditionModel.from_pretrained(source / "unet").eval()
    vl.apply_lora(unet, vl.LoraConfig(targets="preset:unet-locon", rank=4, alpha=2))
    randomize_lora(unet, std=0.05)
    vl.export_merged(unet, tmp_path / "out", pipeline=source)
    (tmp_path / "out" / "stale.txt").write_text("from the earlier export")
    out = vl.export_merged(unet, tmp_path / "out", pipeline=source, dtype=torch.float16, overwrite=True)  # whole
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out))
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in source.iterdir())
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118
    with torch.no_grad():
        expected = unet(**unet_input()).sample
        assert_rel_close(pipe.unet.float()(**unet_input()).sample, expected, 2e-3)
    untouched = diffusers.UNet2DConditionModel.from_pretrained(source / "unet")
    with torch.no_grad():
        assert (untouched(**unet_input()).sample - expected).abs().max() > 1e-2  # the source pipeline is unchanged
    for inside in (source, source / "merged", tmp_path):
        with pytest.raises(vl.ConfigError, match="outside"):
            vl.export_merged(unet, inside, pipeline=source)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a pipeline")
    with pytest.raises(vl.AdapterFileError, match=r"no model_index\.json"):
        vl.export_merged(unet, tmp_path / "mine", pipeline=source)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "not a pipeline"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out", "pipe", "pipe-vocab"]  # no staging left
    with pytest.raises(vl.ConfigError, match="not a diffusers pipeline folder"):
        vl.export_merged(unet, tmp_path / "x", pipeline=source / "unet")


def test_a_single_file_checkpoint_of_the_whole_pipeline_loads_in_from_single_file(tmp_path):
    # The original (LDM) layout A1111 and ComfyUI load; diffusers' from_single_file reads it back here.
    diffusers = pytest.importorskip("diffusers")
    from tests.conftest import tiny_pipeline, tiny_unet, unet_input

    source = tiny_pipeline(tmp_path / "pipe", tiny_unet())
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(source))
    vl.apply_lora(pipe.unet, vl.LoraConfig(targets="preset:unet-attention", rank=4, alpha=2))
    vl.apply_lora(pipe.text_encoder, vl.LoraConfig(targets=["*.q_proj", "*.out_proj"], rank=2, alpha=3))
    randomize_lora(pipe.unet, std=0.05)
    randomize_lora(pipe.text_encoder, seed=1, std=0.2)
    path = vl.export_merged(
        pipe.unet, tmp_path / "styled.safetensors", pipeline=source, others={"text_encoder": pipe.text_encoder}
    )
    with safe_open(str(path), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}  # noqa: SIM118
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    configs = tmp_path / "configs"  # from_single_file needs only configs and the tokenizer beside the file
    import shutil

    shutil.copytree(source, configs, ignore=shutil.ignore_patterns("*.safetensors"))
    loaded = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(configs), local_files_only=True)
    ids = torch.tensor([[0, 2, 4, 1]])
    with torch.no_grad():
        assert_rel_close(loaded.unet(**unet_input()).sample, pipe.unet(**unet_input()).sample)
        assert_rel_close(loaded.text_encoder(ids)[0], pipe.text_encoder(ids)[0])
    base_vae = diffusers.AutoencoderKL.from_pretrained(source / "vae").state_dict()
    assert all(torch.equal(loaded.vae.state_dict()[k], v) for k, v in base_vae.items())
    # The loaded pipeline's own objects work too (a single-file base), and fp16 casts every tensor.
    half = vl.export_merged(pipe.unet, tmp_path / "half.safetensors", pipeline=pipe, dtype=torch.float16)
    with safe_open(str(half), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118
    with pytest.raises(vl.ConfigError, match=r"a Stable Diffusion checkpoint holds 'unet', 'vae', 'text_encoder'"):
        vl.export_merged(pipe.unet, tmp_path / "x.safetensors", pipeline=pipe, others={"image_encoder": pipe.vae})
    sd2 = diffusers.UNet2DConditionModel(**{**dict(pipe.unet.config), "cross_attention_dim": 1024})
    with pytest.raises(vl.ConfigError, match=r"SD 2\.x's 1024-wide cross-attention"):
        vl.export_merged(sd2, tmp_path / "x.safetensors", pipeline=pipe)
    assert not (tmp_path / "x.safetensors").exists()
