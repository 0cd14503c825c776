"""Run a recipe: the task its ``task`` names, through the one training loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visionlora.train.classifier import ClassifierTask
from visionlora.train.diffusion import StyleTask
from visionlora.train.loop import run_loop
from visionlora.train.recipe import Recipe
from visionlora.train.task import Task

__all__ = ["TASKS", "run_recipe"]

TASKS: dict[str, type[Task]] = {"classifier": ClassifierTask, "diffusion-style": StyleTask}
"""Task class by recipe ``task`` (the same names as :data:`~visionlora.train.recipe.RECIPES`)."""


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
    task = TASKS[recipe.task](recipe)
    return run_loop(task, output=output, resume=resume, progress=progress, overwrite=overwrite)
