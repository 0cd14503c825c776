"""Replacing a classifier head for a new number of classes."""

from __future__ import annotations

from torch import nn

from visionlora._tree import replace_module, require_module
from visionlora.errors import UnsupportedModuleError
from visionlora.models.presets import resnet_family

__all__ = ["classifier_name", "replace_head"]


def classifier_name(model: nn.Module) -> str:
    """Module name of ``model``'s classification head.

    timm models name it in ``pretrained_cfg["classifier"]``; ResNet families in their preset
    description; otherwise it is the last ``nn.Linear`` in module order (torchvision's heads).

    Raises:
        UnsupportedModuleError: if no head can be found.
    """
    require_module(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if isinstance(cfg, dict) and isinstance(cfg.get("classifier"), str):
        return cfg["classifier"]
    family = resnet_family(model)
    if family is not None:
        return family.classifier
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UnsupportedModuleError(f"{type(model).__name__}: no classifier head (no nn.Linear) to replace")
    return linears[-1]


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Give ``model`` a freshly initialised head with ``num_classes`` outputs; return the head's name.

    Put the name in ``LoraConfig.trainable`` so the new head trains in full and is saved with the
    adapter. timm models use their own ``reset_classifier``; a Linear or 1×1 conv head is rebuilt
    with the same input size.

    Example:
        >>> head = vl.replace_head(model, 10)
        >>> vl.apply_lora(model, vl.LoraConfig(targets="preset:resnet-last-blocks", trainable=[head]))
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise UnsupportedModuleError(f"num_classes: {num_classes!r} is invalid; expected an integer >= 1")
    name = classifier_name(model)
    reset = getattr(model, "reset_classifier", None)
    if callable(reset):
        reset(num_classes)
        return name
    head = model.get_submodule(name)
    if isinstance(head, nn.Linear):
        new: nn.Module = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    elif isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1):
        new = nn.Conv2d(head.in_channels, num_classes, 1, bias=head.bias is not None)
    else:
        raise UnsupportedModuleError(
            f"{name!r} is a {type(head).__name__}; replace_head rebuilds Linear or 1x1 conv heads"
        )
    replace_module(model, name, new.to(device=head.weight.device, dtype=head.weight.dtype))
    return name
