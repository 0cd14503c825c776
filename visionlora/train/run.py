"""Run a recipe, whatever its task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visionlora.train.recipe import ClassifierRecipe, Recipe

__all__ = ["run_recipe"]


def run_recipe(
    recipe: Recipe, *, output: str | Path | None = None, resume: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train ``recipe`` (see :mod:`visionlora.train.recipe`) and return its final metrics.

    Example:
        >>> metrics = vl.train.run_recipe(vl.train.load_recipe("recipes/classifier-resnet.yaml"))
    """
    if isinstance(recipe, ClassifierRecipe):
        from visionlora.train.classifier import run_classifier

        return run_classifier(recipe, output=output, resume=resume, progress=progress)
    from visionlora.train.diffusion import run_diffusion

    return run_diffusion(recipe, output=output, resume=resume, progress=progress)
