"""Run a recipe, whatever its task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visionlora.train.lock import claim_output
from visionlora.train.loop import is_main_process
from visionlora.train.recipe import ClassifierRecipe, Recipe

__all__ = ["run_recipe"]


def run_recipe(
    recipe: Recipe,
    *,
    output: str | Path | None = None,
    resume: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train ``recipe`` (see :mod:`visionlora.train.recipe`) and return its final metrics.

    The run holds its output folder (``output`` or ``recipe.output.dir``) while it trains, so a
    second run pointed at the same folder is refused (see :mod:`visionlora.train.lock`). A fresh
    run (no ``resume``) in a folder with an earlier run's results is refused unless ``overwrite``.

    Raises:
        TrainingError: another run holds the folder, or too many steps in a row had NaN/Inf.
        ConfigError: the folder holds an earlier run and neither ``resume`` nor ``overwrite`` is given.

    Example:
        >>> metrics = vl.train.run_recipe(vl.train.load_recipe("recipes/classifier-resnet.yaml"))
    """
    out_dir = Path(output or recipe.output.dir)
    with claim_output(out_dir, main=is_main_process(), resume=resume, overwrite=overwrite):
        if isinstance(recipe, ClassifierRecipe):
            from visionlora.train.classifier import run_classifier

            return run_classifier(recipe, output=out_dir, resume=resume, progress=progress)
        from visionlora.train.diffusion import run_diffusion

        return run_diffusion(recipe, output=out_dir, resume=resume, progress=progress)
