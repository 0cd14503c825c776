"""Small helpers over a module tree, shared by inject and models (imports nothing from visionlora but errors)."""

from __future__ import annotations

from torch import nn

from visionlora.errors import UnsupportedModuleError

__all__ = ["replace_module", "require_module"]


def require_module(model: object) -> None:
    """Raise :class:`UnsupportedModuleError` unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModuleError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
