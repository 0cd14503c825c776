"""The diffusion style recipe on a tiny local pipeline: outputs, resume, loss math, captions."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import visionlora as vl
from tests.conftest import tiny_pipeline, tiny_unet, unet_input
from visionlora.train import run_recipe
from visionlora.train.diffusion_data import style_items
from visionlora.train.diffusion_loss import min_snr_weights, noise_target
from visionlora.train.recipe import parse_recipe

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def style(tmp_path_factory):
    """A tiny pipeline and six 64x64 crops of scikit-learn's bundled china.jpg, one with its own caption."""
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("style")
    tiny_pipeline(root / "pipe", tiny_unet())
    china = load_sample_images().images[0]
    for i in range(6):
        Image.fromarray(china[i * 40 : i * 40 + 64, i * 50 : i * 50 + 64]).save(root / f"img{i}.png")
    (root / "img0.txt").write_text("a photo in zz style")
    return root


def _recipe(root, **train):
    return parse_recipe(
        {
            "task": "diffusion-style",
            "model": {"pipeline": str(root / "pipe")},
            "data": {"root": str(root), "caption": "zz style", "resolution": 16, "batch_size": 2},
            "lora": {"targets": ["preset:unet-attention"], "rank": 4, "alpha": 4},
            "train": {"epochs": 2, "lr": 1e-3, "seed": 0, **train},
            "validation": {"prompts": ["a cat", "a dog"], "steps": 2},
        }
    )


def test_a_style_run_writes_adapter_exports_merged_pipeline_samples_and_metrics(style, tmp_path):
    out = tmp_path / "run"
    metrics = run_recipe(_recipe(style), output=out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter-diffusers.safetensors",
        "adapter-kohya.safetensors",
        "adapter.safetensors",
        "merged",
        "metrics.json",
        "recipe.yaml",
        "report",
    ]
    assert metrics["steps"] == 6 and metrics["images"] == 6 and len(metrics["losses"]) == 6
    with Image.open(out / "report" / "samples.png") as grid:
        assert grid.size == (2 * 16, 2 * 16)  # base | adapted, one row per prompt
    assert (out / "report" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    merged = diffusers.DiffusionPipeline.from_pretrained(str(out / "merged"))
    adapted = vl.load_adapter(
        diffusers.UNet2DConditionModel.from_pretrained(style / "pipe" / "unet"), out / "adapter.safetensors"
    )
    with torch.no_grad():
        expected = adapted.eval()(**unet_input()).sample
        assert torch.allclose(merged.unet(**unet_input()).sample, expected, rtol=1e-5, atol=1e-5)
        base = diffusers.UNet2DConditionModel.from_pretrained(style / "pipe" / "unet")(**unet_input()).sample
    assert (expected - base).abs().max() > 1e-4  # training moved the UNet


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(style, tmp_path):
    recipe = _recipe(style, checkpoint_every=2, keep_checkpoints=3)
    run_recipe(recipe, output=tmp_path / "whole", progress=False)
    expected = load_file(tmp_path / "whole" / "adapter.safetensors")
    for step in ("step-000002", "step-000004"):
        resumed = tmp_path / step
        shutil.copytree(tmp_path / "whole" / "checkpoints" / step, resumed / "checkpoints" / step)
        metrics = run_recipe(recipe, output=resumed, resume="latest", progress=False)
        got = load_file(resumed / "adapter.safetensors")
        assert all(torch.equal(got[k], expected[k]) for k in expected), step
        assert metrics["steps"] == 6


def test_min_snr_weights_are_the_textbook_formula():
    alphas = torch.tensor([0.99, 0.5, 0.01])  # SNR 99, 1, 1/99
    t = torch.tensor([0, 1, 2])
    eps = min_snr_weights(alphas, t, gamma=5.0, v_prediction=False)
    v = min_snr_weights(alphas, t, gamma=5.0, v_prediction=True)
    assert torch.allclose(eps, torch.tensor([5 / 99, 1.0, 1.0]))
    assert torch.allclose(v, torch.tensor([5 / 100, 0.5, (1 / 99) / (1 / 99 + 1)]))


def test_the_target_follows_the_schedulers_prediction_type():
    scheduler = diffusers.DDPMScheduler(prediction_type="v_prediction")
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(noise_target(scheduler, latents, noise, t), a.sqrt() * noise - (1 - a).sqrt() * latents)
    assert noise_target(diffusers.DDPMScheduler(), latents, noise, t) is noise
    with pytest.raises(vl.ConfigError, match="prediction_type 'sample'"):
        noise_target(diffusers.DDPMScheduler(prediction_type="sample"), latents, noise, t)


def test_captions_come_from_txt_files_else_the_recipe_and_missing_ones_are_named(style, tmp_path):
    items = {item.path.name: item.caption for item in style_items(style, "zz style")}
    assert items["img0.png"] == "a photo in zz style" and items["img3.png"] == "zz style"
    with pytest.raises(vl.ConfigError, match=r"data.caption: img1.png has no img1.txt"):
        style_items(style, None)
    with pytest.raises(vl.ConfigError, match="holds no images"):
        style_items(tmp_path, "x")


@pytest.mark.parametrize("name", ["diffusion-style.yaml", "dreambooth-sd15.yaml"])
def test_the_shipped_sd1_recipes_run_on_a_tiny_pipeline(style, name, tmp_path):
    from tests.train.conftest import run_shipped_recipe

    run_shipped_recipe(name, style / "pipe", style, tmp_path / "run", 16, "data.batch_size=2")


def test_uncached_encoding_trains_the_same_adapter_as_cached(style, tmp_path):
    a, b = _recipe(style, max_steps=3), _recipe(style, max_steps=3)
    a.data.center_crop, a.data.cache = False, True
    b.data.center_crop, b.data.cache = False, False
    run_recipe(a, output=tmp_path / "cached", progress=False)
    run_recipe(b, output=tmp_path / "uncached", progress=False)
    x, y = (
        load_file(tmp_path / "cached" / "adapter.safetensors"),
        load_file(tmp_path / "uncached" / "adapter.safetensors"),
    )
    assert all(torch.allclose(x[k], y[k], atol=1e-6) for k in x)


def test_trainable_modules_train_in_the_style_recipe_and_the_cli_summarises(style, tmp_path, capsys):
    from visionlora.cli import main
    from visionlora.train import dump_recipe, load_recipe

    recipe = _recipe(style, max_steps=2, head_lr=1e-2)
    recipe.lora.trainable = ["conv_in"]
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(recipe))
    with pytest.raises(vl.ConfigError, match=r"output.export: .* expected formats that can hold lora.trainable"):
        load_recipe(path)
    path.write_text(dump_recipe(recipe).replace("  - diffusers\n  - kohya\n", "  - peft\n"))
    assert main(["train", str(path), "--output", str(tmp_path / "run")]) == 0
    assert "2 steps, loss " in capsys.readouterr().out
    before = diffusers.UNet2DConditionModel.from_pretrained(style / "pipe" / "unet").conv_in.weight
    after = load_file(tmp_path / "run" / "adapter.safetensors")["conv_in.weight"]
    assert (after - before).abs().max() > 0


def _launch(tmp_path: Path, runs: dict[str, tuple[str, Path]], *extra: str) -> None:
    """Train each recipe file as named: ``one`` process, 2 under ``ddp``, 2 under ``fsdp`` (CPU, see fsdp_cpu.py)."""
    import json
    import os
    import sys

    from tests.train.conftest import side_by_side, torchrun

    env = {**os.environ, "OMP_NUM_THREADS": "1", "VISIONLORA_TEST_FSDP_WRAP": "BasicTransformerBlock"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])
    start = {
        "one": [sys.executable, "-m", "visionlora"],
        "ddp": [*torchrun(2), "-m", "visionlora"],
        "fsdp": [*torchrun(2), str(Path(__file__).with_name("fsdp_cpu.py"))],
    }
    argvs = [
        [*start[how], "train", str(recipe), "--output", str(tmp_path / name), *extra]
        for name, (how, recipe) in runs.items()
    ]
    for (name, (how, _)), done in zip(runs.items(), side_by_side(argvs, env), strict=True):
        assert done.returncode == 0, done.stderr[-3000:]
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["processes"] == (1 if how == "one" else 2)
        assert metrics["distributed"] == {"one": "NO", "ddp": "MULTI_CPU", "fsdp": "FSDP"}[how]


def _same_effect(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """Two adapters trained on the same global batch, noise and timesteps, with float sums in another
    order: Adam turns that into ~1e-3 relative differences in near-zero LoRA entries, so their effects
    on the outputs are compared."""
    relative = float((a - b).abs().max() / (a - base).abs().max())
    print(name, "relative difference of the adapters' effect", relative)
    assert relative <= 1e-3, name


def test_two_fsdp_processes_train_the_unet_and_text_encoder_adapters_of_one(style, tmp_path):
    """(DDP for the same task is tested on SDXL and Flux, test_sdxl.py and test_dit_training.py.)"""
    transformers = pytest.importorskip("transformers")
    from visionlora.train import dump_recipe

    path, sampled = tmp_path / "r.yaml", tmp_path / "sampled.yaml"
    # 3 batches of 2 per epoch, accumulated in groups of 2 and 1: gradients stay local between steps.
    # Gradients are ~0.03: every step is clipped, so the processes must agree on the whole norm.
    recipe = _recipe(style, max_steps=3, max_grad_norm=1e-3, grad_accum=2, checkpoint_every=1, keep_checkpoints=3)
    recipe.data.batch_size, recipe.validation.prompts = 2, []
    recipe.text_encoder_lora = vl.LoraConfig(targets=["*.self_attn.q_proj", "*.self_attn.v_proj"], rank=2, alpha=4)
    path.write_text(dump_recipe(recipe))
    recipe.validation.prompts, recipe.validation.every = ["a cat"], 2  # under FSDP every process samples
    sampled.write_text(dump_recipe(recipe))
    _launch(tmp_path, {"one": ("one", path), "fsdp": ("fsdp", sampled)})
    for png in ("samples-step000002.png", "samples.png"):
        assert (tmp_path / "fsdp" / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A one-process checkpoint resumes under FSDP (same optimizer groups, whole tensors).
    step = Path("checkpoints") / "step-000001"
    shutil.copytree(tmp_path / "one" / step, tmp_path / "resumed" / step)
    resumed = tmp_path / "resumed.yaml"
    resumed.write_text(path.read_text())
    _launch(tmp_path, {"resumed": ("fsdp", resumed)}, "--resume", "latest")
    unet = diffusers.UNet2DConditionModel.from_pretrained(style / "pipe" / "unet").eval()
    text = transformers.CLIPTextModel.from_pretrained(style / "pipe" / "text_encoder").eval()
    ids = torch.tensor([[0, 5, 9, 1]])
    with torch.no_grad():
        for run in ("fsdp", "resumed"):
            unets = [vl.load_adapter(copy.deepcopy(unet), tmp_path / r / "adapter.safetensors") for r in ("one", run)]
            _same_effect(unet(**unet_input()).sample, *(u(**unet_input()).sample for u in unets), f"{run} unet")
            texts = [
                vl.load_adapter(copy.deepcopy(text), tmp_path / r / "adapter-text-encoder.safetensors").eval()
                for r in ("one", run)
            ]
            _same_effect(text(ids)[0], *(t(ids)[0] for t in texts), f"{run} text encoder")
            merged = transformers.CLIPTextModel.from_pretrained(tmp_path / run / "merged" / "text_encoder").eval()
            assert torch.allclose(merged(ids)[0], texts[1](ids)[0], rtol=1e-5, atol=1e-6)
            merged_unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / run / "merged" / "unet").eval()
            b = unets[1](**unet_input()).sample
            assert (merged_unet(**unet_input()).sample - b).abs().max() <= 1e-4 * b.abs().max(), run


def test_text_encoder_lora_under_fsdp_in_fp16_is_refused_by_name_before_training(style, tmp_path, monkeypatch):
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    import visionlora.train.loop as loop

    made = loop.make_accelerator

    class FSDPAccelerator:  # what accelerate launch --use_fsdp --fsdp_version 2 --mixed_precision fp16 gives
        distributed_type, mixed_precision = DistributedType.FSDP, "fp16"

        def __init__(self, *args: object) -> None:
            self.real = made(*args)
            self.state = type("State", (), {"fsdp_plugin": FullyShardedDataParallelPlugin(fsdp_version=2)})()

        def __getattr__(self, name: str) -> object:
            return getattr(self.real, name)

    monkeypatch.setattr(loop, "make_accelerator", FSDPAccelerator)
    recipe = _recipe(style, max_steps=1)
    recipe.text_encoder_lora = vl.LoraConfig(targets=["*.self_attn.q_proj"], rank=2)
    message = r"fp16 .* cannot train the text_encoder adapter \(text_encoder_lora\) beside the sharded unet under FSDP"
    with pytest.raises(vl.ConfigError, match=message):
        run_recipe(recipe, output=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_text_encoder_lora_trains_is_saved_merged_into_the_pipeline_and_resumes(style, tmp_path):
    transformers = pytest.importorskip("transformers")

    recipe = _recipe(style, checkpoint_every=2, keep_checkpoints=3)
    recipe.text_encoder_lora = vl.LoraConfig(targets=["*.self_attn.q_proj", "*.self_attn.v_proj"], rank=2, alpha=4)
    out = tmp_path / "run"
    run_recipe(recipe, output=out, progress=False)
    te_file = vl.read_adapter(out / "adapter-text-encoder.safetensors")
    names = [n for n, _ in transformers.CLIPTextModel.from_pretrained(style / "pipe" / "text_encoder").named_modules()]
    assert set(te_file.layers) == {n for n in names if n.endswith(("self_attn.q_proj", "self_attn.v_proj"))}
    assert len(te_file.layers) == 2
    assert all(te_file.tensors[f"{n}.lora_B.weight"].abs().max() > 0 for n in te_file.layers)  # B starts at 0
    # The merged pipeline holds the merged text encoder: the base one plus its adapter.
    base = transformers.CLIPTextModel.from_pretrained(style / "pipe" / "text_encoder").eval()
    merged = transformers.CLIPTextModel.from_pretrained(out / "merged" / "text_encoder").eval()
    adapted = vl.load_adapter(transformers.CLIPTextModel.from_pretrained(style / "pipe" / "text_encoder"), te_file.path)
    ids = torch.tensor([[0, 5, 9, 1]])
    with torch.no_grad():
        expected = adapted.eval()(ids)[0]
        assert torch.allclose(merged(ids)[0], expected, rtol=1e-5, atol=1e-6)
        assert (expected - base(ids)[0]).abs().max() > 0
    # The diffusers and kohya exports carry the text encoder's adapter beside the UNet's.
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(style / "pipe"))
    pipe.load_lora_weights(str(out / "adapter-diffusers.safetensors"))
    kohya = vl.load_adapter(
        transformers.CLIPTextModel.from_pretrained(style / "pipe" / "text_encoder"),
        out / "adapter-kohya.safetensors",
        component="text_encoder",
    )
    with torch.no_grad():
        assert torch.allclose(pipe.text_encoder(ids)[0], expected, rtol=1e-5, atol=1e-6)
        assert torch.allclose(kohya.eval()(ids)[0], expected, rtol=1e-5, atol=1e-6)
    # Resume: both adapters come back bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step-000004", resumed / "checkpoints" / "step-000004")
    run_recipe(recipe, output=resumed, resume="latest", progress=False)
    for name in ("adapter.safetensors", "adapter-text-encoder.safetensors"):
        a, b = load_file(out / name), load_file(resumed / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_single_file_checkpoint_base_trains_the_adapter_of_its_pipeline_folder(style, tmp_path):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(style / "pipe"))
    checkpoint = vl.export_merged(pipe.unet, tmp_path / "sd-tiny.safetensors", pipeline=pipe)  # original layout
    configs = tmp_path / "configs"  # what from_single_file needs beside the file: configs and tokenizer only
    shutil.copytree(style / "pipe", configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    recipe = _recipe(style, max_steps=2)
    single = copy.deepcopy(recipe)
    single.model.pipeline, single.model.config = str(checkpoint), str(configs)
    run_recipe(recipe, output=tmp_path / "folder", progress=False)
    run_recipe(single, output=tmp_path / "single", progress=False)
    a = load_file(tmp_path / "folder" / "adapter.safetensors")
    b = load_file(tmp_path / "single" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The merged checkpoint is one file in the base's layout, and holds what the folder run's merged pipeline holds.
    merged = diffusers.StableDiffusionPipeline.from_single_file(
        str(tmp_path / "single" / "merged.safetensors"), config=str(configs), local_files_only=True
    )
    expected = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "folder" / "merged"))
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(merged, name).state_dict(), getattr(expected, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    query = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(merged.unet.state_dict()[query], pipe.unet.state_dict()[query])  # the adapter is in

    single.model.config = None
    with pytest.raises(vl.ConfigError, match=r"model\.config: a single-file checkpoint needs a local pipeline folder"):
        run_recipe(single, output=tmp_path / "no-config", progress=False)


def test_nan_steps_are_skipped_and_too_many_in_a_row_stop_the_run_at_its_last_checkpoint(style, tmp_path):
    from tests.reliability.harness import poisoned
    from visionlora.train.checkpoint import latest_checkpoint

    recipe = _recipe(style, checkpoint_every=1, max_nonfinite_steps=2)
    stop = r"2 optimizer steps in a row .* since step 3 .*checkpoints.step-000002"
    with pytest.raises(vl.TrainingError, match=stop), poisoned(lambda i: i == 1 or i >= 3) as hit:
        run_recipe(recipe, output=tmp_path / "run", progress=False)
    assert hit == [1, 3, 4]  # one isolated NaN step (skipped), then two in a row
    trained = load_file(latest_checkpoint(tmp_path / "run") / "trainable.safetensors")
    assert trained and all(torch.isfinite(v).all() for v in trained.values() if v.is_floating_point())


def test_dreambooth_on_sd1_captions_every_instance_image_with_the_prompt_and_generates_its_class(style, tmp_path):
    from visionlora.train.diffusion import StyleTask
    from visionlora.train.recipe import DreamBooth

    recipe = _recipe(style, max_steps=2)
    recipe.validation.prompts = []
    recipe.dreambooth = DreamBooth(
        instance_prompt="a photo of zwx", class_prompt="a photo", num_class_images=2, class_steps=2
    )
    out = tmp_path / "run"
    metrics = run_recipe(recipe, output=out, progress=False)
    assert sorted(p.name for p in (out / "class-images").iterdir()) == ["00000.png", "00001.png"]
    assert metrics["images"] == 6 and metrics["class_images"] == 2 and metrics["steps"] == 2

    class Probe(StyleTask):  # the items a run trains on, without training
        def build(self, accelerator):
            super().build(accelerator)
            raise SystemExit([(i.caption, i.prior) for i in self.items])

    from visionlora.train.loop import run_loop

    with pytest.raises(SystemExit) as stop:
        run_loop(Probe(recipe), output=tmp_path / "probe", progress=False)
    items = stop.value.args[0]
    assert items[:6] == [("a photo of zwx", False)] * 6  # img0.txt is not read
    assert items[6:] == [("a photo", True)] * 2


@pytest.mark.parametrize("family", ["loha", "dora"])
def test_a_style_run_trains_loha_and_dora_and_its_merged_pipeline_and_exports_match(style, family, tmp_path):
    recipe = _recipe(style, max_steps=2)
    recipe.lora.family = family
    recipe.validation.prompts = []
    recipe.output.export = ["kohya"] if family == "loha" else ["diffusers", "kohya"]
    run_recipe(recipe, output=tmp_path / "run", progress=False)
    unet = diffusers.UNet2DConditionModel.from_pretrained(style / "pipe" / "unet").eval()
    adapted = vl.load_adapter(copy.deepcopy(unet), tmp_path / "run" / "adapter.safetensors")
    assert {m.adapter("default").family for m in adapted.modules() if isinstance(m, vl.LoraLayer)} == {family}
    merged = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "run" / "merged" / "unet").eval()
    with torch.no_grad():
        expected = adapted(**unet_input()).sample
        assert (expected - unet(**unet_input()).sample).abs().max() > 0  # it trained
        assert (merged(**unet_input()).sample - expected).abs().max() <= 1e-4 * expected.abs().max()
        for name in recipe.output.export:
            path = tmp_path / "run" / f"adapter-{name}.safetensors"
            again = vl.load_adapter(copy.deepcopy(unet), path)(**unet_input()).sample
            assert (again - expected).abs().max() <= 1e-5 * expected.abs().max(), name


def test_a_style_run_on_an_nf4_unet_merges_the_dequantized_weights(style, tmp_path, one_bnb_cpu_kernel):
    recipe = _recipe(style, max_steps=2)
    recipe.model.quantize = "nf4"
    recipe.validation.prompts = []
    run_recipe(recipe, output=tmp_path / "run", progress=False)
    unet = diffusers.UNet2DConditionModel.from_pretrained(style / "pipe" / "unet").eval()
    vl.quantize_base(unet, 4, backend="bitsandbytes")  # packs the same weights as the run did
    assert {type(unet.get_submodule(n)).__name__ for n in ("conv_in", "time_embedding.linear_1")} == {
        "Int8Conv2d",
        "Linear4bit",
    }
    vl.load_adapter(unet, tmp_path / "run" / "adapter.safetensors")
    merged = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "run" / "merged" / "unet").eval()
    with torch.no_grad():
        expected = unet(**unet_input()).sample
        assert (merged(**unet_input()).sample - expected).abs().max() <= 1e-4 * expected.abs().max()
