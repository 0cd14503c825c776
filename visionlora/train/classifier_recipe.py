"""The classifier recipe (``task: classifier``): its sections and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from visionlora.config import LoraConfig, is_finite_number
from visionlora.io.formats import FORMAT_TABLE
from visionlora.preprocess import AutoAugment
from visionlora.train.sections import (
    Output,
    Quantize,
    Train,
    check_train,
    families_problem,
    fraction,
    holding_extras,
    positive,
    raise_first,
)

__all__ = [
    "ClassifierData",
    "ClassifierModel",
    "ClassifierOutput",
    "ClassifierRecipe",
    "ClassifierTrain",
    "EarlyStopping",
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
    quantize: Quantize = "none"
    """``int8``: hold the frozen base's Linear and conv weights in int8 (``visionlora.quantize_base``, about 4×
    less memory for them); ``bnb-int8``, ``nf4``, ``fp4``: its Linear layers in bitsandbytes' LLM.int8 or 4-bit
    (``pip install 'visionlora[bnb]'``, not under FSDP), convs in int8. LoRA runs only; the new head and
    ``lora.trainable`` modules stay float."""


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
    """Random resized crops (``crop_scale``) and horizontal flips of training images."""
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """Area range of the random resized crops, as a share of the image (timm's and torchvision's default)."""
    auto_augment: AutoAugment = "none"
    """``randaugment`` or ``trivialaugment`` (torchvision's, after crop and flip), or ``none``."""
    random_erasing: float = 0.0
    """Probability of erasing a random rectangle of each training image (timm's ``reprob``)."""
    mean: list[float] | None = None
    """Per-channel normalisation mean (null: the timm model's pretrained config, else ImageNet's)."""
    std: list[float] | None = None
    """Per-channel normalisation std (null: as ``mean``)."""
    crop_pct: float | None = None
    """Evaluation resizes to ``image_size / crop_pct`` and centre-crops (null: timm's config, else 0.875)."""
    balanced: bool = False
    """Draw each epoch's training images with probability inversely proportional to their class's size
    (with replacement), so skewed folders train as if balanced."""
    cache_features: bool = False
    """Run the frozen layers before the first trainable block once per image, keep their outputs in
    memory and train the rest on them. Needs ``augment: false``. Those layers run in eval mode; unless
    ``train.batchnorm`` is ``frozen`` their BatchNorm statistics are first re-estimated on the training
    images (what an uncached run drifts to). Much faster when LoRA sits in the last blocks; memory:
    the prefix's output size per image."""


@dataclass
class EarlyStopping:
    """Stop when the validation metric has not improved for ``patience`` epochs."""

    patience: int = 3
    """Epochs without improvement before the run stops."""
    metric: Literal["val_accuracy", "val_macro_f1", "val_loss"] = "val_accuracy"
    """The metric watched (loss: lower is better; the others: higher)."""
    min_delta: float = 0.0
    """An epoch improves only if it beats the best so far by more than this."""


@dataclass
class ClassifierTrain(Train):
    """:class:`Train` plus what fine-tuning a classifier adds."""

    lr: float = 1e-2
    """Learning rate of the LoRA parameters (``mode: full``: of the body; 1e-3 or lower suits full fine-tuning)."""
    head_lr: float = 1e-2
    """Learning rate of the new head (and of ``lora.trainable`` modules and trained biases)."""
    mode: Literal["lora", "head", "full"] = "lora"
    """``lora``: LoRA on ``lora.targets`` + the new head; ``head``: the new head only; ``full``: every
    parameter (at ``lr``; the head at ``head_lr``). The three rows of the usual comparison."""
    batchnorm: Literal["frozen", "recalibrate", "train"] = "frozen"
    """BatchNorm layers whose parameters do not train: ``frozen`` keeps the base's running statistics
    (eval mode); ``recalibrate`` re-estimates them once on the training images, then keeps them;
    ``train`` normalises with batch statistics and updates them (PyTorch's train mode).
    Trained BatchNorms (``mode: full``) always train."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing."""
    mixup: float = 0.0
    """Mixup's Beta(alpha, alpha) for each batch (0: off); timm's ``Mixup``."""
    cutmix: float = 0.0
    """CutMix's Beta(alpha, alpha) (0: off); with ``mixup`` too, each batch is one of the two at random."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the trained weights with this decay (e.g. 0.999; timm's
    warm-up of the decay applies); it is validated, kept as best and exported in their place."""
    layer_decay: float | None = None
    """Layer-wise learning-rate decay: each block's LR is the next block's times this (the head's is
    ``head_lr``); null: one LR per group."""
    decay_norm_and_bias: bool = False
    """Apply ``weight_decay`` to norm weights and biases too (off: only to weights and LoRA matrices)."""
    channels_last: Literal["auto", "always", "never"] = "auto"
    """Run convolutions in the channels-last memory format (``auto``: on GPU)."""
    compile: bool = False
    """Run the model through ``torch.compile`` (the first steps are slower while it compiles)."""
    early_stopping: EarlyStopping | None = None
    """Stop when validation stops improving (null: train every epoch)."""


@dataclass
class ClassifierOutput(Output):
    """:class:`Output` plus the best epoch's results."""

    keep_best: bool = True
    """Also write ``best/adapter.safetensors`` and ``best/merged.safetensors`` from the epoch with the
    best validation metric (``train.early_stopping.metric``, else val_accuracy)."""


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
    train: ClassifierTrain = field(default_factory=ClassifierTrain)
    """Optimisation, schedule, checkpoints and logging, plus the classifier's training options."""
    output: ClassifierOutput = field(default_factory=ClassifierOutput)
    """Where the results go and in which formats."""

    def __post_init__(self) -> None:
        check_train(self.train)
        t, d, stop = self.train, self.data, self.train.early_stopping
        checks: list[tuple[str, bool, str]] = [
            ("train.label_smoothing", fraction(t.label_smoothing), "a number in [0, 1)"),
            ("train.mixup", is_finite_number(t.mixup) and t.mixup >= 0, "a number >= 0"),
            ("train.cutmix", is_finite_number(t.cutmix) and t.cutmix >= 0, "a number >= 0"),
            ("train.ema_decay", t.ema_decay is None or fraction(t.ema_decay), "null or a number in [0, 1)"),
            (
                "train.layer_decay",
                t.layer_decay is None or (positive(t.layer_decay) and t.layer_decay <= 1),
                "null or a number in (0, 1]",
            ),
            ("train.early_stopping.patience", stop is None or stop.patience >= 1, "an integer >= 1"),
            (
                "train.early_stopping.min_delta",
                stop is None or (is_finite_number(stop.min_delta) and stop.min_delta >= 0),
                "a number >= 0",
            ),
            (
                "data.crop_scale",
                len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1,
                "[min, max] with 0 < min <= max <= 1",
            ),
            ("data.random_erasing", 0 <= d.random_erasing <= 1, "a probability in [0, 1]"),
            ("data.mean", d.mean is None or len(d.mean) == 3, "null or 3 numbers"),
            ("data.std", d.std is None or (len(d.std) == 3 and min(d.std) > 0), "null or 3 numbers > 0"),
            ("data.crop_pct", d.crop_pct is None or 0 < d.crop_pct <= 1, "null or a number in (0, 1]"),
            ("model.quantize", self.model.quantize == "none" or t.mode == "lora", "none unless train.mode is lora"),
            (
                "data.cache_features",
                not (d.cache_features and (t.mode != "lora" or t.compile or t.mixup or t.cutmix)),
                "false unless train.mode is lora, and train.compile, mixup and cutmix are off",
            ),
            (
                "data.auto_augment",
                d.augment or (d.auto_augment == "none" and d.random_erasing == 0),
                "none (and data.random_erasing 0) while data.augment is false",
            ),
            (
                "output.export",
                t.mode == "lora" or not self.output.export,
                "[] when train.mode is head or full (those runs write merged.safetensors, no adapter)",
            ),
            ("data.val_fraction", 0.0 < self.data.val_fraction < 1.0, "a number between 0 and 1 (exclusive)"),
            ("data.image_size", self.data.image_size >= 8, "an integer >= 8"),
            ("data.batch_size", self.data.batch_size >= 1, "an integer >= 1"),
            ("data.num_workers", self.data.num_workers >= 0, "an integer >= 0"),
            ("model.quantize", self.model.quantize == "none" or t.mode == "lora", "none unless train.mode is lora"),
            (
                "data.cache_features",
                not (self.data.cache_features and self.data.augment),
                "false while data.augment is true (augmented images change every epoch, so nothing can be cached)",
            ),
            (
                "output.export",
                all(FORMAT_TABLE[f].holds_extras for f in self.output.export),
                f"formats that can hold the new head: {holding_extras()} (the others hold LoRA weights only)",
            ),
            (
                "output.export",
                (problem := families_problem([self.lora], self.output.export)) is None,
                f"formats that hold the adapter families trained: {problem}",
            ),
        ]
        raise_first(self, checks)
