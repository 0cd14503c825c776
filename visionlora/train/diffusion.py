"""The diffusion style recipe: LoRA on a Stable Diffusion UNet from captioned style images.

Noise-prediction loss (epsilon or v-prediction, as the scheduler is configured) with optional
min-SNR weighting; latents and caption embeddings are encoded once when ``data.cache`` is on
(the VAE and text encoder are frozen). At the end: the adapter, diffusers and kohya exports, a
merged pipeline folder, fixed-seed sample grids (base | adapted) and the loss curve.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionlora._deps import require
from visionlora.adapters import disable_adapters, enable_adapters
from visionlora.errors import ConfigError
from visionlora.inject import apply_lora
from visionlora.io import PIPELINE_FORMATS, export_adapter, export_merged, save_adapter
from visionlora.io.files import write_text
from visionlora.models.loading import example_input_for
from visionlora.train.data import EpochBatches, mix_seed
from visionlora.train.loop import (
    NonFiniteSteps,
    accumulation,
    checkpoint_due,
    cosine_with_warmup,
    log_step,
    make_accelerator,
    optimizer_step,
    param_groups,
    restore,
    start_run,
    total_steps,
    write_checkpoint,
)
from visionlora.train.recipe import DiffusionModel, DiffusionRecipe
from visionlora.train.report import plot_losses
from visionlora.train.sharding import check_fsdp, is_fsdp, keep_whole, whole_model

__all__ = ["load_pipeline", "min_snr_weights", "noise_target", "run_diffusion", "style_items"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_pipeline(spec: DiffusionModel) -> Any:
    """A StableDiffusionPipeline from a pipeline folder, or from one ``.safetensors`` file with local configs."""
    diffusers = require("diffusers")
    path = Path(spec.pipeline)
    common = {"safety_checker": None, "requires_safety_checker": False}
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ConfigError(f"model.pipeline: {path} has no model_index.json; give a diffusers pipeline folder")
        return diffusers.StableDiffusionPipeline.from_pretrained(str(path), **common)
    if path.suffix == ".safetensors" and path.is_file():
        if spec.config is None:
            raise ConfigError(
                "model.config: a single-file checkpoint needs a local pipeline folder with its configs "
                "(nothing is downloaded)"
            )
        return diffusers.StableDiffusionPipeline.from_single_file(
            str(path), config=spec.config, local_files_only=True, **common
        )
    raise ConfigError(
        f"model.pipeline: {path} is neither a diffusers pipeline folder nor a .safetensors checkpoint "
        "(.ckpt files are pickles and are not read)"
    )


def style_items(root: str | Path, caption: str | None) -> list[tuple[Path, str]]:
    """(image, caption) pairs: the ``.txt`` beside each image, else ``caption``."""
    folder = Path(root)
    if not folder.is_dir():
        raise ConfigError(f"data.root: {folder} is not a folder of style images")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ConfigError(f"data.root: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    items = []
    for image in images:
        text_file = image.with_suffix(".txt")
        text = text_file.read_text(encoding="utf-8").strip() if text_file.is_file() else caption
        if text is None:
            raise ConfigError(f"data.caption: {image.name} has no {text_file.name}; add one or set data.caption")
        items.append((image, text))
    return items


def _pixels(path: Path, resolution: int, center_crop: bool, flip: bool, seed: int) -> torch.Tensor:
    """The image at ``resolution`` x ``resolution`` in [-1, 1]: shorter side resized, cropped, maybe flipped."""
    Image = require("PIL.Image")
    TF = require("torchvision.transforms.functional")
    with Image.open(path) as im:
        image = im.convert("RGB")
    image = TF.resize(image, resolution, antialias=True)
    w, h = image.size
    if center_crop:
        top, left = (h - resolution) // 2, (w - resolution) // 2
    else:
        g = torch.Generator().manual_seed(seed)
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=g))
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=g))
    image = TF.crop(image, top, left, resolution, resolution)
    if flip:
        image = TF.hflip(image)
    return TF.to_tensor(image) * 2 - 1


def min_snr_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, v_prediction: bool
) -> torch.Tensor:
    """Per-sample loss weights min(SNR, gamma) / SNR (epsilon) or min(SNR, gamma) / (SNR + 1) (v-prediction)."""
    alpha = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha / (1 - alpha)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if v_prediction else clipped / snr


def noise_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon), or v = sqrt(a)·noise - sqrt(1 - a)·latents."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ConfigError(f"scheduler prediction_type {kind!r}: the style recipe trains 'epsilon' or 'v_prediction'")


@dataclass
class _Encoded:
    """What the frozen encoders give: the latent distribution (mean, std) per image, the caption embedding."""

    mean: torch.Tensor  # (N, C, h, w)
    std: torch.Tensor
    ids: torch.Tensor  # (N, tokens): the captions' token ids
    text: torch.Tensor | None  # (N, tokens, dim): their embeddings, while the text encoder is frozen


@torch.no_grad()
def _encode(
    pipe: Any, items: list[tuple[Path, str]], indices: list[int], flips: list[bool], recipe: DiffusionRecipe
) -> _Encoded:
    """Encode images ``indices`` of ``items`` (each flipped or not); crops are fixed per dataset index."""
    data, device = recipe.data, pipe.vae.device
    means, stds = [], []
    for index, flip in zip(indices, flips, strict=True):
        path = items[index][0]
        pixels = _pixels(path, data.resolution, data.center_crop, flip, mix_seed(recipe.train.seed, index))
        dist = pipe.vae.encode(pixels[None].to(device, pipe.vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    captions = [items[i][1] for i in indices]
    ids = pipe.tokenizer(
        captions, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    text = None
    if recipe.text_encoder_lora is None:
        text = pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].float().cpu()
    return _Encoded(torch.cat(means), torch.cat(stds), ids, text)


class _Cache:
    """Every image encoded once, unflipped and (with ``random_flip``) flipped."""

    def __init__(self, pipe: Any, items: list[tuple[Path, str]], recipe: DiffusionRecipe) -> None:
        everything = list(range(len(items)))
        self.plain = _encode(pipe, items, everything, [False] * len(items), recipe)
        flipped = recipe.data.random_flip
        self.flipped = _encode(pipe, items, everything, [True] * len(items), recipe) if flipped else self.plain

    def get(self, indices: list[int], flips: list[bool]) -> _Encoded:
        rows = [(self.flipped if f else self.plain, i) for i, f in zip(indices, flips, strict=True)]
        texts = [e.text[i] for e, i in rows if e.text is not None]
        return _Encoded(
            torch.stack([e.mean[i] for e, i in rows]),
            torch.stack([e.std[i] for e, i in rows]),
            torch.stack([e.ids[i] for e, i in rows]),
            torch.stack(texts) if texts else None,
        )


def _flips(seed: int, epoch: int, indices: list[int], random_flip: bool) -> list[bool]:
    """Whether each image is flipped this epoch: fixed by (seed, epoch, index), independent of the global RNG."""
    if not random_flip:
        return [False] * len(indices)
    return [
        bool(torch.randint(0, 2, (1,), generator=torch.Generator().manual_seed(mix_seed(seed, epoch, i))))
        for i in indices
    ]


def _sample_grid(
    pipe: Any, adapted: list[nn.Module], recipe: DiffusionRecipe, path: Path, write: bool = True
) -> Path | None:
    """Base | adapted samples from the same seeds, one row per prompt, saved as a PNG (if ``write``)."""
    Image = require("PIL.Image")
    val = recipe.validation
    if not val.prompts:
        return None
    pipe.set_progress_bar_config(disable=True)
    rows = []
    with torch.random.fork_rng(devices=[]):  # sampling must not move the training RNG
        for prompt in val.prompts:
            row = []
            for on in (False, True):
                for part in adapted:
                    (enable_adapters if on else disable_adapters)(part)
                generator = torch.Generator(device="cpu").manual_seed(val.seed)
                image = pipe(
                    prompt,
                    num_inference_steps=val.steps,
                    guidance_scale=val.guidance_scale,
                    height=recipe.data.resolution,
                    width=recipe.data.resolution,
                    generator=generator,
                ).images[0]
                row.append(image)
            rows.append(row)
    for part in adapted:
        enable_adapters(part)
    if not write:
        return None
    size = rows[0][0].size
    grid = Image.new("RGB", (size[0] * 2, size[1] * len(rows)))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (c * size[0], r * size[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def run_diffusion(
    recipe: DiffusionRecipe, *, output: str | Path | None = None, resume: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train ``recipe``; write adapter, exports, merged pipeline, metrics.json, recipe.yaml and report/."""
    out_dir = Path(output or recipe.output.dir)
    train, data = recipe.train, recipe.data
    accelerator = make_accelerator(train, out_dir)
    require("accelerate.utils").set_seed(train.seed)
    world = accelerator.num_processes
    if data.batch_size % world:
        raise ConfigError(f"data.batch_size: {data.batch_size} does not split over {world} processes")
    items = style_items(data.root, data.caption)
    pipe = load_pipeline(recipe.model)
    unet, device = pipe.unet, accelerator.device
    for frozen in (pipe.vae, pipe.text_encoder):
        frozen.requires_grad_(False)
        frozen.to(device)
    probe = recipe.lora.rank_by_resolution or recipe.lora.rank_budget is not None
    latent_size = data.resolution // pipe.vae_scale_factor
    apply_lora(unet, recipe.lora, example_input=example_input_for(unet, latent_size) if probe else None)
    text_encoder = pipe.text_encoder
    adapted: list[nn.Module] = [unet]
    if recipe.text_encoder_lora is not None:
        apply_lora(text_encoder, recipe.text_encoder_lora)
        adapted.append(text_encoder)
    trained = nn.ModuleDict({"unet": unet, "text_encoder": text_encoder}) if len(adapted) > 1 else unet
    if train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if world > 1 and len(items) < data.batch_size:
        raise ConfigError(
            f"data.batch_size: {data.batch_size} is more than the {len(items)} images; with {world} processes "
            "every batch must be full (lower the batch size)"
        )
    cache = _Cache(pipe, items, recipe) if data.cache else None
    scheduler_config = pipe.scheduler.config
    noise_scheduler = require("diffusers").DDPMScheduler.from_config(scheduler_config)
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    scaling = float(getattr(pipe.vae.config, "scaling_factor", 1.0))

    batches = EpochBatches(len(items), data.batch_size, train.seed, drop_last=len(items) >= data.batch_size)
    per_epoch = len(batches)
    steps_per_epoch = math.ceil(per_epoch / train.grad_accum)
    total = total_steps(train, steps_per_epoch)
    check_fsdp(accelerator, unet)
    kept = keep_whole(accelerator, unet)
    guard = NonFiniteSteps(train.max_nonfinite_steps, out_dir)
    unet_groups = param_groups(unet, train)
    # The UNet's groups, then the text encoder's, in every mode: a checkpoint resumes in any of them.
    text_groups = param_groups(text_encoder, train) if len(adapted) > 1 else []
    averaged: list[torch.Tensor] = []  # gradients no wrapper syncs, averaged over processes at each step
    if text_groups and is_fsdp(accelerator):
        # accelerate's FSDP2 shards one model per prepare, with an optimizer over that model only. The
        # UNet is sharded; the text encoder (small) stays whole on every process, its adapter's groups
        # join the optimizer afterwards and its gradients are averaged by hand, as DDP would.
        if accelerator.mixed_precision == "fp16":  # the grad scaler cannot unscale sharded and whole at once
            raise ConfigError(
                "train.mixed_precision: fp16 (or auto on a GPU without bf16) cannot train text_encoder_lora under "
                "FSDP; use bf16 or no, train under DDP (accelerate launch without --use_fsdp), or leave "
                "text_encoder_lora out"
            )
        model, optimizer = accelerator.prepare(unet, torch.optim.AdamW(unet_groups))
        for text_group in text_groups:
            optimizer.optimizer.add_param_group(text_group)
        text_model, wrapped = text_encoder, [model]  # wrapped: what accelerate syncs (no_sync applies to)
        averaged = [p for p in text_encoder.parameters() if p.requires_grad]
    elif text_groups:
        optimizer = torch.optim.AdamW([*unet_groups, *text_groups])
        model, text_model, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
        wrapped = [model, text_model]
    else:
        model, optimizer = accelerator.prepare(unet, torch.optim.AdamW(unet_groups))
        text_model, wrapped = None, [model]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, cosine_with_warmup(train.warmup_steps, total))
    # After prepare: FSDP puts new (sharded) parameters in the modules, which are the ones that get gradients.
    trainable = [p for p in trained.parameters() if p.requires_grad]
    step, epoch, start_batch, losses, elapsed = 0, 0, 0, [], 0.0
    if resume is not None:
        state = restore(resume, out_dir, accelerator, trained, optimizer, scheduler)
        step, epoch, start_batch, losses, elapsed = (
            state["step"],
            state["epoch"],
            state["batch"],
            state["losses"],
            state["elapsed"],
        )
    bar = start_run(accelerator, recipe, out_dir, total, step, progress)
    started = time.perf_counter() - elapsed
    alphas_cumprod = noise_scheduler.alphas_cumprod
    rank = accelerator.process_index
    # A sharded UNet runs on every process at once; otherwise the main process samples alone.
    samples_here = accelerator.is_main_process or is_fsdp(accelerator)
    while step < total:
        batches.set_position(epoch, start_batch)
        model.train()
        if text_model is not None:
            text_model.train()
        group: list[torch.Tensor] = []
        for index, batch in enumerate(batches, start=start_batch):
            share = len(batch) // world
            mine = batch[rank * share : (rank + 1) * share]
            flips = _flips(train.seed, epoch, mine, data.random_flip)
            enc = cache.get(mine, flips) if cache is not None else _encode(pipe, items, mine, flips, recipe)
            mean, std = enc.mean.to(device), enc.std.to(device)
            # Every process draws the whole global batch's random numbers (same RNG state everywhere) and
            # takes its share, so N processes train on exactly what one process would.
            whole, own = (len(batch), *mean.shape[1:]), slice(rank * share, (rank + 1) * share)
            latents = (mean + std * torch.randn(whole, device=device)[own]) * scaling
            noise = torch.randn(whole, device=device)[own]
            steps_all = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(batch),), device=device)
            timesteps = steps_all[own]
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            target = noise_target(noise_scheduler, latents, noise, timesteps)
            boundary, group_size = accumulation(index, per_epoch, train.grad_accum)
            with contextlib.ExitStack() as syncing:
                if not boundary:
                    for part in wrapped:
                        syncing.enter_context(accelerator.no_sync(part))
                if text_model is not None:
                    text = text_model(enc.ids.to(device))[0]
                else:
                    assert enc.text is not None
                    text = enc.text.to(device)
                prediction = model(noisy, timesteps, text).sample
                mse = ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))
                if train.min_snr_gamma is not None:
                    mse = mse * min_snr_weights(alphas_cumprod, timesteps, train.min_snr_gamma, v_prediction)
                loss = mse.mean()
                accelerator.backward(loss / group_size)
            group.append(loss.detach())
            if not boundary:
                continue
            step_loss = optimizer_step(
                accelerator, optimizer, scheduler, trainable, train.max_grad_norm, group, guard, step + 1, averaged
            )
            group = []
            if step_loss is None:  # a NaN/Inf loss or gradient: skipped and not counted (see NonFiniteSteps)
                continue
            step += 1
            losses.append(step_loss)
            log_step(accelerator, bar, scheduler, train, step, step_loss)
            if recipe.validation.every and step % recipe.validation.every == 0 and samples_here:
                path = out_dir / "report" / f"samples-step{step:06d}.png"
                _sample_grid(pipe, adapted, recipe, path, write=accelerator.is_main_process)
            if checkpoint_due(train, step, total):
                write_checkpoint(
                    accelerator,
                    out_dir,
                    step,
                    epoch,
                    index + 1,
                    trained,
                    optimizer,
                    scheduler,
                    [],
                    started,
                    train,
                    extra={"losses": losses},
                )
            if step >= total:
                break
        start_batch = 0
        epoch += 1
    bar.close()
    seconds = time.perf_counter() - started
    if samples_here:  # before the outputs: a sharded UNet samples on every process, so before it is gathered
        _sample_grid(pipe, adapted, recipe, out_dir / "report" / "samples.png", write=accelerator.is_main_process)
    adapted = [whole_model(unet, kept), *adapted[1:]]  # the UNet itself unless it is sharded
    return _finish(accelerator, recipe, pipe, adapted, out_dir, losses, seconds, step, len(items))


def _finish(
    accelerator: Any,
    recipe: DiffusionRecipe,
    pipe: Any,
    adapted: list[nn.Module],
    out_dir: Path,
    losses: list[float],
    seconds: float,
    step: int,
    images: int,
) -> dict[str, Any]:
    window = max(1, len(losses) // 10)
    metrics: dict[str, Any] = {
        "steps": step,
        "images": images,
        "loss_first": sum(losses[:window]) / window if losses else None,
        "loss_last": sum(losses[-window:]) / window if losses else None,
        "seconds": seconds,
        "processes": accelerator.num_processes,
        "distributed": str(accelerator.distributed_type.value),  # NO, MULTI_GPU, MULTI_CPU, FSDP, ...
        "losses": losses,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet = adapted[0]
        for part in adapted:
            part.eval()
        # The run holds its folder (see train/lock.py), so it replaces its own earlier outputs.
        save_adapter(unet, out_dir / "adapter.safetensors", overwrite=True)
        others = {"text_encoder": adapted[1]} if len(adapted) > 1 else {}
        if others:
            save_adapter(others["text_encoder"], out_dir / "adapter-text-encoder.safetensors", overwrite=True)
        text = others.get("text_encoder")
        for fmt in recipe.output.export:
            if fmt not in PIPELINE_FORMATS:  # one model per folder or file
                suffix = "" if fmt == "peft" else ".safetensors"
                export_adapter(unet, out_dir / f"adapter-{fmt}{suffix}", format=fmt, overwrite=True)
                if text is not None:
                    export_adapter(text, out_dir / f"adapter-{fmt}-text-encoder{suffix}", format=fmt, overwrite=True)
            else:  # diffusers and kohya files hold the whole pipeline's LoRA
                export_adapter(
                    unet, out_dir / f"adapter-{fmt}.safetensors", format=fmt, text_encoder=text, overwrite=True
                )
        folder = Path(recipe.model.pipeline)
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        merged_dtype = dtypes[recipe.output.merged_dtype]
        if folder.is_dir():
            export_merged(unet, out_dir / "merged", pipeline=folder, dtype=merged_dtype, others=others, overwrite=True)
        else:  # a single-file base gives a single-file checkpoint in the same layout
            export_merged(
                unet, out_dir / "merged.safetensors", pipeline=pipe, dtype=merged_dtype, others=others, overwrite=True
            )
        if losses:
            plot_losses(losses, out_dir / "report" / "loss.png")
        write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1))
    accelerator.wait_for_everyone()
    if recipe.train.log_with:
        accelerator.end_training()
    return metrics
