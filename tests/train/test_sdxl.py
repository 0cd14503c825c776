"""SDXL in the style recipe on a tiny local SDXL pipeline: conditioning as the pipeline computes it,
aspect-ratio buckets on real images, resume, several processes, text-encoder LoRA and DreamBooth."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import visionlora as vl
from tests.conftest import sdxl_input, tiny_sdxl_pipeline
from visionlora.train import run_recipe
from visionlora.train.conditioning import Conditioner
from visionlora.train.data import EpochBatches
from visionlora.train.diffusion_data import crop_for, crop_ids, style_items
from visionlora.train.recipe import DreamBooth, parse_recipe

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")
skimage_data = pytest.importorskip("skimage.data")

SHAPES = {"wide": (48, 96), "tall": (96, 48), "square": (80, 80)}  # (height, width)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """A tiny SDXL pipeline and seven real photographs cropped to three aspect ratios (3 wide, 2 tall, 2 square)."""
    root = tmp_path_factory.mktemp("xl")
    tiny_sdxl_pipeline(root / "pipe")
    photos = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea()]
    images = root / "images"
    images.mkdir()
    plan = ["wide", "wide", "wide", "tall", "tall", "square", "square"]
    for i, shape in enumerate(plan):
        h, w = SHAPES[shape]
        photo = photos[i % 3]
        top, left = 20 * i, 10 * i
        crop = photo[top : top + 2 * h, left : left + 2 * w]
        Image.fromarray(crop).resize((w, h)).save(images / f"{i}-{shape}.png")
    (images / "0-wide.txt").write_text("zz style, a face, red")
    return root


def _recipe(root, **train):
    return parse_recipe(
        {
            "task": "diffusion-style",
            "model": {"pipeline": str(root / "pipe")},
            "data": {
                "root": str(root / "images"),
                "caption": "zz style, a photo",
                "resolution": 32,
                "batch_size": 2,
                "buckets": True,
                "bucket_step": 8,
                "bucket_min_side": 16,
                "bucket_max_side": 64,
            },
            "lora": {"targets": ["preset:unet-attention"], "rank": 4, "alpha": 4},
            "train": {"epochs": 2, "lr": 1e-3, "seed": 0, **train},
            "validation": {"prompts": ["a cat"], "steps": 2},
            "output": {"export": ["diffusers"]},
        }
    )


def test_the_conditioning_is_what_the_sdxl_pipeline_itself_computes(xl):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(xl / "pipe"))
    cond = Conditioner(pipe)
    assert cond.xl and cond.names == ["text_encoder", "text_encoder_2"]
    captions = ["a cat", "zz style, red"]
    ours = cond.encode([pipe.text_encoder, pipe.text_encoder_2], cond.ids(captions), [False, False])
    hidden, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    assert ours.hidden.shape == (2, 8, 40) and torch.equal(ours.hidden, hidden)
    assert ours.pooled is not None and torch.equal(ours.pooled, pooled)
    # The micro-conditioning: original size, crop top-left, target size, as the pipeline builds it.
    item = style_items(xl / "images", "x")[0]
    crop = crop_for(item.size, (24, 40), center=True, seed=0)
    expected = pipe._get_add_time_ids(item.size, crop.top_left, crop.target, torch.float32, 20)
    assert torch.equal(crop_ids(item, crop, flip=False)[None], expected)


def test_an_sdxl_run_with_buckets_writes_adapter_merged_pipeline_and_samples(xl, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = _recipe(xl)
    recipe.lora.rank_by_resolution = {32: 8, 16: 4, 0: 2}  # probed on SDXL's conditioning at 32 px latents
    metrics = run_recipe(recipe, output=out, progress=False)
    layers = vl.read_adapter(out / "adapter.safetensors").layers.values()
    assert {(s.resolution, s.rank) for s in layers} == {(16, 4)}  # the tiny UNet's attention is all at 16x16
    printed = capsys.readouterr().out
    assert "aspect-ratio buckets (3 used, width x height):" in printed
    assert "40x24: 3 image(s)" in printed and "24x40: 2 image(s)" in printed and "32x32: 2 image(s)" in printed
    assert metrics["steps"] == 2 * 4  # per epoch: wide 2 + 1, tall 2, square 2
    with Image.open(out / "report" / "samples.png") as grid:
        assert grid.size == (2 * 32, 32)
    merged = diffusers.StableDiffusionXLPipeline.from_pretrained(str(out / "merged"))
    base = diffusers.UNet2DConditionModel.from_pretrained(xl / "pipe" / "unet").eval()
    adapted = vl.load_adapter(copy.deepcopy(base), out / "adapter.safetensors")
    with torch.no_grad():
        expected = adapted(**sdxl_input()).sample
        assert torch.allclose(merged.unet(**sdxl_input()).sample, expected, rtol=1e-5, atol=1e-5)
        assert (expected - base(**sdxl_input()).sample).abs().max() > 1e-4
    # diffusers' own SDXL loader applies the exported file as the run's adapter.
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(xl / "pipe"))
    pipe.load_lora_weights(str(out / "adapter-diffusers.safetensors"))
    with torch.no_grad():
        assert torch.allclose(pipe.unet(**sdxl_input()).sample, expected, rtol=1e-5, atol=1e-5)


def test_every_batch_holds_one_bucket_and_every_image_comes_once_per_epoch():
    groups = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    batches = EpochBatches(len(groups), 2, seed=3, groups=groups)
    for epoch in range(3):
        batches.set_position(epoch)
        seen = list(batches)
        assert sorted(i for b in seen for i in b) == list(range(10))
        assert all(len({groups[i] for i in b}) == 1 for b in seen)
        assert sorted(len(b) for b in seen) == [1, 1, 2, 2, 2, 2]
    batches.set_position(1)
    again = list(batches)
    batches.set_position(1, start=2)
    assert list(batches) == again[2:]


def test_resume_with_buckets_text_encoder_lora_and_caption_controls_is_bit_for_bit(xl, tmp_path):
    recipe = _recipe(xl, checkpoint_every=3, keep_checkpoints=3, noise_offset=0.1)
    recipe.text_encoder_2_lora = vl.LoraConfig(targets=["*.self_attn.q_proj", "*.self_attn.v_proj"], rank=2)
    recipe.data.caption_dropout, recipe.data.shuffle_tags, recipe.data.keep_tokens = 0.3, True, 1
    recipe.data.center_crop, recipe.validation.prompts = False, []
    run_recipe(recipe, output=tmp_path / "whole", progress=False)
    names = ("adapter.safetensors", "adapter-text-encoder-2.safetensors")
    expected = {n: load_file(tmp_path / "whole" / n) for n in names}
    resumed = tmp_path / "resumed"
    step = "step-000003"  # mid-epoch
    shutil.copytree(tmp_path / "whole" / "checkpoints" / step, resumed / "checkpoints" / step)
    run_recipe(recipe, output=resumed, resume="latest", progress=False)
    for name in names:
        got = load_file(resumed / name)
        assert got.keys() == expected[name].keys()
        assert all(torch.equal(got[k], expected[name][k]) for k in got), name
    assert all(t.abs().max() > 0 for k, t in expected[names[1]].items() if "lora_B" in k)  # it trained
    # The merged pipeline holds the merged second text encoder.
    transformers = pytest.importorskip("transformers")
    te2 = transformers.CLIPTextModelWithProjection
    merged = te2.from_pretrained(tmp_path / "whole" / "merged" / "text_encoder_2").eval()
    adapted = vl.load_adapter(te2.from_pretrained(xl / "pipe" / "text_encoder_2"), tmp_path / "whole" / names[1]).eval()
    ids = torch.tensor([[0, 5, 9, 1]])
    with torch.no_grad():
        assert torch.allclose(merged(ids)[0], adapted(ids)[0], rtol=1e-5, atol=1e-6)


def test_two_processes_with_buckets_and_a_short_batch_train_the_adapter_of_one(xl, tmp_path):
    from tests.train.test_diffusion import _launch, _same_effect
    from visionlora.train import dump_recipe

    recipe = _recipe(xl, max_steps=4, max_grad_norm=1e-3)  # the wide bucket's short batch (1 image) is in it
    recipe.validation.prompts = []
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(recipe))
    _launch(tmp_path, {"one": ("one", path), "ddp": ("ddp", path)})
    unet = diffusers.UNet2DConditionModel.from_pretrained(xl / "pipe" / "unet").eval()
    with torch.no_grad():
        base = unet(**sdxl_input()).sample
        a, b = (
            vl.load_adapter(copy.deepcopy(unet), tmp_path / r / "adapter.safetensors")(**sdxl_input()).sample
            for r in ("one", "ddp")
        )
    _same_effect(base, a, b, "ddp")


def test_dreambooth_generates_class_images_once_and_resumes_bit_for_bit(xl, tmp_path):
    recipe = _recipe(xl, checkpoint_every=2, keep_checkpoints=3, max_steps=4)
    recipe.data.buckets, recipe.validation.prompts = False, []
    given = tmp_path / "given"
    given.mkdir()
    shutil.copy(xl / "images" / "5-square.png", given / "dog.png")
    recipe.dreambooth = DreamBooth(
        instance_prompt="a photo of zwx dog",
        class_prompt="a photo of a dog",
        class_root=str(given),
        num_class_images=3,
        prior_loss_weight=0.5,
        class_steps=2,
    )
    out = tmp_path / "run"
    metrics = run_recipe(recipe, output=out, progress=False)
    made = sorted((out / "class-images").iterdir())
    assert [p.name for p in made] == ["00000.png", "00001.png"]  # 3 wanted, 1 given
    for png in made:
        with Image.open(png) as image:
            assert image.size == (32, 32)
    assert metrics["images"] == 7 and metrics["class_images"] == 3
    stamps = [p.stat().st_mtime_ns for p in made]
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "class-images", resumed / "class-images")
    shutil.copytree(out / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    run_recipe(recipe, output=resumed, resume="latest", progress=False)
    assert [p.stat().st_mtime_ns for p in sorted((resumed / "class-images").iterdir())] == stamps
    a, b = load_file(out / "adapter.safetensors"), load_file(resumed / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_single_file_sdxl_base_trains_what_its_folder_does_and_merges_into_one_sgm_checkpoint(xl, tmp_path):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(xl / "pipe"))
    checkpoint = vl.export_merged(pipe.unet, tmp_path / "xl-tiny.safetensors", pipeline=pipe)  # original layout
    keys = set(load_file(checkpoint))
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys  # OpenCLIP's fused qkv
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # SDXL's size/crop embedding
    assert "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight" in keys
    configs = tmp_path / "configs"  # what from_single_file needs beside the file: configs and tokenizers only
    shutil.copytree(xl / "pipe", configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    loaded = diffusers.StableDiffusionXLPipeline.from_single_file(
        str(checkpoint), config=str(configs), local_files_only=True
    )
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(loaded, name).state_dict(), getattr(pipe, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    recipe = _recipe(xl, max_steps=2)
    recipe.validation.prompts = []
    single = copy.deepcopy(recipe)
    single.model.pipeline, single.model.config = str(checkpoint), str(configs)
    run_recipe(recipe, output=tmp_path / "folder", progress=False)
    run_recipe(single, output=tmp_path / "single", progress=False)
    # Same weights, but loaded to other memory alignments: BLAS rounds the pooled text embedding 1 ulp
    # apart (1.8e-7), which Adam carries into near-zero LoRA entries; the adapters' effects are compared.
    from tests.train.test_diffusion import _same_effect

    unet = diffusers.UNet2DConditionModel.from_pretrained(xl / "pipe" / "unet").eval()
    with torch.no_grad():
        effects = [
            vl.load_adapter(copy.deepcopy(unet), tmp_path / r / "adapter.safetensors")(**sdxl_input()).sample
            for r in ("folder", "single")
        ]
        _same_effect(unet(**sdxl_input()).sample, *effects, "single file")
    merged = diffusers.StableDiffusionXLPipeline.from_single_file(
        str(tmp_path / "single" / "merged.safetensors"), config=str(configs), local_files_only=True
    )
    expected = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "folder" / "merged"))
    for name in ("vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(merged, name).state_dict(), getattr(expected, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # The merged single file holds the single-file run's merged UNet: its base plus its own adapter.
    own = vl.load_adapter(copy.deepcopy(unet), tmp_path / "single" / "adapter.safetensors")
    with torch.no_grad():
        assert torch.allclose(merged.unet(**sdxl_input()).sample, own(**sdxl_input()).sample, rtol=1e-5, atol=1e-5)
    query = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(merged.unet.state_dict()[query], pipe.unet.state_dict()[query])  # the adapter is in


@pytest.mark.parametrize("name", ["sdxl-style.yaml", "dreambooth-sdxl.yaml"])
def test_the_shipped_sdxl_recipes_run_on_a_tiny_pipeline(xl, name, tmp_path):
    from tests.train.conftest import run_shipped_recipe

    run_shipped_recipe(name, xl / "pipe", xl / "images", tmp_path / "run", 32, "data.batch_size=2")


def test_held_out_images_give_a_validation_loss_and_the_best_adapter_is_kept_and_resumed(xl, tmp_path):
    recipe = _recipe(xl, max_steps=5, checkpoint_every=1, keep_checkpoints=6, lr=1e-1)
    recipe.data.val_fraction, recipe.validation.every, recipe.validation.prompts = 0.3, 1, []
    out = tmp_path / "run"
    metrics = run_recipe(recipe, output=out, progress=False)
    assert metrics["val_images"] == 2 and metrics["images"] == 5  # 30 % of 7, held out of training
    steps = [s for s, _ in metrics["val_losses"]]
    assert steps == [1, 2, 3, 4, 5]
    best_step, best = min(metrics["val_losses"], key=lambda sv: sv[1])
    assert (metrics["best_step"], metrics["best_val_loss"]) == (best_step, best)
    # best/ holds the adapter as it was at the best validation: the trained tensors of that step's checkpoint.
    last = best_step == steps[-1]  # the final adapter, or a checkpoint's trained tensors
    trained = load_file(
        out / "adapter.safetensors" if last else out / "checkpoints" / f"step-{best_step:06d}" / "trainable.safetensors"
    )
    kept = load_file(out / "best" / "adapter.safetensors")
    if not last:  # checkpoint names: unet.<module>.adapters.default.lora_A
        trained = {
            k.removeprefix("unet.").replace(".adapters.default.lora_", ".lora_") + ".weight": v
            for k, v in trained.items()
            if k.startswith("unet.")
        }
    lora = {k: v for k, v in kept.items() if "lora_" in k}
    assert lora and all(torch.equal(v, trained[k]) for k, v in lora.items())
    assert best_step == 4  # lr 0.1: the loss went down and up again, and the last step is not the best
    assert (out / "best" / "merged" / "model_index.json").is_file()
    assert (out / "report" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # The same held-out noise and timesteps every time: a resumed run logs the same losses, keeps the same best.
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    again = run_recipe(recipe, output=resumed, resume="latest", progress=False)
    assert again["val_losses"] == metrics["val_losses"]
    b = load_file(resumed / "best" / "adapter.safetensors")
    assert all(torch.equal(kept[k], b[k]) for k in kept)


def test_buckets_train_an_sd1_pipeline_too(xl, tmp_path, capsys):
    from tests.conftest import tiny_pipeline, tiny_unet

    recipe = _recipe(xl, max_steps=3)
    recipe.model.pipeline = str(tiny_pipeline(tmp_path / "sd1", tiny_unet()))
    recipe.validation.prompts = []
    metrics = run_recipe(recipe, output=tmp_path / "run", progress=False)
    assert "40x24: 3 image(s)" in capsys.readouterr().out
    assert metrics["steps"] == 3 and all(torch.isfinite(torch.tensor(metrics["losses"])))
    assert vl.read_adapter(tmp_path / "run" / "adapter.safetensors").layers
