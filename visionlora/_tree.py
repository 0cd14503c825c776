"""Small helpers over a module tree: names, replacement, and which layers can be adapted where they sit."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from torch import nn

from visionlora.errors import TargetError, UnsupportedModuleError
from visionlora.layers import LoraLayer, base_layer, layer_kind

__all__ = [
    "adaptable_kind",
    "check_placement",
    "from_diffusers",
    "is_under",
    "iter_modules",
    "replace_module",
    "require_module",
]


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


def check_placement(model: nn.Module, selected: dict[str, nn.Module]) -> None:
    """Refuse selected layers that lie inside another selected one, that are the same module object as
    another path of the model, or whose weight is tied to another parameter.

    Raises:
        TargetError: naming the layer and the other path or parameter.
    """
    paths: defaultdict[int, list[str]] = defaultdict(list)
    for name, module in iter_modules(model):
        paths[id(module)].append(name)
    owners: defaultdict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)].append(name)
    for name, module in selected.items():
        outer = [o for o in selected if name.startswith(o + ".")]
        if outer:
            raise TargetError(f"{name!r} lies inside {outer[0]!r}, which is adapted too; adapt one of them")
        others = [p for p in paths[id(module)] if p != name]
        if others:
            raise TargetError(
                f"{name!r} is the same module object as {others[0]!r}; a shared module cannot be adapted "
                "under one name only (the other path would run without the adapter)"
            )
        weight = base_layer(module).weight
        if len(owners[id(weight)]) > 1:
            tied = [o for o in owners[id(weight)] if not o.startswith(name + ".")] or owners[id(weight)]
            raise TargetError(
                f"{name!r}: its weight is tied to {tied[-1]!r}; merging would change both, so tied weights "
                "cannot be adapted"
            )
