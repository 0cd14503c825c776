"""The diffusion style task: LoRA on a Stable Diffusion UNet from captioned style images.

Noise-prediction loss (epsilon or v-prediction, as the scheduler is configured) with optional
min-SNR weighting; latents and caption embeddings are encoded once when ``data.cache`` is on
(the VAE and text encoder are frozen). At the end: fixed-seed sample grids (base | adapted), the
loss curve, and a merged pipeline folder (or single file, from a single-file base). It plugs into
:func:`~visionlora.train.loop.run_loop`, which owns the training loop itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from visionlora._deps import require
from visionlora.adapters import disable_adapters, enable_adapters
from visionlora.errors import ConfigError
from visionlora.inject import apply_lora
from visionlora.models.loading import example_input_for
from visionlora.train.data import EpochBatches, mix_seed
from visionlora.train.outputs import Outputs
from visionlora.train.recipe import DiffusionModel, DiffusionRecipe
from visionlora.train.report import plot_losses
from visionlora.train.sharding import is_fsdp
from visionlora.train.task import Built, Prepared, RunState, Task

__all__ = ["StyleTask", "load_pipeline", "min_snr_weights", "noise_target", "style_items"]

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


class StyleTask(Task):
    """Give a diffusion model a style (:class:`~visionlora.train.recipe.DiffusionRecipe`)."""

    recipe: DiffusionRecipe

    def build(self, accelerator: Any) -> Built:
        recipe, data, world = self.recipe, self.recipe.data, accelerator.num_processes
        self.items = style_items(data.root, data.caption)
        self.pipe = pipe = load_pipeline(recipe.model)
        unet, device = pipe.unet, accelerator.device
        for frozen in (pipe.vae, pipe.text_encoder):
            frozen.requires_grad_(False)
            frozen.to(device)
        probe = recipe.lora.rank_by_resolution or recipe.lora.rank_budget is not None
        latent_size = data.resolution // pipe.vae_scale_factor
        apply_lora(unet, recipe.lora, example_input=example_input_for(unet, latent_size) if probe else None)
        parts = {"unet": unet}
        if recipe.text_encoder_lora is not None:
            apply_lora(pipe.text_encoder, recipe.text_encoder_lora)
            parts["text_encoder"] = pipe.text_encoder
        if recipe.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if world > 1 and len(self.items) < data.batch_size:
            raise ConfigError(
                f"data.batch_size: {data.batch_size} is more than the {len(self.items)} images; with {world} "
                "processes every batch must be full (lower the batch size)"
            )
        self.cache = _Cache(pipe, self.items, recipe) if data.cache else None
        self.noise_scheduler = require("diffusers").DDPMScheduler.from_config(pipe.scheduler.config)
        self.v_prediction = self.noise_scheduler.config.prediction_type == "v_prediction"
        self.scaling = float(getattr(pipe.vae.config, "scaling_factor", 1.0))
        self.adapted = list(parts.values())
        count = len(self.items)
        batches = EpochBatches(count, data.batch_size, recipe.train.seed, drop_last=count >= data.batch_size)
        return Built(parts, batches, sections={"unet": "lora", "text_encoder": "text_encoder_lora"})

    def batches(self, run: Prepared, epoch: int) -> Any:
        return run.batches

    def loss(self, run: Prepared, batch: Any, epoch: int) -> torch.Tensor:
        recipe, accelerator = self.recipe, run.accelerator
        device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
        share = len(batch) // world
        own = slice(rank * share, (rank + 1) * share)
        mine = batch[own]
        flips = _flips(recipe.train.seed, epoch, mine, recipe.data.random_flip)
        if self.cache is not None:
            enc = self.cache.get(mine, flips)
        else:
            enc = _encode(self.pipe, self.items, mine, flips, recipe)
        mean, std = enc.mean.to(device), enc.std.to(device)
        # Every process draws the whole global batch's random numbers (same RNG state everywhere) and
        # takes its share, so N processes train on exactly what one process would.
        whole = (len(batch), *mean.shape[1:])
        latents = (mean + std * torch.randn(whole, device=device)[own]) * self.scaling
        noise = torch.randn(whole, device=device)[own]
        scheduler = self.noise_scheduler
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), device=device)[own]
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = noise_target(scheduler, latents, noise, timesteps)
        # A text encoder that trains encodes the captions at every step; a frozen one did with the latents.
        text = run.models[1](enc.ids.to(device))[0] if len(run.models) > 1 else cast(torch.Tensor, enc.text).to(device)
        prediction = run.models[0](noisy, timesteps, text).sample
        mse = ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))
        gamma = recipe.train.min_snr_gamma
        if gamma is not None:
            mse = mse * min_snr_weights(scheduler.alphas_cumprod, timesteps, gamma, self.v_prediction)
        return mse.mean()

    def _samples_here(self, run: Prepared) -> bool:
        # A sharded UNet runs on every process at once; otherwise the main process samples alone.
        return bool(run.accelerator.is_main_process or is_fsdp(run.accelerator))

    def after_step(self, run: Prepared, state: RunState) -> None:
        every = self.recipe.validation.every
        if every and state.step % every == 0 and self._samples_here(run):
            report = run.out_dir / "report" / f"samples-step{state.step:06d}.png"
            _sample_grid(self.pipe, self.adapted, self.recipe, report, write=run.accelerator.is_main_process)

    def finish(self, run: Prepared, state: RunState) -> Outputs:
        if self._samples_here(run):  # before the outputs: a sharded UNet samples on every process
            report = run.out_dir / "report" / "samples.png"
            _sample_grid(self.pipe, self.adapted, self.recipe, report, write=run.accelerator.is_main_process)
        losses = state.losses
        window = max(1, len(losses) // 10)
        metrics: dict[str, Any] = {
            "images": len(self.items),
            "loss_first": sum(losses[:window]) / window if losses else None,
            "loss_last": sum(losses[-window:]) / window if losses else None,
            "losses": losses,
        }
        plots = {"loss.png": functools.partial(plot_losses, losses)} if losses else {}
        folder = Path(self.recipe.model.pipeline)
        if folder.is_dir():  # a copy of the pipeline with the merged parts
            return Outputs(metrics, "merged", pipeline=folder, plots=plots)
        return Outputs(metrics, "merged.safetensors", pipeline=self.pipe, plots=plots)  # the same single-file layout
