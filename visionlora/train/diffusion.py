"""The diffusion style task: LoRA on a Stable Diffusion UNet from captioned style images.

Noise-prediction loss (epsilon or v-prediction, as the scheduler is configured) with optional
min-SNR weighting; latents and caption embeddings are encoded once when ``data.cache`` is on
(the VAE and text encoder are frozen). At the end: fixed-seed sample grids (base | adapted), the
loss curve, and a merged pipeline folder (or single file, from a single-file base). It plugs into
:func:`~visionlora.train.loop.run_loop`, which owns the training loop itself.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionlora._deps import require
from visionlora.adapters import disable_adapters, enable_adapters
from visionlora.errors import ConfigError
from visionlora.inject import apply_lora
from visionlora.io.files import atomic_path
from visionlora.io.weights import load_original_transformer
from visionlora.models.loading import example_input_for
from visionlora.train.conditioning import ENCODERS, Conditioner, Text
from visionlora.train.data import EpochBatches, mix_seed
from visionlora.train.denoising import denoising_for
from visionlora.train.diffusion_data import (
    Crop,
    Item,
    Latents,
    assign_buckets,
    bucket_sizes,
    bucket_table,
    caption_for,
    crop_for,
    crop_ids,
    flip_for,
    hold_out,
    style_items,
)
from visionlora.train.diffusion_loss import draw_noise, held_out_loss
from visionlora.train.outputs import Outputs
from visionlora.train.recipe import DiffusionModel, DiffusionRecipe
from visionlora.train.report import plot_losses
from visionlora.train.sections import quantize_frozen
from visionlora.train.shadow import Shadow, tracked
from visionlora.train.sharding import is_fsdp
from visionlora.train.task import Built, Prepared, RunState, Task

__all__ = ["StyleTask", "load_pipeline"]

_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "FluxPipeline", "StableDiffusion3Pipeline")


def _pipeline_class(folder: Path, key: str) -> Any:
    """The diffusers pipeline class a folder's ``model_index.json`` names (SD 1.x/2.x or SDXL)."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"{key}: {folder} has no model_index.json; give a diffusers pipeline folder")
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{key}: {index} is not a readable model_index.json ({exc})") from None
    if name not in _PIPELINES:
        raise ConfigError(f"{key}: {folder} holds a {name}; the style recipe trains {' or '.join(_PIPELINES)}")
    return getattr(require("diffusers"), name)


def load_pipeline(spec: DiffusionModel) -> Any:
    """A Stable Diffusion 1.x/2.x, SDXL, Flux.1 or SD3 pipeline from a pipeline folder, or from one
    ``.safetensors`` file with local configs."""
    path = Path(spec.pipeline)
    common = {"safety_checker": None, "requires_safety_checker": False}
    if path.is_dir():
        cls = _pipeline_class(path, "model.pipeline")
        xl = cls.__name__ != _PIPELINES[0]
        return cls.from_pretrained(str(path), **({} if xl else common))
    if path.suffix == ".safetensors" and path.is_file():
        if spec.config is None:
            raise ConfigError(
                "model.config: a single-file checkpoint needs a local pipeline folder with its configs "
                "(nothing is downloaded)"
            )
        cls = _pipeline_class(Path(spec.config), "model.config")
        xl = cls.__name__ != _PIPELINES[0]
        if cls.__name__ in _PIPELINES[2:]:  # a transformer in BFL's / SAI's layout; the rest from the folder
            return cls.from_pretrained(spec.config, transformer=load_original_transformer(path, Path(spec.config)))
        return cls.from_single_file(str(path), config=spec.config, local_files_only=True, **({} if xl else common))
    raise ConfigError(
        f"model.pipeline: {path} is neither a diffusers pipeline folder nor a .safetensors checkpoint "
        "(.ckpt files are pickles and are not read)"
    )


def _sample_grid(
    pipe: Any, adapted: list[nn.Module], recipe: DiffusionRecipe, path: Path, write: bool = True, **extra: Any
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
                    **extra,
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


def _share(size: int, rank: int, world: int) -> slice:
    """Process ``rank``'s part of a global batch of ``size`` (parts differ in length by at most one)."""
    return slice(rank * size // world, (rank + 1) * size // world)


class StyleTask(Task):
    """Give a Stable Diffusion 1.x/2.x or SDXL model a style (:class:`~visionlora.train.recipe.DiffusionRecipe`)."""

    recipe: DiffusionRecipe

    def build(self, accelerator: Any) -> Built:
        recipe, data, db = self.recipe, self.recipe.data, self.recipe.dreambooth
        if db is None:
            self.items = style_items(data.root, data.caption, data.caption_extension)
        else:
            self.items = style_items(data.root, db.instance_prompt, None)
        self.items, self.val_items = hold_out(self.items, data.val_fraction, recipe.train.seed)
        self.pipe = pipe = load_pipeline(recipe.model)
        self.cond = Conditioner(pipe, data.max_sequence_length)
        self.denoiser = "transformer" if self.cond.kind in ("flux", "sd3") else "unet"
        used = {recipe.lora.family, *recipe.lora.family_pattern.values()}
        if self.denoiser == "transformer" and "kohya" in recipe.output.export and used != {"lora"}:
            raise ConfigError(
                f"output.export: kohya files hold LoRA only on Flux's and SD3's fused modules, and lora trains "
                f"{', '.join(sorted(used))}; export to diffusers (DoRA) or leave kohya out"
            )
        self.denoising = denoising_for(pipe, self.cond, recipe.train)
        length = self.cond.max_sequence_length
        self.pipe_kwargs = {} if length is None else {"max_sequence_length": length}
        if self.cond.kind == "flux" and any(
            (side // pipe.vae_scale_factor) % 2
            for side in (data.resolution, *([data.bucket_step] if data.buckets else []))
        ):
            raise ConfigError(
                f"data.resolution / data.bucket_step: Flux packs 2x2 latent patches, so image sides must be multiples "
                f"of {2 * pipe.vae_scale_factor} (twice the VAE's downscaling)"
            )
        if db is not None and db.class_prompt is not None:  # with the frozen base, before any LoRA
            self.items += self._class_images(accelerator)
        if recipe.text_encoder_2_lora is not None and len(self.cond.names) < 2:
            raise ConfigError("text_encoder_2_lora: this pipeline has one text encoder; remove the key")
        unet, device = getattr(pipe, self.denoiser), accelerator.device
        for frozen in [pipe.vae, *(getattr(pipe, n) for n in self.cond.names)]:
            frozen.requires_grad_(False)
            frozen.to(device)
        probe = recipe.lora.rank_by_resolution or recipe.lora.rank_budget is not None
        latent_size = data.resolution // pipe.vae_scale_factor
        apply_lora(unet, recipe.lora, example_input=example_input_for(unet, latent_size) if probe else None)
        quantize_frozen(unet, recipe.model.quantize, device)
        parts: dict[str, nn.Module] = {self.denoiser: unet}
        sections = {self.denoiser: "lora"}
        for name, cfg in zip(ENCODERS[:2], (recipe.text_encoder_lora, recipe.text_encoder_2_lora), strict=True):
            if cfg is not None:
                apply_lora(getattr(pipe, name), cfg)
                parts[name], sections[name] = getattr(pipe, name), f"{name}_lora"
        if recipe.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.crops, groups = self._crops(self.items, accelerator.is_main_process)
        self.latents = Latents(pipe, self.items, self.crops, keep=data.cache)
        self.val_crops, _ = self._crops(self.val_items, False)
        val_latents = Latents(pipe, self.val_items, self.val_crops, keep=False)
        self.val_latents = [val_latents.get(i, False) for i in range(len(self.val_items))]
        self.text_cache: dict[str, Text] = {}
        if data.cache:
            flips = (False, True) if data.random_flip else (False,)
            for index in range(len(self.items)):
                for flip in flips:
                    self.latents.get(index, flip)
            if self._text_cached():
                captions = sorted({item.caption for item in self.items} | ({""} if data.caption_dropout else set()))
                text = self._encode_text(captions, {})
                self.text_cache = {c: text.rows([i]).to("cpu") for i, c in enumerate(captions)}
        self.adapted = list(parts.values())
        self.names = list(parts)
        self.prior_weight = db.prior_loss_weight if db is not None else 1.0
        count = len(self.items)
        kept: dict[str, nn.Module] = {}
        self.best: Shadow | None = None
        if self.val_items and recipe.output.keep_best:
            if is_fsdp(accelerator):
                raise ConfigError(
                    "output.keep_best: keeping the best adapter under FSDP is not supported yet; set "
                    "output.keep_best: false (the validation loss is still logged) or train under DDP"
                )
            tensors = {f"{p}.{n}": t for p, model in parts.items() for n, t in tracked(model, False).items()}
            self.best = kept["best"] = Shadow(tensors)
        drop_last = groups is None and count >= data.batch_size
        batches = EpochBatches(count, data.batch_size, recipe.train.seed, drop_last=drop_last, groups=groups)
        return Built(parts, batches, sections=sections, kept=kept)

    def _class_images(self, accelerator: Any) -> list[Item]:
        """DreamBooth's class images: those of ``class_root``, and the rest up to ``num_class_images``
        generated by the frozen base into ``<output>/class-images/`` (kept: a resumed run reuses them)."""
        recipe, db = self.recipe, self.recipe.dreambooth
        assert db is not None and db.class_prompt is not None
        given = style_items(db.class_root, db.class_prompt, None, key="dreambooth.class_root") if db.class_root else []
        given = given[: db.num_class_images]
        folder = Path(accelerator.project_dir) / "class-images"
        paths = [folder / f"{k:05d}.png" for k in range(db.num_class_images - len(given))]
        missing = [k for k, p in enumerate(paths) if not p.is_file()]
        if missing and accelerator.is_main_process:
            self.pipe.to(accelerator.device)
            self.pipe.set_progress_bar_config(disable=True)
            print(f"generating {len(missing)} class image(s) for {db.class_prompt!r} into {folder}", flush=True)
            folder.mkdir(parents=True, exist_ok=True)
            side = recipe.data.resolution
            with torch.random.fork_rng(devices=[]):  # generating must not move the training RNG
                for k in missing:
                    generator = torch.Generator(device="cpu").manual_seed(mix_seed(recipe.train.seed, k, 7))
                    image = self.pipe(
                        db.class_prompt,
                        num_inference_steps=db.class_steps,
                        **self.pipe_kwargs,
                        guidance_scale=recipe.validation.guidance_scale,
                        height=side,
                        width=side,
                        generator=generator,
                    ).images[0]
                    with atomic_path(paths[k]) as tmp:
                        image.save(tmp, format="PNG")
        accelerator.wait_for_everyone()
        made = [Item(p, db.class_prompt, (recipe.data.resolution,) * 2) for p in paths]
        return [Item(i.path, i.caption, i.size, prior=True) for i in [*given, *made]]

    def _crops(self, items: list[Item], show: bool) -> tuple[list[Crop], list[int] | None]:
        """Each image's crop (fixed per image) and, with buckets, its bucket (a table printed if ``show``)."""
        data, seed = self.recipe.data, self.recipe.train.seed
        sizes = [item.size for item in items]
        if not data.buckets:
            square = (data.resolution, data.resolution)
            crops = [crop_for(size, square, data.center_crop, mix_seed(seed, i)) for i, size in enumerate(sizes)]
            return crops, None
        buckets = bucket_sizes(data.resolution**2, data.bucket_step, data.bucket_min_side, data.bucket_max_side)
        assigned = assign_buckets(sizes, buckets)
        if show:
            print(bucket_table(buckets, assigned), flush=True)
        crops = [
            crop_for(size, (buckets[b][1], buckets[b][0]), data.center_crop, mix_seed(seed, i))
            for i, (size, b) in enumerate(zip(sizes, assigned, strict=True))
        ]
        return crops, assigned

    def _text_cached(self) -> bool:
        """Whether captions are encoded once: the encoders are frozen and captions do not change per epoch."""
        recipe = self.recipe
        frozen = recipe.text_encoder_lora is None and recipe.text_encoder_2_lora is None
        return recipe.data.cache and frozen and not recipe.data.shuffle_tags

    def _encode_text(self, captions: list[str], trained: dict[str, nn.Module]) -> Text:
        """``captions`` through the text encoders: ``trained`` ones as prepared (with gradients), the rest frozen."""
        encoders = [trained.get(n, getattr(self.pipe, n)) for n in self.cond.names]
        return self.cond.encode(encoders, self.cond.ids(captions), [n in trained for n in self.cond.names])

    def batches(self, run: Prepared, epoch: int) -> Any:
        return run.batches

    def loss(self, run: Prepared, batch: Any, epoch: int) -> torch.Tensor:
        recipe, data, accelerator = self.recipe, self.recipe.data, run.accelerator
        device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
        seed = recipe.train.seed
        own = _share(len(batch), rank, world)
        # A process whose share of a short batch is empty runs one image with weight 0, so every
        # process takes part in each gradient exchange.
        empty = own.start == own.stop
        mine = batch[own] if not empty else batch[:1]
        flips = [flip_for(seed, epoch, i, data.random_flip) for i in mine]
        encoded = [self.latents.get(i, f) for i, f in zip(mine, flips, strict=True)]
        mean = torch.stack([m for m, _ in encoded]).to(device)
        std = torch.stack([s for _, s in encoded]).to(device)
        # Every process draws the whole global batch's random numbers (same RNG state everywhere) and
        # takes its share, so N processes train on exactly what one process would.
        whole = (len(batch), *mean.shape[1:])
        part = own if not empty else slice(0, 1)
        latents = self.denoising.scale(mean + std * torch.randn(whole, device=device)[part])
        noise = draw_noise(whole, part, recipe.train.noise_offset, device)
        level = self.denoising.draw(len(batch), part, mean.shape[-2] * mean.shape[-1] // 4, device)
        noisy, target, level_weights = self.denoising.noised(latents, noise, level)
        captions = [
            caption_for(
                self.items[i].caption, seed, epoch, i, data.caption_dropout, data.shuffle_tags, data.keep_tokens
            )
            for i in mine
        ]
        models = dict(zip(self.names, run.models, strict=True))
        if self.text_cache:
            text = Text.stack([self.text_cache[c] for c in captions]).to(device)
        else:  # a text encoder that trains, or captions that change, are encoded at every step
            text = self._encode_text(captions, {n: m for n, m in models.items() if n != self.denoiser})
        time_ids = None
        if self.cond.xl:
            ids = [crop_ids(self.items[i], self.crops[i], f) for i, f in zip(mine, flips, strict=True)]
            time_ids = torch.stack(ids).to(device)
        prediction = self.denoising.predict(models[self.denoiser], noisy, level, text, time_ids)
        mse = ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))
        mse = mse * level_weights
        weights = torch.tensor(
            [0.0 if empty else self.prior_weight if self.items[i].prior else 1.0 for i in mine], device=device
        )
        # The global batch's mean over N processes: DDP averages the N gradients.
        return (mse * weights).sum() / (len(batch) / world)

    def _samples_here(self, run: Prepared) -> bool:
        # A sharded UNet runs on every process at once; otherwise the main process samples alone.
        return bool(run.accelerator.is_main_process or is_fsdp(run.accelerator))

    def _validate(self, run: Prepared, state: RunState) -> None:
        """The held-out loss after step ``state.step`` into ``state.history``; the best adapter kept."""
        if not self.val_items or (state.history and state.history[-1]["step"] == state.step):
            return
        models = dict(zip(self.names, run.models, strict=True))
        encoders = {n: m for n, m in models.items() if n != self.denoiser}
        device, timesteps = run.accelerator.device, self.recipe.validation.loss_timesteps

        def predict(noisy: torch.Tensor, t: torch.Tensor, image: int) -> torch.Tensor:
            text = self._encode_text([self.val_items[image].caption] * timesteps, encoders)
            ids = crop_ids(self.val_items[image], self.val_crops[image], False).expand(timesteps, -1).to(device)
            return self.denoising.predict(models[self.denoiser], noisy, t, text.to(device), ids)

        modes = [m.training for m in run.models]
        for model in run.models:
            model.eval()
        loss = held_out_loss(predict, self.val_latents, self.denoising, timesteps, self.recipe.validation.seed, device)
        for model, mode in zip(run.models, modes, strict=True):
            model.train(mode)
        if self.best is not None and all(loss < entry["val_loss"] for entry in state.history):
            self.best.copy_from_model()
        state.history.append({"step": state.step, "val_loss": loss})

    def after_step(self, run: Prepared, state: RunState) -> None:
        every = self.recipe.validation.every
        if every and state.step % every == 0:
            self._validate(run, state)
            if self._samples_here(run):
                report = run.out_dir / "report" / f"samples-step{state.step:06d}.png"
                _sample_grid(
                    self.pipe, self.adapted, self.recipe, report, run.accelerator.is_main_process, **self.pipe_kwargs
                )

    def finish(self, run: Prepared, state: RunState) -> Outputs:
        self._validate(run, state)
        if self._samples_here(run):  # before the outputs: a sharded UNet samples on every process
            report = run.out_dir / "report" / "samples.png"
            _sample_grid(
                self.pipe, self.adapted, self.recipe, report, run.accelerator.is_main_process, **self.pipe_kwargs
            )
        losses = state.losses
        window = max(1, len(losses) // 10)
        metrics: dict[str, Any] = {
            "images": sum(not item.prior for item in self.items),
            "class_images": sum(item.prior for item in self.items),
            "loss_first": sum(losses[:window]) / window if losses else None,
            "loss_last": sum(losses[-window:]) / window if losses else None,
            "losses": losses,
        }
        validated = [(entry["step"], entry["val_loss"]) for entry in state.history]
        best = min(validated, key=lambda sv: sv[1]) if validated else None
        metrics |= {
            "val_images": len(self.val_items),
            "val_losses": validated,
            "best_step": None if best is None else best[0],
            "best_val_loss": None if best is None else best[1],
        }
        plots = {"loss.png": functools.partial(plot_losses, losses, validated)} if losses else {}
        variants = {"best": self.best.swapped} if self.best is not None and best is not None else {}
        folder = Path(self.recipe.model.pipeline)
        if folder.is_dir():  # a copy of the pipeline with the merged parts
            return Outputs(metrics, "merged", pipeline=folder, plots=plots, variants=variants)
        return Outputs(
            metrics, "merged.safetensors", pipeline=self.pipe, plots=plots, variants=variants
        )  # the same single-file layout
