"""The diffusion style recipe (``task: diffusion-style``): its sections and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from visionlora.config import LoraConfig
from visionlora.io.formats import FORMAT_TABLE
from visionlora.train.sections import Output, Train, check_train, holding_extras, positive, raise_first

__all__ = ["DiffusionData", "DiffusionModel", "DiffusionRecipe", "DiffusionTrain", "Validation"]


@dataclass
class DiffusionModel:
    """The Stable Diffusion (1.x/2.x layout) base."""

    pipeline: str
    """A diffusers pipeline folder, or a single-file ``.safetensors`` checkpoint (then give ``config``)."""
    config: str | None = None
    """For a single-file checkpoint: a local diffusers pipeline folder with the matching configs."""


@dataclass
class DiffusionData:
    """Style images with captions: ``<name>.txt`` beside each image, else ``caption`` for all."""

    root: str
    """A folder of style images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``), searched recursively."""
    caption: str | None = None
    """The caption of every image without a ``.txt`` beside it (null: each needs one)."""
    resolution: int = 512
    """Side of the square crops trained on, in pixels (a multiple of 8)."""
    batch_size: int = 4
    """Global batch size (split over processes under ``accelerate launch``)."""
    center_crop: bool = True
    """Crop the middle of each resized image (false: a crop fixed per image by the seed)."""
    random_flip: bool = True
    """Flip each image horizontally at random, per (epoch, image)."""
    cache: bool = True
    """Encode latents and captions once (the VAE and text encoder are frozen)."""


@dataclass
class DiffusionTrain(Train):
    """:class:`Train` plus the diffusion loss options."""

    min_snr_gamma: float | None = 5.0
    """Min-SNR loss weighting (Hang et al. 2023) with this gamma; null: plain MSE."""
    gradient_checkpointing: bool = False
    """Recompute the UNet's activations in the backward pass: less memory, more time."""


@dataclass
class Validation:
    """Fixed-seed sample grids, base vs adapted, for a few prompts."""

    prompts: list[str] = field(default_factory=list)
    """One row of the sample grid per prompt (empty: no samples)."""
    seed: int = 0
    """The seed of every sample, so base and adapted start from the same noise."""
    steps: int = 25
    """Denoising steps per sample."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale of the sampling pipeline."""
    every: int | None = None
    """Also sample every this many steps (null: only at the end)."""


@dataclass
class DiffusionRecipe:
    """Give a diffusion model a style: LoRA on the UNet (attention, optionally LoCon convs)."""

    task: Literal["diffusion-style"]
    """What the recipe trains; the other keys depend on it."""
    model: DiffusionModel
    """The Stable Diffusion base."""
    data: DiffusionData
    """The style images and their captions."""
    lora: LoraConfig
    """LoRA on the UNet (the keys of :class:`~visionlora.LoraConfig`), e.g. ``targets: preset:unet-attention``."""
    text_encoder_lora: LoraConfig | None = None
    """LoRA for the text encoder too (e.g. ``targets: ["*.self_attn.*_proj"]``); its captions are then
    encoded every step rather than cached."""
    train: DiffusionTrain = field(default_factory=DiffusionTrain)
    """Optimisation, schedule, checkpoints and logging, plus the diffusion loss options."""
    validation: Validation = field(default_factory=Validation)
    """Sample grids, base vs adapted."""
    output: Output = field(default_factory=lambda: Output(export=["diffusers", "kohya"]))
    """Where the results go and in which formats."""

    def __post_init__(self) -> None:
        check_train(self.train)
        checks: list[tuple[str, bool, str]] = [
            ("data.resolution", self.data.resolution >= 8 and self.data.resolution % 8 == 0, "a multiple of 8"),
            ("data.batch_size", self.data.batch_size >= 1, "an integer >= 1"),
            (
                "train.min_snr_gamma",
                self.train.min_snr_gamma is None or positive(self.train.min_snr_gamma),
                "null or a number > 0",
            ),
            ("validation.steps", self.validation.steps >= 1, "an integer >= 1"),
            ("validation.every", self.validation.every is None or self.validation.every >= 1, "null or >= 1"),
            (
                "output.export",
                all(FORMAT_TABLE[f].holds_extras for f in self.output.export)
                or not (self.lora.trainable or self.lora.bias != "none"),
                f"formats that can hold lora.trainable modules and biases: {holding_extras()}",
            ),
        ]
        raise_first(self, checks)
