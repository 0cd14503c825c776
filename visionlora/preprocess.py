"""How images become a classifier's input: size, crop, interpolation, mean and std, and the training
augmentation on top. A run stores its :class:`Preprocess` with its adapter and merged checkpoint,
so prediction uses exactly what training validated with.

timm models take the values from their pretrained config (``timm.data.resolve_data_config``),
other models ImageNet's; any of them can be overridden.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from visionlora._deps import require
from visionlora.config import is_finite_number
from visionlora.errors import ConfigError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Augment", "Preprocess", "resolve_preprocess"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
AutoAugment = Literal["none", "randaugment", "trivialaugment"]


@dataclass(frozen=True)
class Preprocess:
    """What evaluation does to an image: resize the short side to ``size / crop_pct``, centre-crop
    ``size``, scale to [0, 1], normalise by ``mean`` and ``std`` (per RGB channel)."""

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        checks = [
            ("size", isinstance(self.size, int) and not isinstance(self.size, bool) and self.size >= 8, "an int >= 8"),
            ("mean", _triple(self.mean), "3 finite numbers"),
            ("std", _triple(self.std) and min(self.std) > 0, "3 finite numbers > 0"),
            ("crop_pct", is_finite_number(self.crop_pct) and 0 < self.crop_pct <= 1, "a number in (0, 1]"),
            ("interpolation", self.interpolation in INTERPOLATIONS, f"one of {list(INTERPOLATIONS)}"),
        ]
        for key, ok, valid in checks:
            if not ok:
                raise ConfigError(f"preprocess {key}: {getattr(self, key)!r} is invalid; expected {valid}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form; :meth:`from_dict` reads it back."""
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "preprocess") -> Preprocess:
        """The record :meth:`to_dict` wrote.

        Raises:
            ConfigError: naming ``where`` and the entry at fault.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, dict) or set(data) != set(names):
            raise ConfigError(f"{where}: expected a mapping with exactly {names}")
        try:
            return cls(
                size=data["size"],
                mean=tuple(data["mean"]),  # type: ignore[arg-type]
                std=tuple(data["std"]),  # type: ignore[arg-type]
                crop_pct=data["crop_pct"],
                interpolation=data["interpolation"],
            )
        except (TypeError, ConfigError) as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def _mode(self) -> Any:
        return require("torchvision.transforms").InterpolationMode(self.interpolation)

    def eval_transform(self) -> Any:
        """PIL image -> normalised (3, size, size) tensor, as evaluation and prediction see it."""
        T = require("torchvision.transforms")
        resize = math.floor(self.size / self.crop_pct)
        return T.Compose(
            [
                T.Lambda(_rgb),
                T.Resize(resize, interpolation=self._mode()),
                T.CenterCrop(self.size),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def train_transform(self, augment: Augment) -> Any:
        """PIL image -> normalised tensor with ``augment``'s random augmentation (none: :meth:`eval_transform`)."""
        if not augment.enabled:
            return self.eval_transform()
        T = require("torchvision.transforms")
        steps: list[Any] = [
            T.Lambda(_rgb),
            T.RandomResizedCrop(self.size, scale=augment.crop_scale, interpolation=self._mode()),
            T.RandomHorizontalFlip(),
        ]
        if augment.auto_augment == "randaugment":
            steps.append(T.RandAugment(interpolation=self._mode()))
        elif augment.auto_augment == "trivialaugment":
            steps.append(T.TrivialAugmentWide(interpolation=self._mode()))
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        if augment.random_erasing > 0:
            steps.append(T.RandomErasing(p=augment.random_erasing, value="random"))
        return T.Compose(steps)


@dataclass(frozen=True)
class Augment:
    """Random augmentation of training images (applied per image, drawn per (epoch, image))."""

    enabled: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    auto_augment: AutoAugment = "none"
    random_erasing: float = 0.0


def _triple(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 3 and all(is_finite_number(v) for v in value)


def _rgb(image: Any) -> Any:
    return image.convert("RGB")


def resolve_preprocess(
    model: nn.Module,
    size: int,
    *,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> Preprocess:
    """The preprocessing of ``model`` at ``size`` px: timm's pretrained config for a timm model,
    ImageNet's otherwise, with any value given here taking precedence.

    Raises:
        ConfigError: a value is out of range.
    """
    found: dict[str, Any] = {}
    if getattr(model, "pretrained_cfg", None) is not None:
        config = require("timm.data").resolve_data_config({"input_size": (3, size, size)}, model=model)
        found = {
            "mean": tuple(config["mean"]),
            "std": tuple(config["std"]),
            "crop_pct": float(config["crop_pct"]),
            "interpolation": config["interpolation"] if config["interpolation"] in INTERPOLATIONS else "bicubic",
        }
    given = {"mean": mean, "std": std, "crop_pct": crop_pct, "interpolation": interpolation}
    found.update({k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None})
    return Preprocess(size=size, **found)
