"""visionlora: LoRA for vision models, exact on every conv configuration.

Example:
    >>> import torchvision, visionlora as vl
    >>> model = vl.apply_lora(torchvision.models.resnet50(), vl.LoraConfig(targets="layer4.*", rank=4))
"""

from visionlora.adapters import (
    active_adapters,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    list_adapters,
    set_adapter,
)
from visionlora.classify import ClassifierInfo, evaluate, load_classifier, predict
from visionlora.config import LoraConfig
from visionlora.errors import (
    AdapterError,
    AdapterFileError,
    ConfigError,
    MergeError,
    MissingDependencyError,
    TargetError,
    TrainingError,
    UnsupportedModuleError,
    VisionLoraError,
)
from visionlora.extract import ResizedLayer, extract_lora, resize_adapter
from visionlora.growth import current_ranks, end_schedules, grow_ranks
from visionlora.inject import Match, apply_lora, match_targets
from visionlora.io import (
    AdapterFile,
    export_adapter,
    export_merged,
    load_adapter,
    merged_state_dict,
    read_adapter,
    save_adapter,
)
from visionlora.layers import LoraConv, LoraLayer, LoraLinear
from visionlora.merge import merge, merge_and_unload, unmerge
from visionlora.models import expand_preset, fitting_presets, replace_head
from visionlora.prefix import FrozenSplit, split_frozen_prefix
from visionlora.quantize import dequantize_base, quantize_base
from visionlora.summary import summary

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "AdapterFile",
    "AdapterFileError",
    "ClassifierInfo",
    "ConfigError",
    "FrozenSplit",
    "LoraConfig",
    "LoraConv",
    "LoraLayer",
    "LoraLinear",
    "Match",
    "MergeError",
    "MissingDependencyError",
    "ResizedLayer",
    "TargetError",
    "TrainingError",
    "UnsupportedModuleError",
    "VisionLoraError",
    "active_adapters",
    "apply_lora",
    "current_ranks",
    "delete_adapter",
    "dequantize_base",
    "disable_adapters",
    "enable_adapters",
    "end_schedules",
    "evaluate",
    "expand_preset",
    "export_adapter",
    "export_merged",
    "extract_lora",
    "fitting_presets",
    "grow_ranks",
    "list_adapters",
    "load_adapter",
    "load_classifier",
    "match_targets",
    "merge",
    "merge_and_unload",
    "merged_state_dict",
    "predict",
    "quantize_base",
    "read_adapter",
    "replace_head",
    "resize_adapter",
    "save_adapter",
    "set_adapter",
    "split_frozen_prefix",
    "summary",
    "unmerge",
]
