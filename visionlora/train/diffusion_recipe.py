"""The diffusion style recipe (``task: diffusion-style``): its sections and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from visionlora.config import LoraConfig
from visionlora.io.formats import FORMAT_TABLE
from visionlora.train.sections import (
    Output,
    Quantize,
    Train,
    check_train,
    families_problem,
    holding_extras,
    positive,
    raise_first,
)

__all__ = [
    "DiffusionData",
    "DiffusionModel",
    "DiffusionOutput",
    "DiffusionRecipe",
    "DiffusionTrain",
    "DreamBooth",
    "Validation",
]


@dataclass
class DiffusionModel:
    """The Stable Diffusion base: 1.x/2.x or SDXL (told apart by the pipeline's ``model_index.json``)."""

    pipeline: str
    """A diffusers pipeline folder (``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``), or a
    single-file ``.safetensors`` checkpoint (then give ``config``)."""
    config: str | None = None
    """For a single-file checkpoint: a local diffusers pipeline folder with the matching configs."""
    quantize: Quantize = "none"
    """``int8``: hold the frozen UNet's / transformer's Linear and conv weights in int8 (``visionlora.quantize_base``,
    about 4× less memory for them); ``bnb-int8``, ``nf4``, ``fp4``: its Linear layers in bitsandbytes' LLM.int8 or
    4-bit (QLoRA; ``pip install 'visionlora[bnb]'``, not under FSDP), convs in int8; ``lora.trainable`` stays float."""


@dataclass
class DiffusionData:
    """Style images with captions: ``<name>.txt`` beside each image, else ``caption`` for all."""

    root: str
    """A folder of style images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``), searched recursively."""
    caption: str | None = None
    """The caption of every image without a caption file beside it (null: each needs one)."""
    caption_extension: str = ".txt"
    """The suffix of the caption file beside each image (``.caption`` for some datasets)."""
    caption_dropout: float = 0.0
    """Train on the empty prompt instead of the caption with this probability, per (epoch, image)."""
    shuffle_tags: bool = False
    """Shuffle each caption's comma-separated tags per (epoch, image) (captions are then encoded at
    every step)."""
    keep_tokens: int = 0
    """With ``shuffle_tags``: the first this many tags stay in place (e.g. a trigger word)."""
    resolution: int = 512
    """Side of the square crops trained on, in pixels (a multiple of 8); with ``buckets``, the side of
    the square whose area every bucket has at most."""
    buckets: bool = False
    """Aspect-ratio buckets: each image goes to the bucket of about ``resolution``² pixels whose
    aspect ratio is nearest, resized and cropped minimally; a batch holds one bucket."""
    bucket_step: int = 64
    """Bucket sides are multiples of this many pixels."""
    bucket_min_side: int = 256
    """The shortest bucket side, in pixels."""
    bucket_max_side: int = 2048
    """The longest bucket side, in pixels."""
    batch_size: int = 4
    """Global batch size (split over processes under ``accelerate launch``)."""
    center_crop: bool = True
    """Crop the middle of each resized image (false: a crop fixed per image by the seed)."""
    random_flip: bool = True
    """Flip each image horizontally at random, per (epoch, image)."""
    cache: bool = True
    """Encode latents and captions once (the VAE and text encoder are frozen)."""
    val_fraction: float = 0.0
    """Hold out this share of the images (at least one, chosen by the seed) for a validation loss at
    fixed timesteps and noise, every ``validation.every`` steps and at the end (0: none)."""
    max_sequence_length: int = 512
    """Flux/SD3: the T5's tokens per caption, at most (its tokenizer's maximum caps it); samples use
    the same. Fewer is faster (Flux.1-schnell was trained with 256)."""


@dataclass
class DiffusionTrain(Train):
    """:class:`Train` plus the diffusion loss options."""

    min_snr_gamma: float | None = 5.0
    """Min-SNR loss weighting (Hang et al. 2023) with this gamma for the noise-predicting UNets (SD
    1.x/2.x, SDXL); null: plain MSE. Flux and SD3 train by flow matching, which has no SNR
    weighting: they do not use it."""
    gradient_checkpointing: bool = False
    """Recompute the denoiser's activations in the backward pass: less memory, more time."""
    timestep_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    """Flux/SD3: how the flow-matching noise level σ is drawn: sigmoid of a normal (SD3's paper,
    sd-scripts, diffusers' scripts), or uniform in (0, 1); then shifted (``flow_shift``)."""
    logit_mean: float = 0.0
    """Flux/SD3: mean of the logit-normal draw."""
    logit_std: float = 1.0
    """Flux/SD3: standard deviation of the logit-normal draw."""
    flow_shift: float | None = None
    """Flux/SD3: σ -> s·σ / (1 + (s - 1)·σ) with this s; null: the model's scheduler's (SD3: its
    shift, 3.0; Flux.1-dev: by the image's token count, as its pipeline shifts at inference)."""
    flux_guidance: float = 3.5
    """Flux: the value fed to a guidance-distilled model's (FLUX.1-dev's) guidance embedding during
    training (diffusers' Flux LoRA script uses 3.5); unused by models without one."""
    noise_offset: float = 0.0
    """Add this times a per-(image, channel) Gaussian to the noise (Guttenberg 2023): darker darks
    and brighter brights; 0.05 to 0.1 is usual."""


@dataclass
class DreamBooth:
    """DreamBooth: a subject's images (``data.root``) all captioned with ``instance_prompt``, which holds
    a rare token; with ``class_prompt``, prior preservation on images of the subject's class."""

    instance_prompt: str
    """The caption of every instance image, e.g. ``a photo of sks dog`` (caption files are not read)."""
    class_prompt: str | None = None
    """The class without the token, e.g. ``a photo of a dog``: turns prior preservation on (null: off)."""
    class_root: str | None = None
    """A folder of class images (captioned ``class_prompt``); any short of ``num_class_images`` are
    generated."""
    num_class_images: int = 100
    """How many class images to train on; missing ones are generated with the frozen base before
    training into ``<output>/class-images/`` (kept, and reused on resume)."""
    prior_loss_weight: float = 1.0
    """The weight of a class image's loss relative to an instance image's."""
    class_steps: int = 25
    """Denoising steps per generated class image (at ``validation.guidance_scale``)."""


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
    """Every this many steps: the validation loss (with ``data.val_fraction``) and a sample grid
    (null: only at the end)."""
    loss_timesteps: int = 5
    """The validation loss is the mean over the held-out images at this many evenly spaced timesteps,
    with noise from ``seed`` (the same at every validation, so the curve compares like with like)."""


@dataclass
class DiffusionOutput(Output):
    """:class:`Output` plus the adapter of the lowest validation loss."""

    keep_best: bool = True
    """With ``data.val_fraction``: also write ``best/`` (adapter, exports' main file and merged
    checkpoint) from the validation with the lowest loss."""


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
    text_encoder_2_lora: LoraConfig | None = None
    """LoRA for SDXL's second text encoder (``CLIPTextModelWithProjection``) too, as for the first."""
    dreambooth: DreamBooth | None = None
    """DreamBooth on a subject (null: every image is a style image with its own caption)."""
    train: DiffusionTrain = field(default_factory=DiffusionTrain)
    """Optimisation, schedule, checkpoints and logging, plus the diffusion loss options."""
    validation: Validation = field(default_factory=Validation)
    """Sample grids, base vs adapted."""
    output: DiffusionOutput = field(default_factory=lambda: DiffusionOutput(export=["diffusers", "kohya"]))
    """Where the results go and in which formats."""

    def lora_configs(self) -> list[LoraConfig | None]:
        """The adapters' configs: the denoiser's and each text encoder's (None where it has none)."""
        return [self.lora, self.text_encoder_lora, self.text_encoder_2_lora]

    def __post_init__(self) -> None:
        check_train(self.train)
        checks: list[tuple[str, bool, str]] = [
            ("data.resolution", self.data.resolution >= 8 and self.data.resolution % 8 == 0, "a multiple of 8"),
            ("data.batch_size", self.data.batch_size >= 1, "an integer >= 1"),
            ("data.caption_dropout", 0 <= self.data.caption_dropout < 1, "a probability in [0, 1)"),
            ("data.keep_tokens", self.data.keep_tokens >= 0, "an integer >= 0"),
            ("data.bucket_step", self.data.bucket_step >= 8 and self.data.bucket_step % 8 == 0, "a multiple of 8"),
            (
                "data.bucket_min_side",
                self.data.bucket_step <= self.data.bucket_min_side <= self.data.bucket_max_side,
                "between data.bucket_step and data.bucket_max_side",
            ),
            ("train.noise_offset", self.train.noise_offset >= 0, "a number >= 0"),
            ("data.max_sequence_length", self.data.max_sequence_length >= 1, "an integer >= 1"),
            ("train.logit_std", positive(self.train.logit_std), "a number > 0"),
            (
                "train.flow_shift",
                self.train.flow_shift is None or positive(self.train.flow_shift),
                "null or a number > 0",
            ),
            (
                "dreambooth.num_class_images",
                self.dreambooth is None or self.dreambooth.num_class_images >= 1,
                "an integer >= 1",
            ),
            (
                "dreambooth.prior_loss_weight",
                self.dreambooth is None or self.dreambooth.prior_loss_weight >= 0,
                "a number >= 0",
            ),
            ("dreambooth.class_steps", self.dreambooth is None or self.dreambooth.class_steps >= 1, "an integer >= 1"),
            (
                "dreambooth.class_root",
                self.dreambooth is None or self.dreambooth.class_prompt is not None or not self.dreambooth.class_root,
                "null unless dreambooth.class_prompt is set",
            ),
            (
                "train.min_snr_gamma",
                self.train.min_snr_gamma is None or positive(self.train.min_snr_gamma),
                "null or a number > 0",
            ),
            ("validation.steps", self.validation.steps >= 1, "an integer >= 1"),
            ("validation.loss_timesteps", self.validation.loss_timesteps >= 1, "an integer >= 1"),
            ("data.val_fraction", 0 <= self.data.val_fraction < 1, "a share in [0, 1)"),
            ("validation.every", self.validation.every is None or self.validation.every >= 1, "null or >= 1"),
            (
                "output.export",
                all(FORMAT_TABLE[f].holds_extras for f in self.output.export)
                or not (self.lora.trainable or self.lora.bias != "none"),
                f"formats that can hold lora.trainable modules and biases: {holding_extras()}",
            ),
            (
                "output.export",
                (
                    problem := families_problem(
                        [self.lora, self.text_encoder_lora, self.text_encoder_2_lora], self.output.export
                    )
                )
                is None,
                f"formats that hold the adapter families trained: {problem}",
            ),
        ]
        raise_first(self, checks)
