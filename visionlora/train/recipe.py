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
from pathlib import Path
from typing import Any

from visionlora._deps import require
from visionlora.config import config_from_dict, config_to_dict
from visionlora.errors import ConfigError
from visionlora.train.classifier_recipe import (
    ClassifierData,
    ClassifierModel,
    ClassifierOutput,
    ClassifierRecipe,
    ClassifierTrain,
    EarlyStopping,
)
from visionlora.train.diffusion_recipe import (
    DiffusionData,
    DiffusionModel,
    DiffusionRecipe,
    DiffusionTrain,
    DreamBooth,
    Validation,
)
from visionlora.train.sections import Output, Train

__all__ = [
    "RECIPES",
    "ClassifierData",
    "ClassifierModel",
    "ClassifierOutput",
    "ClassifierRecipe",
    "ClassifierTrain",
    "DiffusionData",
    "DiffusionModel",
    "DiffusionRecipe",
    "DiffusionTrain",
    "DreamBooth",
    "EarlyStopping",
    "Output",
    "Recipe",
    "Train",
    "Validation",
    "apply_overrides",
    "dump_recipe",
    "load_recipe",
    "parse_recipe",
]


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
