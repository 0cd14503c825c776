"""The recipe sections every task shares (``train``, ``output``) and the checks recipes run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from visionlora.config import DtypeName, LoraConfig, config_to_dict, is_finite_number
from visionlora.errors import ConfigError
from visionlora.io.formats import FORMAT_TABLE, AdapterFormat
from visionlora.quantize import quantize_base

__all__ = [
    "Output",
    "Quantize",
    "Train",
    "check_train",
    "fraction",
    "holding_extras",
    "positive",
    "quantize_frozen",
    "raise_first",
]

Quantize = Literal["none", "int8", "bnb-int8", "nf4", "fp4"]
"""``model.quantize``: how the frozen base is held (see :func:`quantize_frozen`)."""


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
    warmup_fraction: float = 0.05
    """Share of the run's optimizer steps spent in linear warm-up before the cosine decay to 0."""
    warmup_steps: int | None = None
    """Warm-up in optimizer steps instead of ``warmup_fraction`` (null: use the fraction)."""
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


def families_problem(configs: Sequence[LoraConfig | None], export: Sequence[str]) -> str | None:
    """Why an ``output.export`` format cannot hold the adapter families one of ``configs`` (one per
    model) trains, or None if every format can."""
    for cfg in configs:
        used = set() if cfg is None else {cfg.family, *cfg.family_pattern.values()}
        for name in export:
            fmt = FORMAT_TABLE[name]
            if used - set(fmt.families) or (fmt.runs_lora_layers and len(used) > 1):
                one = " (one per model)" if fmt.runs_lora_layers else ""
                return f"{name} holds {', '.join(fmt.families)}{one}; the adapter trains {', '.join(sorted(used))}"
    return None


def quantize_frozen(model: Any, how: Quantize, device: Any) -> None:
    """Hold ``model``'s frozen Linear/conv weights as ``model.quantize`` says: ``int8`` with visionlora's
    int8 (any device); ``bnb-int8`` (LLM.int8), ``nf4`` or ``fp4`` with bitsandbytes for the Linear layers
    (convs in visionlora's int8), after moving ``model`` to ``device``, where bitsandbytes quantizes."""
    if how == "int8":
        quantize_base(model, backend="visionlora")
    elif how != "none":
        model.to(device)
        bits, kind = (8, "nf4") if how == "bnb-int8" else (4, how)
        quantize_base(model, bits, backend="bitsandbytes", quant_type=kind)  # type: ignore[arg-type]


def holding_extras() -> str:
    return ", ".join(name for name, fmt in FORMAT_TABLE.items() if fmt.holds_extras)


def check_train(train: Train) -> None:
    t = train
    checks: list[tuple[str, bool, str]] = [
        ("train.epochs", t.epochs >= 1, "an integer >= 1"),
        ("train.max_steps", t.max_steps is None or t.max_steps >= 1, "null or an integer >= 1"),
        ("train.lr", positive(t.lr), "a finite number > 0"),
        ("train.head_lr", positive(t.head_lr), "a finite number > 0"),
        ("train.weight_decay", is_finite_number(t.weight_decay) and t.weight_decay >= 0, ">= 0"),
        ("train.warmup_fraction", is_finite_number(t.warmup_fraction) and 0 <= t.warmup_fraction < 1, "in [0, 1)"),
        ("train.warmup_steps", t.warmup_steps is None or t.warmup_steps >= 0, "null or an integer >= 0"),
        ("train.grad_accum", t.grad_accum >= 1, "an integer >= 1"),
        (
            "train.max_grad_norm",
            t.max_grad_norm is None or positive(t.max_grad_norm),
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
    raise_first({"train": train}, checks)


def raise_first(obj: Any, checks: list[tuple[str, bool, str]]) -> None:
    for key, ok, valid in checks:
        if not ok:
            value = _get(config_to_dict(obj), key)
            raise ConfigError(f"{key}: {value!r} is invalid; expected {valid}")


def fraction(value: float) -> bool:
    return is_finite_number(value) and 0 <= value < 1


def positive(value: float) -> bool:
    return is_finite_number(value) and value > 0


def _get(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data
