"""Configuration dataclasses, the strict dict loader they share, and the target-name grammar.

A config is a dataclass; ``from_dict`` maps a plain dict (from YAML or JSON) onto it one to
one, rejecting unknown keys with the closest valid name and checking every value's type.

Target names follow one grammar:

- a glob over full module names (``layer4.*``, ``*.to_q``, ``0``), matched case-sensitively,
  where ``*`` also crosses dots;
- ``re:<regex>``, a regular expression that must match the whole module name.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import numbers
import re
import reprlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch

from visionlora.errors import ConfigError

__all__ = [
    "DTYPES",
    "FAMILIES",
    "LAYER_KINDS",
    "MAX_RANK",
    "DtypeName",
    "Family",
    "LoraConfig",
    "config_from_dict",
    "config_to_dict",
    "is_exact_name",
    "is_finite_number",
    "pattern_matches",
    "schedule_in_fractions",
    "short_repr",
]

LayerKind = Literal["Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]
LAYER_KINDS: tuple[LayerKind, ...] = typing.get_args(LayerKind)

Family = Literal["lora", "dora", "loha", "lokr"]
"""An adapter family: LoRA, DoRA (LoRA plus a learned magnitude), LoHa, LoKr (see visionlora.family_math)."""
FAMILIES: tuple[Family, ...] = typing.get_args(Family)

DtypeName = Literal["fp32", "fp16", "bf16"]
"""How recipes and the command line name the dtype of written weights."""
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""Each :data:`DtypeName` as a torch dtype."""

_GLOB_CHARS = frozenset("*?[")


def is_finite_number(value: object) -> bool:
    """A real number (not a bool) whose float value is finite; huge ints that overflow are not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def is_exact_name(pattern: str) -> bool:
    """True when ``pattern`` names one module literally (no glob characters, no ``re:``)."""
    return not pattern.startswith("re:") and not (_GLOB_CHARS & set(pattern))


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether a target pattern selects the module called ``name``.

    Example:
        >>> pattern_matches("layer4.*", "layer4.0.conv1"), pattern_matches("re:fc|head", "fc")
        (True, True)
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _check_pattern(pattern: str, where: str) -> None:
    if not pattern:
        raise ConfigError(f"{where}: empty pattern; use a module name, a glob such as 'layer4.*', or 're:<regex>'")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        # Deep nesting overflows the regex parser's recursion and huge repeat counts overflow a C int.
        except (re.error, RecursionError, OverflowError) as exc:
            raise ConfigError(
                f"{where}: {short_repr(pattern)} is not a valid regular expression: {short_repr(str(exc))}"
            ) from None


@dataclass
class LoraConfig:
    """Which layers get LoRA, at what rank and scale, and what else trains with them.

    Example:
        >>> cfg = LoraConfig(targets=["layer4.*"], rank=4, alpha=8, rank_pattern={"layer4.0.*": 16})
    """

    targets: str | list[str]
    """Module name patterns to adapt: globs over full names, or ``re:<regex>``."""
    rank: int = 8
    """Rank r of every adapter unless ``rank_pattern`` says otherwise (r >= 1)."""
    family: Family = "lora"
    """Adapter family of every target: ``lora``; ``dora`` (LoRA times a learned magnitude per output
    channel, Liu et al. 2024); ``loha`` (Hadamard product of two rank-r pairs); ``lokr`` (Kronecker
    product of a small and a rank-r matrix). LoHa and LoKr follow LyCORIS' definitions."""
    family_pattern: dict[str, Family] = field(default_factory=dict)
    """Per-layer families, pattern -> family, with the same precedence as ``rank_pattern``."""
    alpha: float = 8.0
    """Scale numerator: the branch is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-layer ranks, pattern -> rank. An exact module name wins, then the first matching pattern."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-layer alphas, pattern -> alpha, with the same precedence as ``rank_pattern``."""
    rank_by_resolution: dict[int, int] = field(default_factory=dict)
    """Rank from each layer's output feature-map size min(H, W), found by a probe forward pass:
    ``{32: 16, 0: 4}`` means >= 32 -> r=16, else r=4. Needs ``example_input`` in apply_lora."""
    rank_schedule: dict[float, int] = field(default_factory=dict)
    """Ranks that grow while training: ``{0: 2, 500: 8, 1000: 16}`` (from optimizer step 0, 500,
    1000) or ``{0: 2, 0.5: 16}`` (fractions of the run). Each layer follows it up to its own rank
    (``rank``, ``rank_pattern``, …: the final ranks), which it holds from the last entry on. The scale
    stays alpha / final rank throughout. Every step named must come before the run's last. LoRA and
    DoRA; {}: no schedule."""
    rank_budget: int | None = None
    """Total LoRA parameters (A and B) to spread over the targets, proportionally to resolution
    (with ``example_input``) or evenly; never exceeded. None: no budget."""
    target_types: list[LayerKind] = field(default_factory=lambda: list(LAYER_KINDS))
    """Layer types that wildcard patterns may select."""
    exclude: list[str] = field(default_factory=list)
    """Patterns of modules never to adapt, even when a target pattern selects them."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input during training (0 <= p < 1)."""
    conv_groups: Literal["per_group", "shared"] = "per_group"
    """Grouped convs: a rank-r pair per group, or one rank-r factorisation shared by all groups
    (r · (out + in/groups · k) parameters, the form that stays smaller than a depthwise conv)."""
    init: Literal["kaiming", "gaussian"] = "kaiming"
    """Initialisation of A: kaiming-uniform (as nn.Linear) or gaussian with std 1/r. B starts at zero."""
    rslora: bool = False
    """Scale by alpha / sqrt(r) instead of alpha / r (rank-stabilised LoRA)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train: none, every bias in the model, or the biases of adapted layers."""
    trainable: list[str] = field(default_factory=list)
    """Patterns of modules trained in full (e.g. a new classifier head) and saved with the adapter."""
    lokr_factor: int = -1
    """LoKr: split channels as factor × rest (-1: the split closest to square), as LyCORIS' ``factor``."""
    decompose_both: bool = False
    """LoKr: the small Kronecker half is a rank-r product too (where r < half its size), as LyCORIS'."""
    tucker: bool = False
    """LoHa and LoKr on convs with a spatial kernel: a Tucker core (r × r × kernel) per rank-r product
    instead of the kernel flattened into the factors (LyCORIS' ``use_tucker``)."""

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        _check_fields(self)
        self.alpha = float(self.alpha)
        self.alpha_pattern = {k: float(v) for k, v in self.alpha_pattern.items()}
        if not self.targets:
            raise ConfigError("targets: empty; give at least one module name or pattern such as 'layer4.*'")
        for name in ("targets", "exclude", "trainable"):
            for pattern in getattr(self, name):
                _check_pattern(pattern, name)
        for pattern in (*self.rank_pattern, *self.alpha_pattern):
            _check_pattern(pattern, "rank_pattern/alpha_pattern")
        _check_rank(self.rank, "rank")
        for pattern, rank in self.rank_pattern.items():
            _check_rank(rank, f"rank_pattern[{pattern!r}]")
        _check_alpha(self.alpha, "alpha")
        for pattern, alpha in self.alpha_pattern.items():
            _check_alpha(alpha, f"alpha_pattern[{pattern!r}]")
        for threshold, rank in self.rank_by_resolution.items():
            if threshold < 0:
                raise ConfigError(f"rank_by_resolution: threshold {threshold} is negative; thresholds are sizes >= 0")
            _check_rank(rank, f"rank_by_resolution[{threshold}]")
        _check_schedule(self)
        if self.rank_budget is not None and self.rank_budget < 1:
            raise ConfigError(f"rank_budget: {self.rank_budget} is invalid; a budget is a parameter count >= 1")
        if self.rank_budget is not None and self.rank_by_resolution:
            raise ConfigError("rank_budget and rank_by_resolution are two rules for the same ranks; set one of them")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: {self.dropout} is out of range; expected 0 <= dropout < 1")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise ConfigError(f"lokr_factor: {self.lokr_factor} is invalid; use -1 (automatic) or an integer >= 1")
        for pattern in self.family_pattern:
            _check_pattern(pattern, "family_pattern")
        if not self.target_types:
            raise ConfigError(f"target_types: empty; choose from {list(LAYER_KINDS)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON/YAML safe) that ``from_dict`` reads back to an equal config."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        """Build from a plain dict; unknown keys and wrong types raise :class:`ConfigError`."""
        return config_from_dict(cls, data)


MAX_RANK = 1 << 16
"""Largest rank visionlora accepts (in configs and in files)."""


def _check_rank(rank: int, where: str) -> None:
    if not 1 <= rank <= MAX_RANK:
        raise ConfigError(f"{where}: rank {rank} is invalid; ranks are integers from 1 to {MAX_RANK}")


def schedule_in_fractions(schedule: Mapping[float, int]) -> bool:
    """Whether a rank schedule's keys are fractions of the run (some key is not a whole number), not steps."""
    return any(isinstance(k, float) and not k.is_integer() for k in schedule)


def _check_schedule(cfg: LoraConfig) -> None:
    schedule = cfg.rank_schedule
    if not schedule:
        return
    where = f"rank_schedule {short_repr(schedule)}"
    if not all(is_finite_number(k) and k >= 0 for k in schedule):
        raise ConfigError(f"{where}: keys are optimizer steps (integers >= 0) or fractions of the run (0 <= f < 1)")
    if schedule_in_fractions(schedule) and max(schedule) >= 1:
        if any(isinstance(k, float) and not k.is_integer() and k > 1 for k in schedule):
            raise ConfigError(f"{where}: a key above 1 is a step, a whole number; fractions of the run are below 1")
        raise ConfigError(
            f"{where}: mixes fractions of the run with steps; use steps ({{0: 2, 500: 16}}) or fractions below 1 "
            "({0: 2, 0.5: 16})"
        )
    if 0 not in schedule:
        raise ConfigError(f"{where}: no entry for 0, the rank training starts at; add one such as 0: 2")
    ranks = [schedule[k] for k in sorted(schedule)]
    for key, rank in schedule.items():
        _check_rank(rank, f"rank_schedule[{key}]")
    if ranks != sorted(ranks):
        raise ConfigError(f"{where}: ranks shrink from one entry to the next; a schedule only grows them")
    families = {cfg.family, *cfg.family_pattern.values()} - {"lora", "dora"}
    if families:
        raise ConfigError(
            f"{where}: grows LoRA and DoRA adapters; {'/'.join(sorted(families))} (family or family_pattern) "
            "have no rank schedule"
        )


def _check_alpha(alpha: float, where: str) -> None:
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"{where}: alpha {alpha} is invalid; alpha is a finite number > 0")


# ---------------------------------------------------------------------------------------------
# Strict dict <-> dataclass mapping, shared by every config in visionlora (recipes included).

C = TypeVar("C")


def config_to_dict(obj: Any) -> Any:
    """A dataclass (recursively) as plain dicts, lists and scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: config_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: config_to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [config_to_dict(v) for v in obj]
    return obj


def config_from_dict(cls: type[C], data: Mapping[str, Any], path: str = "") -> C:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and checking types.

    Args:
        cls: The dataclass to build; nested dataclass fields take nested mappings.
        data: Plain mapping, e.g. parsed YAML.
        path: Key path of ``data`` inside a larger document, used in error messages.

    Raises:
        ConfigError: naming the full key path, and for unknown keys the closest valid one.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key{hint} Valid keys: {', '.join(names)}")
        hint_type = hints[key]
        nested = _nested_dataclass(hint_type)
        if nested is not None and value is not None:
            kwargs[key] = config_from_dict(nested, value, where)
        else:
            value = _int_keys_from_json(value, hint_type)
            _check_type(value, hint_type, where)
            kwargs[key] = value
    missing = [
        f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data
    ]
    if missing:
        raise ConfigError(f"{path or cls.__name__}: missing required key(s) {', '.join(missing)}")
    return cls(**kwargs)


def _nested_dataclass(tp: Any) -> Any:
    """The dataclass a field of type ``tp`` holds (``C`` or ``C | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        classes = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(classes) == 1 and dataclasses.is_dataclass(classes[0]):
            return classes[0]
    return None


def _int_keys_from_json(value: Any, tp: Any) -> Any:
    """JSON object keys are strings: read number keys back (``"500"`` -> 500; ``"0.5"`` -> 0.5 for float keys)."""
    key_type = typing.get_args(tp)[0] if typing.get_origin(tp) is dict else None
    if key_type not in (int, float) or not isinstance(value, dict):
        return value
    return {_number_key(k, key_type is float): v for k, v in value.items()}


def _number_key(key: Any, fractional: bool) -> Any:
    whole = _decimal(key)
    if whole is not key or not fractional or not isinstance(key, str) or not re.fullmatch(r"[0-9.eE+-]{1,40}", key):
        return whole
    try:
        return float(key)
    except ValueError:
        return key


def _decimal(key: Any) -> Any:
    """``key`` as an int if it is a decimal string Python converts (up to 4300 digits), else unchanged."""
    if isinstance(key, str) and key.isdecimal():
        try:
            return int(key)
        except ValueError:  # over sys.get_int_max_str_digits(): the type check then names the key
            return key
    return key


def _check_fields(obj: Any) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if not dataclasses.is_dataclass(hints[f.name]):
            _check_type(getattr(obj, f.name), hints[f.name], f.name)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_describe(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _converts(value: float) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def short_repr(value: Any) -> str:
    """A repr short enough for an error message, however large or deep ``value`` is (a YAML alias bomb, say)."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = 120
    short.maxlevel, short.maxlist, short.maxdict = 3, 8, 8
    return short.repr(value)


def _check_type(value: Any, tp: Any, where: str) -> None:
    if not _type_ok(value, tp):
        raise ConfigError(f"{where}: expected {_describe(tp)}, got {type(value).__name__} {short_repr(value)}")


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_type_ok(k, args[0]) and _type_ok(v, args[1]) for k, v in value.items())
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # ints are fine; NaN passes here and is refused by the range checks
        return isinstance(value, (int, float)) and not isinstance(value, bool) and _converts(value)
    return isinstance(value, tp)
