"""Training recipes: YAML files that map one to one onto these dataclasses.

A recipe has a ``task`` and sections ``model``, ``data``, ``lora`` (a :class:`~visionlora.LoraConfig`),
``train`` and ``output``. Unknown keys are errors naming the closest valid key; wrong values name
the key and what is valid. ``--set section.key=value`` overrides (values parsed as YAML) apply
before checking, and the fully resolved recipe is written next to the run's results.

Example:
    >>> recipe = load_recipe("recipes/classifier-resnet.yaml", ["train.max_steps=20", "data.root=/data/pets"])
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from visionlora._deps import require
from visionlora.config import DtypeName, LoraConfig, config_from_dict, config_to_dict, is_finite_number
from visionlora.errors import ConfigError
from visionlora.io.formats import FORMAT_TABLE, AdapterFormat

__all__ = [
    "RECIPES",
    "ClassifierData",
    "ClassifierModel",
    "ClassifierRecipe",
    "DiffusionData",
    "DiffusionModel",
    "DiffusionRecipe",
    "DiffusionTrain",
    "Output",
    "Recipe",
    "Train",
    "Validation",
    "apply_overrides",
    "dump_recipe",
    "load_recipe",
    "parse_recipe",
]


@dataclass
class ClassifierModel:
    """The network to adapt."""

    name: str
    """A torchvision or timm model name, optionally prefixed ``torchvision:`` / ``timm:``."""
    weights: str = "pretrained"
    """``pretrained`` (fetched by torchvision/timm), ``none`` (fresh weights), or a .safetensors/.pt file."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments for ``torchvision.models.get_model`` / ``timm.create_model`` (e.g. ``img_size: 64``)."""


@dataclass
class ClassifierData:
    """An ImageFolder-style dataset: ``root/train/<class>/*.png`` and ``root/val/...``, or one folder to split."""

    root: str
    """A folder of class folders (``root/<class>/*.png``), or one with ``train/`` and ``val/`` folders of them."""
    val_fraction: float = 0.2
    """Share of the images held out for validation when ``root`` has no train/ and val/ folders."""
    image_size: int = 224
    """Side of the square images the model sees, after resizing and cropping."""
    batch_size: int = 32
    """Global batch size (split over processes under ``accelerate launch``)."""
    num_workers: int = 0
    """DataLoader worker processes (0: load in the training process)."""
    augment: bool = True
    """Random resized crops and horizontal flips for training (timm models: timm's own transforms)."""
    cache_features: bool = False
    """Run the frozen layers before the first trainable block once per image, keep their outputs in
    memory and train the rest on them. Needs ``augment: false``. Those layers run in eval mode, after
    their BatchNorm statistics are re-estimated on the training images (what an uncached run drifts
    to). Much faster when LoRA sits in the last blocks; memory: the prefix's output size per image."""


@dataclass
class Train:
    """Optimisation, schedule, checkpoints and logging."""

    epochs: int = 10
    """Passes over the training data (unless ``max_steps`` is set)."""
    max_steps: int | None = None
    """Train for exactly this many optimizer steps, as many epochs as that takes (null: ``epochs`` epochs)."""
    lr: float = 1e-3
    """Learning rate of the LoRA parameters."""
    head_lr: float = 1e-3
    """Learning rate of everything else that trains (a new head, ``trainable`` modules, biases)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay, for every group."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up before the cosine decay to 0 at the last step."""
    grad_accum: int = 1
    """Batches whose gradients are summed (averaged) into one optimizer step."""
    max_grad_norm: float | None = 1.0
    """Clip the trained parameters' gradients to this total norm (null: no clipping)."""
    max_nonfinite_steps: int = 5
    """Skip an optimizer step whose loss or gradients are NaN/Inf; stop the run after this many in a row."""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """``auto``: bf16 on a GPU that supports it, else fp16 on GPU, fp32 on CPU."""
    seed: int = 0
    """Seeds the initialisation, data order, augmentation and noise; the same seed gives the same run."""
    checkpoint_every: int | None = None
    """Write a resumable checkpoint every this many optimizer steps (null: none; the results are written at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    log_with: Literal["tensorboard"] | None = None
    """Also log metrics through accelerate's tracker (TensorBoard needs the ``tensorboard`` package)."""


@dataclass
class Output:
    """Where results go and in which formats the adapter is exported."""

    dir: str = "runs/visionlora"
    """The run's output folder (``--output`` overrides it)."""
    export: list[AdapterFormat] = field(default_factory=list)
    """Other formats to write beside adapter.safetensors (e.g. ``[peft]``)."""
    merged_dtype: DtypeName = "fp32"
    """dtype of the merged checkpoint's weights (the merge math runs in float32)."""


@dataclass
class ClassifierRecipe:
    """Fine-tune an image classifier: new head for the dataset's classes, LoRA on the chosen layers."""

    task: Literal["classifier"]
    """What the recipe trains; the other keys depend on it."""
    model: ClassifierModel
    """The network to adapt and its weights."""
    data: ClassifierData
    """The images, one folder per class."""
    lora: LoraConfig
    """Which layers get LoRA and how (the keys of :class:`~visionlora.LoraConfig`); the new head trains too."""
    train: Train = field(default_factory=Train)
    """Optimisation, schedule, checkpoints and logging."""
    output: Output = field(default_factory=Output)
    """Where the results go and in which formats."""

    def __post_init__(self) -> None:
        _check_train(self.train)
        checks: list[tuple[str, bool, str]] = [
            ("data.val_fraction", 0.0 < self.data.val_fraction < 1.0, "a number between 0 and 1 (exclusive)"),
            ("data.image_size", self.data.image_size >= 8, "an integer >= 8"),
            ("data.batch_size", self.data.batch_size >= 1, "an integer >= 1"),
            ("data.num_workers", self.data.num_workers >= 0, "an integer >= 0"),
            (
                "data.cache_features",
                not (self.data.cache_features and self.data.augment),
                "false while data.augment is true (augmented images change every epoch, so nothing can be cached)",
            ),
            (
                "output.export",
                all(FORMAT_TABLE[f].holds_extras for f in self.output.export),
                f"formats that can hold the new head: {_holding_extras()} (the others hold LoRA weights only)",
            ),
        ]
        _raise_first(self, checks)


def _holding_extras() -> str:
    return ", ".join(name for name, fmt in FORMAT_TABLE.items() if fmt.holds_extras)


def _check_train(train: Train) -> None:
    t = train
    checks: list[tuple[str, bool, str]] = [
        ("train.epochs", t.epochs >= 1, "an integer >= 1"),
        ("train.max_steps", t.max_steps is None or t.max_steps >= 1, "null or an integer >= 1"),
        ("train.lr", _positive(t.lr), "a finite number > 0"),
        ("train.head_lr", _positive(t.head_lr), "a finite number > 0"),
        ("train.weight_decay", is_finite_number(t.weight_decay) and t.weight_decay >= 0, ">= 0"),
        ("train.warmup_steps", t.warmup_steps >= 0, "an integer >= 0"),
        ("train.grad_accum", t.grad_accum >= 1, "an integer >= 1"),
        (
            "train.max_grad_norm",
            t.max_grad_norm is None or _positive(t.max_grad_norm),
            "null or > 0",
        ),
        (
            "train.checkpoint_every",
            t.checkpoint_every is None or t.checkpoint_every >= 1,
            "null or an integer >= 1",
        ),
        ("train.keep_checkpoints", t.keep_checkpoints >= 1, "an integer >= 1"),
        ("train.max_nonfinite_steps", t.max_nonfinite_steps >= 1, "an integer >= 1"),
        ("train.seed", 0 <= t.seed < 2**32, "an integer from 0 to 2**32 - 1"),
    ]
    _raise_first({"train": train}, checks)


def _raise_first(obj: Any, checks: list[tuple[str, bool, str]]) -> None:
    for key, ok, valid in checks:
        if not ok:
            value = _get(config_to_dict(obj), key)
            raise ConfigError(f"{key}: {value!r} is invalid; expected {valid}")


def _positive(value: float) -> bool:
    return is_finite_number(value) and value > 0


def _get(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


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
        _check_train(self.train)
        checks: list[tuple[str, bool, str]] = [
            ("data.resolution", self.data.resolution >= 8 and self.data.resolution % 8 == 0, "a multiple of 8"),
            ("data.batch_size", self.data.batch_size >= 1, "an integer >= 1"),
            (
                "train.min_snr_gamma",
                self.train.min_snr_gamma is None or _positive(self.train.min_snr_gamma),
                "null or a number > 0",
            ),
            ("validation.steps", self.validation.steps >= 1, "an integer >= 1"),
            ("validation.every", self.validation.every is None or self.validation.every >= 1, "null or >= 1"),
            (
                "output.export",
                all(FORMAT_TABLE[f].holds_extras for f in self.output.export)
                or not (self.lora.trainable or self.lora.bias != "none"),
                f"formats that can hold lora.trainable modules and biases: {_holding_extras()}",
            ),
        ]
        _raise_first(self, checks)


Recipe = ClassifierRecipe | DiffusionRecipe

RECIPES: dict[str, type[ClassifierRecipe] | type[DiffusionRecipe]] = {
    "classifier": ClassifierRecipe,
    "diffusion-style": DiffusionRecipe,
}
"""Recipe class by ``task``."""


_MAX_RECIPE_BYTES = 1024 * 1024


def _yaml() -> Any:
    return require("yaml")


def _loader() -> Any:
    """A safe YAML loader that also reads ``1e-3`` (no dot) as a float, as people write learning rates."""
    yaml = _yaml()

    class Loader(yaml.SafeLoader):  # type: ignore[name-defined,misc]
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return Loader


def _parse_yaml(text: str, where: str) -> Any:
    yaml = _yaml()
    try:
        return yaml.load(text, Loader=_loader())  # a SafeLoader subclass
    # PyYAML's constructors raise ValueError for dates such as 2001-13-45 and ints over 4300 digits,
    # and its composer recurses once per nesting level.
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{where}: not valid YAML ({type(exc).__name__}: {str(exc)[:300]})") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``data`` with ``section.key=value`` overrides applied (values parsed as YAML); ``data`` is not changed."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.max_steps=100")
        parts = key.strip().split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = _parse_yaml(raw, f"--set {key}")
    return out


def parse_recipe(data: Any, where: str = "recipe") -> Recipe:
    """The recipe dataclass for a parsed YAML document (checked in full)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a recipe is a mapping with task, model, data, lora, train, output")
    task = data.get("task")
    if task not in RECIPES:
        raise ConfigError(f"{where}: task {task!r} is not one of {list(RECIPES)}")
    return config_from_dict(RECIPES[task], data)  # type: ignore[return-value]


def load_recipe(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply ``--set``-style overrides, and check every key and value.

    Raises:
        ConfigError: naming the file or key at fault and what would be valid.
    """
    path = Path(path)
    try:
        if path.stat().st_size > _MAX_RECIPE_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes; a recipe is at most {_MAX_RECIPE_BYTES}")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc})") from None
    data = _parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping with task, model, data, lora, train, output")
    return parse_recipe(apply_overrides(data, overrides or []), str(path))


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML; :func:`load_recipe` reads it back to an equal recipe."""
    return str(_yaml().safe_dump(config_to_dict(recipe), sort_keys=False))
