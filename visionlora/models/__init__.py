"""Model presets (named target selections per family) and classifier-head replacement."""

from visionlora.models.heads import classifier_names, replace_head
from visionlora.models.presets import PRESETS, expand_preset, fitting_presets

__all__ = ["PRESETS", "classifier_names", "expand_preset", "fitting_presets", "replace_head"]
