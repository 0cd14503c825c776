"""Every recipe key, with its type, default and meaning, as the README's table.

The meanings are the docstrings under the dataclass fields of :mod:`visionlora.train.recipe` (and
of :class:`~visionlora.LoraConfig`), so the table is written from the code: ``python -m
visionlora.train.keys`` prints it, and a test keeps the README's copy equal to it.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap
import types
import typing
from typing import Any, Literal, cast

from visionlora.train.recipe import RECIPES

__all__ = ["field_docs", "keys_table", "recipe_keys"]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (and of its dataclass bases), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = cast(ast.ClassDef, ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0])
        statements = body.body
        for node, after in itertools.pairwise(statements):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@dataclasses.dataclass(frozen=True)
class Key:
    """One recipe key as the table shows it."""

    key: str
    type: str
    default: str
    doc: str


def _nested(tp: Any) -> type | None:
    """The dataclass a field of type ``tp`` holds (``C`` or ``C | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp  # type: ignore[return-value]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        classes = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(classes) == 1 and dataclasses.is_dataclass(classes[0]):
            return classes[0]  # type: ignore[return-value]
    return None


def _type(tp: Any) -> str:
    """A YAML reader's name for type ``tp``: ``int``, ``'a' | 'b'``, ``list[str]``, ``null``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return ""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


def recipe_keys(recipe: type) -> list[Key]:
    """The keys of recipe class ``recipe`` in document order, sections included (a section type that
    appears twice, such as ``text_encoder_lora``'s LoraConfig, is expanded once)."""
    keys: list[Key] = []
    expanded: dict[type, str] = {}

    def walk(cls: type, prefix: str) -> None:
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            key, tp = prefix + f.name, hints[f.name]
            nested = _nested(tp)
            if nested is None:
                keys.append(Key(key, _type(tp), _default(f), docs.get(f.name, "")))
            elif nested in expanded:
                optional = " \\| null" if tp is not nested else ""
                keys.append(Key(key, f"the keys of `{expanded[nested]}`{optional}", _default(f), docs.get(f.name, "")))
            else:
                expanded[nested] = key
                keys.append(Key(key, "section", "", docs.get(f.name, "")))
                walk(nested, key + ".")

    walk(recipe, "")
    return keys


def keys_table() -> str:
    """The README's recipe-key tables: the keys every recipe has alike, then each task's own."""
    per_task = {task: recipe_keys(cls) for task, cls in RECIPES.items()}
    first = next(iter(per_task.values()))
    common = [k for k in first if all(k in keys for keys in per_task.values())]
    groups = [("Every recipe", common)]
    groups += [(f"`task: {task}`", [k for k in keys if k not in common]) for task, keys in per_task.items()]
    lines: list[str] = []
    for title, keys in groups:
        lines += [f"**{title}**", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        lines += [f"| `{k.key}` | {k.type} | {k.default} | {k.doc} |" for k in keys]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(keys_table(), end="")
