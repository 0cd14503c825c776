"""Model presets (named target selections per family) and classifier-head replacement."""

from visionlora.models.heads import classifier_name, replace_head
from visionlora.models.presets import PRESETS, expand_preset, fitting_presets

__all__ = ["PRESETS", "classifier_name", "expand_preset", "fitting_presets", "replace_head"]
