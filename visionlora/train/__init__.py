"""Training recipes: YAML in, trained adapter + merged checkpoint + report out (``visionlora train``)."""

from visionlora.train.recipe import ClassifierRecipe, dump_recipe, load_recipe
from visionlora.train.run import run_recipe

__all__ = ["ClassifierRecipe", "dump_recipe", "load_recipe", "run_recipe"]
