"""Exception classes raised by visionlora.

Each one also subclasses the matching builtin, so callers can catch either
(``except vl.TargetError`` or ``except ValueError``).
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "AdapterFileError",
    "ConfigError",
    "MergeError",
    "MissingDependencyError",
    "TargetError",
    "TrainingError",
    "UnsupportedModuleError",
    "VisionLoraError",
]


class VisionLoraError(Exception):
    """Base class of every error visionlora raises on purpose."""


class ConfigError(VisionLoraError, ValueError):
    """A configuration field has an unknown name, a wrong type or a value out of range."""


class TargetError(VisionLoraError, ValueError):
    """A target pattern selects nothing usable, or selects a layer twice."""


class UnsupportedModuleError(VisionLoraError, TypeError):
    """A module was named for adaptation but visionlora cannot adapt its type."""


class AdapterError(VisionLoraError, ValueError):
    """A named adapter is unknown, already present, or in the wrong state for the call."""


class AdapterFileError(VisionLoraError, ValueError):
    """An adapter file is unreadable, malformed, or does not fit the model; or an output cannot be
    written where asked (it exists, or the write failed, e.g. no space left)."""


class MergeError(VisionLoraError, ValueError):
    """Merging would write non-finite values into a weight."""


class TrainingError(VisionLoraError, RuntimeError):
    """A training run cannot go on: too many non-finite steps in a row, or its output folder is in use."""


class MissingDependencyError(VisionLoraError, ImportError):
    """An optional package that the call needs is not installed; the message says how to install it."""
