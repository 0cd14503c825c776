"""Replacing a classifier head for a new number of classes."""

from __future__ import annotations

from torch import nn

from visionlora._tree import replace_module, require_module
from visionlora.errors import ConfigError, UnsupportedModuleError
from visionlora.models.presets import resnet_family

__all__ = ["classifier_names", "replace_head"]


def classifier_names(model: nn.Module) -> list[str]:
    """Module names of ``model``'s classification head(s) (distilled models have two).

    timm models name them in ``pretrained_cfg["classifier"]``; ResNet families in their preset
    description; otherwise the head is the last ``nn.Linear`` in module order (torchvision's heads),
    or without one the last 1×1 conv (SqueezeNet).

    Raises:
        UnsupportedModuleError: if no head can be found.
    """
    require_module(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    named = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(named, str):
        return [named]
    if isinstance(named, (list, tuple)) and named and all(isinstance(n, str) for n in named):
        return list(named)
    family = resnet_family(model)
    if family is not None:
        return [family.classifier]
    modules = list(model.named_modules())
    linears = [n for n, m in modules if isinstance(m, nn.Linear)]
    convs = [n for n, m in modules if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    if linears or convs:
        return [(linears or convs)[-1]]
    raise UnsupportedModuleError(f"{type(model).__name__}: no classifier head (nn.Linear or 1x1 conv) to replace")


def replace_head(model: nn.Module, num_classes: int) -> list[str]:
    """Give ``model`` freshly initialised head(s) with ``num_classes`` outputs; return their names.

    Put the names in ``LoraConfig.trainable`` so the new head trains in full and is saved with the
    adapter. timm models use their own ``reset_classifier``; a Linear or 1×1 conv head is rebuilt
    with the same input size.

    Raises:
        ConfigError: if ``num_classes`` is not an integer >= 1.

    Example:
        >>> heads = vl.replace_head(model, 10)
        >>> vl.apply_lora(model, vl.LoraConfig(targets="preset:resnet-last-blocks", trainable=heads))
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ConfigError(f"num_classes: {num_classes!r} is invalid; expected an integer >= 1")
    names = classifier_names(model)
    reset = getattr(model, "reset_classifier", None)
    if callable(reset):
        reset(num_classes)
        return names
    for name in names:
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
    return names
