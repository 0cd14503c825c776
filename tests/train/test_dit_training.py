"""Flux.1 and SD3 in the style recipe on tiny local pipelines: conditioning and model inputs as the
pipelines compute them, flow matching, the caches, resume, several processes, the outputs."""

from __future__ import annotations

import copy
import importlib.util
import math
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import visionlora as vl
from tests.conftest import tiny_flux_pipeline, tiny_sd3_pipeline, transformer_output
from visionlora.train import run_recipe
from visionlora.train.conditioning import Conditioner, Text
from visionlora.train.denoising import FlowMatching, pack_latents, unpack_latents
from visionlora.train.recipe import parse_recipe

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")
skimage_data = pytest.importorskip("skimage.data")
CLASSES = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    """Tiny Flux and SD3 pipelines and five real photographs (3:2 and 2:3)."""
    root = tmp_path_factory.mktemp("dit")
    tiny_flux_pipeline(root / "flux")
    tiny_sd3_pipeline(root / "sd3")
    images = root / "images"
    images.mkdir()
    photos = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea(), skimage_data.rocket()]
    for i, photo in enumerate([*photos, photos[0][::-1]]):
        size = (48, 32) if i < 3 else (32, 48)
        Image.fromarray(photo).resize(size).save(images / f"{i}.png")
    (images / "0.txt").write_text("zz style, a face")
    return root


def _recipe(root, family, **train):
    return parse_recipe(
        {
            "task": "diffusion-style",
            "model": {"pipeline": str(root / family)},
            "data": {"root": str(root / "images"), "caption": "zz style, a photo", "resolution": 16, "batch_size": 2},
            "lora": {"targets": [f"preset:{family}-attention"], "rank": 4, "alpha": 4},
            "train": {"epochs": 2, "lr": 1e-3, "seed": 0, **train},
            "validation": {"prompts": [], "steps": 2, "guidance_scale": 1.0},
            "output": {"export": ["diffusers", "kohya"]},
        }
    )


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_the_conditioning_is_what_each_pipeline_itself_computes(dit, family):
    pipe = getattr(diffusers, CLASSES[family]).from_pretrained(str(dit / family))
    cond = Conditioner(pipe, max_sequence_length=6)
    captions = ["a cat", "zz style, red dog"]
    ours = cond.encode([getattr(pipe, n) for n in cond.names], cond.ids(captions), [False] * len(cond.names))
    with torch.no_grad():
        if family == "flux":
            hidden, pooled, _ = pipe.encode_prompt(captions, None, max_sequence_length=6)
        else:
            hidden, _, pooled, _ = pipe.encode_prompt(
                captions, None, None, do_classifier_free_guidance=False, max_sequence_length=6
            )
    assert torch.equal(ours.hidden, hidden) and ours.pooled is not None and torch.equal(ours.pooled, pooled)
    assert hidden.shape[1] == (6 if family == "flux" else 8 + 6)  # SD3: the CLIPs' tokens, then the T5's


def test_flux_inputs_are_packed_and_positioned_as_the_pipeline_does_and_shifted_by_token_count(dit):
    pipe = diffusers.FluxPipeline.from_pretrained(str(dit / "flux"))
    latents = torch.randn(2, 4, 6, 10)
    packed = pack_latents(latents)
    assert torch.equal(packed, pipe._pack_latents(latents, 2, 4, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), latents)
    recipe = _recipe(dit, "flux")
    flow = FlowMatching(pipe, Conditioner(pipe), recipe.train)
    # Flux.1-dev's scheduler shifts dynamically: exp(mu) with mu from the pipeline's own formula.
    config = pipe.scheduler.config
    mu = diffusers.pipelines.flux.pipeline_flux.calculate_shift(
        1024, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
    )
    assert flow.shift(1024) == pytest.approx(math.exp(mu), rel=1e-12)
    # The transformer sees what the pipeline gives it at one denoising step.
    text = Text(torch.randn(2, 8, 16), torch.randn(2, 24))
    sigma = torch.tensor([0.3, 0.8])
    ours = flow.predict(pipe.transformer, latents, sigma, text, None)
    with torch.no_grad():
        theirs = pipe.transformer(
            hidden_states=packed,
            timestep=sigma,
            guidance=torch.full((2,), 3.5),
            pooled_projections=text.pooled,
            encoder_hidden_states=text.hidden,
            txt_ids=torch.zeros(8, 3),
            img_ids=pipe._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32),
        ).sample
    assert torch.equal(ours, pipe._unpack_latents(theirs, 6, 10, 1))
    # Rectified flow: x_t = (1 - s) x_0 + s noise, target noise - x_0.
    noise = torch.randn_like(latents)
    noisy, target, weights = flow.noised(latents, noise, sigma)
    assert torch.allclose(noisy[1], 0.2 * latents[1] + 0.8 * noise[1], atol=1e-6)
    assert torch.equal(target, noise - latents)
    assert torch.equal(weights, torch.ones(2))


def test_a_flux_run_caches_the_text_once_and_writes_what_diffusers_loads(dit, tmp_path):
    calls = []
    original = diffusers.FluxPipeline.from_pretrained

    def counting(*args, **kwargs):  # count the T5's forward passes of the run
        pipe = original(*args, **kwargs)
        pipe.text_encoder_2.register_forward_hook(lambda *a: calls.append(1))
        return pipe

    out = tmp_path / "run"
    recipe = _recipe(dit, "flux")
    recipe.validation.prompts = ["a cat"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(diffusers.FluxPipeline, "from_pretrained", counting)
        metrics = run_recipe(recipe, output=out, progress=False)
    # Encoded once, for the two captions (plus the samples' prompt, twice: base and adapted), not per step.
    assert metrics["steps"] == 4 and len(calls) == 1 + 2
    assert all(0.5 < loss < 5 for loss in metrics["losses"])
    with Image.open(out / "report" / "samples.png") as grid:
        assert grid.size == (2 * 16, 16)
    base = diffusers.FluxTransformer2DModel.from_pretrained(dit / "flux" / "transformer").eval()
    adapted = vl.load_adapter(copy.deepcopy(base), out / "adapter.safetensors")
    expected = transformer_output(adapted)
    assert (expected - transformer_output(base)).abs().max() > 1e-5
    merged = diffusers.FluxPipeline.from_pretrained(str(out / "merged"))
    torch.testing.assert_close(transformer_output(merged.transformer), expected, atol=1e-5, rtol=1e-5)
    for name in ("adapter-diffusers.safetensors", "adapter-kohya.safetensors"):
        pipe = original(str(dit / "flux"))
        if name.endswith("kohya.safetensors"):  # diffusers' kohya Flux converter assumes FLUX.1's width
            vl.load_adapter(pipe, out / name)
        else:
            pipe.load_lora_weights(str(out / name))
        torch.testing.assert_close(transformer_output(pipe.transformer), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_resume_with_buckets_and_validation_is_bit_for_bit(dit, tmp_path, family):
    sampling = "uniform" if family == "sd3" else "logit_normal"
    recipe = _recipe(dit, family, checkpoint_every=2, timestep_sampling=sampling)
    if family == "flux":  # Flux's CLIP trains too: the captions are then encoded every step
        recipe.text_encoder_lora = vl.LoraConfig(targets=["*.q_proj", "*.v_proj"], rank=2)
    recipe.data.buckets, recipe.data.bucket_step, recipe.data.bucket_min_side = True, 8, 8
    recipe.data.bucket_max_side, recipe.data.val_fraction = 32, 0.2
    run_recipe(recipe, output=tmp_path / "whole", progress=False)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    run_recipe(recipe, output=resumed, resume="latest", progress=False)
    names = ["adapter.safetensors", "best/adapter.safetensors"]
    names += ["adapter-text-encoder.safetensors"] if family == "flux" else []
    for name in names:
        a, b = load_file(tmp_path / "whole" / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("family", ["flux"])  # SD3 shares every distributed step (suite time: one family)
def test_two_processes_train_the_adapter_of_one(dit, tmp_path, family):
    from tests.train.test_diffusion import _launch, _same_effect
    from visionlora.train import dump_recipe

    recipe = _recipe(dit, family, max_steps=3, max_grad_norm=1e-3)
    recipe.output.export = []
    if importlib.util.find_spec("bitsandbytes") is not None:  # DDP over an NF4 base too (the float one: SDXL's test)
        recipe.model.quantize = "nf4"
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(recipe))
    _launch(tmp_path, {"one": ("one", path), "ddp": ("ddp", path)})
    cls = diffusers.FluxTransformer2DModel if family == "flux" else diffusers.SD3Transformer2DModel
    base = cls.from_pretrained(dit / family / "transformer").eval()
    a, b = (
        transformer_output(vl.load_adapter(copy.deepcopy(base), tmp_path / r / "adapter.safetensors"))
        for r in ("one", "ddp")
    )
    _same_effect(transformer_output(base), a, b, "ddp")


def test_an_sd3_run_merges_into_a_pipeline_diffusers_loads(dit, tmp_path):
    out = tmp_path / "run"
    run_recipe(_recipe(dit, "sd3"), output=out, progress=False)
    base = diffusers.SD3Transformer2DModel.from_pretrained(dit / "sd3" / "transformer").eval()
    expected = transformer_output(vl.load_adapter(copy.deepcopy(base), out / "adapter.safetensors"))
    merged = diffusers.StableDiffusion3Pipeline.from_pretrained(str(out / "merged"))
    torch.testing.assert_close(transformer_output(merged.transformer), expected, atol=1e-5, rtol=1e-5)
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(dit / "sd3"))
    pipe.load_lora_weights(str(out / "adapter-diffusers.safetensors"))
    torch.testing.assert_close(transformer_output(pipe.transformer), expected, atol=1e-5, rtol=1e-5)


def test_flow_matching_options_on_a_unet_pipeline_are_refused_by_name(dit, tmp_path):
    from tests.conftest import tiny_pipeline, tiny_unet

    tiny_pipeline(tmp_path / "sd", tiny_unet())
    recipe = _recipe(dit, "flux", timestep_sampling="uniform")
    recipe.model.pipeline = str(tmp_path / "sd")
    recipe.lora.targets = ["preset:unet-attention"]
    with pytest.raises(vl.ConfigError, match=r"train\.timestep_sampling / train\.flow_shift"):
        run_recipe(recipe, output=tmp_path / "a", progress=False)


@pytest.mark.parametrize(
    ("name", "family"), [("flux-style.yaml", "flux"), ("sd3-style.yaml", "sd3"), ("dreambooth-flux.yaml", "flux")]
)
def test_the_shipped_transformer_recipes_run_on_a_tiny_pipeline(dit, name, family, tmp_path):
    from tests.train.conftest import run_shipped_recipe

    out = tmp_path / "run"
    tiny = ["lora.rank=4", "lora.alpha=4"]  # the tiny model is 16 wide
    metrics = run_shipped_recipe(name, dit / family, dit / "images", out, 16, *tiny)
    if name.startswith("dreambooth"):
        assert metrics["class_images"] == 2 and len(list((out / "class-images").iterdir())) == 2


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_single_file_base_in_the_original_layout_trains_and_merges_into_one_such_checkpoint(dit, tmp_path, family):
    from safetensors.torch import save_file

    from tests.conftest import tiny_flux_transformer, tiny_sd3_transformer
    from tests.io.test_dit_files import with_constants
    from visionlora.io.dit import diffusers_state_dict, original_state_dict

    build = tiny_flux_transformer if family == "flux" else tiny_sd3_transformer
    base = build()
    with torch.no_grad():  # not the pipeline folder's weights: the file's must be the ones trained
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    single = tmp_path / "base.safetensors"
    original = {f"model.diffusion_model.{k}": v for k, v in original_state_dict(base.state_dict(), family).items()}
    if family == "sd3":  # an SAI file holds the text encoders and VAE too: only the transformer is read
        original["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    save_file(original, single)  # BFL's files have no prefix; ComfyUI's and SAI's have this one
    recipe = _recipe(dit, family)
    recipe.model.pipeline, recipe.model.config = str(single), str(dit / family)
    out = tmp_path / "run"
    run_recipe(recipe, output=out, progress=False)
    expected = transformer_output(vl.load_adapter(copy.deepcopy(base), out / "adapter.safetensors"))
    merged = load_file(out / "merged.safetensors")
    fused = "double_blocks.0.img_attn.qkv.weight" if family == "flux" else "joint_blocks.0.x_block.attn.qkv.weight"
    assert fused in merged
    import diffusers.loaders.single_file_utils as sfu

    if family == "flux":
        convert = with_constants(
            sfu, "convert_flux_transformer_checkpoint_to_diffusers", **{"inner_dim = 3072": "inner_dim = 16"}
        )
    else:
        convert = sfu.convert_sd3_transformer_checkpoint_to_diffusers
    for state in (diffusers_state_dict(merged, family), convert(dict(merged))):
        model = build()
        model.load_state_dict(state)
        torch.testing.assert_close(transformer_output(model), expected, atol=1e-5, rtol=1e-5)
