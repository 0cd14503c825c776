"""Small helpers over a module tree, shared by inject and models (they build only on layers and errors)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from visionlora.errors import UnsupportedModuleError
from visionlora.layers import LoraLayer, layer_kind

__all__ = ["adaptable_kind", "from_diffusers", "is_under", "iter_modules", "replace_module", "require_module"]


def from_diffusers(module: nn.Module) -> bool:
    """Whether ``module``'s class comes from diffusers (recognised by module path; diffusers is not imported)."""
    return type(module).__module__.startswith("diffusers.")


def require_module(model: object) -> None:
    """Raise :class:`UnsupportedModuleError` unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModuleError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def is_under(name: str, roots: set[str]) -> bool:
    """Whether module ``name`` is one of ``roots`` or lies inside one of them."""
    return any(name == r or name.startswith(r + ".") for r in roots)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def iter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) below ``model``, every path of a shared module included, LoRA layers' insides hidden.

    Raises:
        UnsupportedModuleError: if ``model`` is not an ``nn.Module``.
    """
    require_module(model)

    def walk(module: nn.Module, prefix: str, ancestors: frozenset[int]) -> Iterator[tuple[str, nn.Module]]:
        for child_name, child in module._modules.items():  # named_children() would hide a second path
            if child is None or id(child) in ancestors:  # a module that contains itself: no new names
                continue
            name = f"{prefix}.{child_name}" if prefix else child_name
            yield name, child
            if not isinstance(child, LoraLayer):
                yield from walk(child, name, ancestors | {id(child)})

    return walk(model, "", frozenset({id(model)}))


# Parents that read their children's weights directly (fused or fast paths) instead of calling them.
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def adaptable_kind(name: str, module: nn.Module, by_name: dict[str, nn.Module]) -> str | None:
    """The layer kind of ``module`` if visionlora can adapt it where it sits in the model, else None."""
    parent = by_name.get(name.rpartition(".")[0]) if "." in name else None
    if isinstance(parent, _READS_CHILD_WEIGHTS):
        return None
    return layer_kind(module)
