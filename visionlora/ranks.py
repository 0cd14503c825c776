"""Per-layer rank and alpha allocation.

Precedence, for each targeted layer and separately for ranks and alphas:

1. a key of ``rank_pattern`` / ``alpha_pattern`` equal to the layer's full name;
2. otherwise the first key, in the order written, whose pattern matches the name;
3. otherwise the config's ``rank`` / ``alpha``.

A key that selects none of the targeted layers is an error (it is almost always a typo).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

from visionlora.config import LoraConfig, pattern_matches
from visionlora.errors import TargetError

__all__ = ["allocate", "pattern_value"]

V = TypeVar("V", int, float)


def pattern_value(name: str, patterns: Mapping[str, V], default: V) -> V:
    """The value for module ``name``: exact key, else first matching pattern, else ``default``.

    Example:
        >>> pattern_value("layer4.0.conv1", {"layer4.*": 8, "layer4.0.conv1": 16}, 4)
        16
    """
    if name in patterns:
        return patterns[name]
    for pattern, value in patterns.items():
        if pattern_matches(pattern, name):
            return value
    return default


def allocate(names: Sequence[str], cfg: LoraConfig) -> dict[str, tuple[int, float]]:
    """Rank and alpha for each targeted layer name, by the precedence in this module's docstring.

    Raises:
        TargetError: if a ``rank_pattern`` or ``alpha_pattern`` key selects none of ``names``.
    """
    for field_name, patterns in (("rank_pattern", cfg.rank_pattern), ("alpha_pattern", cfg.alpha_pattern)):
        for pattern in patterns:
            if not any(pattern_matches(pattern, n) for n in names):
                raise TargetError(
                    f"{field_name} key {pattern!r} selects none of the {len(names)} targeted layers "
                    f"(e.g. {', '.join(list(names)[:3])})"
                )
    return {
        n: (pattern_value(n, cfg.rank_pattern, cfg.rank), pattern_value(n, cfg.alpha_pattern, cfg.alpha)) for n in names
    }
