"""What the PEFT, diffusers and kohya converters share: scales, pattern lookups, refusals, the kept record.

Every converter maps between a file and one in-memory :class:`~visionlora.io.adapter.AdapterFile`
with canonical tensor names (``<module>.lora_A.weight`` / ``.lora_B.weight``). An export also keeps
the full visionlora record in the file's header (format ``visionlora.export``), so reading the file
back gives the original config, ranks, alphas and resolutions unchanged even where the other
format had to fold the scale into B.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from visionlora.branches import adapter_tensors, split_adapter_key
from visionlora.config import MAX_RANK, LoraConfig, is_finite_number
from visionlora.io.adapter import (
    EXPORT_FORMAT,
    META_KEY,
    AdapterFile,
    Geometry,
    LayerSpec,
    check_tensors,
    file_error,
    parse_record,
    record_metadata,
)
from visionlora.io.lycoris import family_of, family_rank, full_kron, missing_parts, scale_key
from visionlora.lora_math import lora_scale
from visionlora.models.loading import DENOISERS

__all__ = [
    "COMPONENTS",
    "DENOISERS",
    "KINDS_BY_NDIM",
    "anchored",
    "check_patterns",
    "exact_regex",
    "export_header",
    "foreign_record",
    "header_json",
    "kept_key",
    "kept_record",
    "layer_scale",
    "most_common",
    "pattern_value",
    "require_exportable",
    "scalar_alpha",
    "unmappable",
]

KINDS_BY_NDIM = {2: "Linear", 3: "Conv1d", 4: "Conv2d", 5: "Conv3d"}
KINDS_BY_NDIM_INV = {kind: ndim for ndim, kind in KINDS_BY_NDIM.items()}
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
"""The pipeline parts a diffusers or kohya LoRA file can hold; ``unet`` also names the one model of
a one-model format."""
_SAME_SCALE = 1e-6  # relative: alphas stored as float32 round-trip within this


def layer_scale(file: AdapterFile, name: str) -> float:
    """The multiplier of layer ``name``'s B·A in ``file``."""
    spec = file.layers[name]
    return lora_scale(spec.alpha, spec.rank, file.config.rslora)


def most_common(values: Iterable[Any]) -> Any:
    """The most frequent value; ties go to the smallest, so the choice does not depend on order."""
    counts = collections.Counter(values)
    top = max(counts.values())
    return min(v for v, c in counts.items() if c == top)


def anchored(name: str) -> str:
    """A PEFT pattern key that matches module ``name`` and nothing that merely ends with it."""
    return f"^{re.escape(name)}$"


def exact_regex(names: Iterable[str]) -> str:
    """A regex that fully matches exactly these module names (PEFT's string ``target_modules``)."""
    return "^(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


_MAX_PATTERNS = 10_000
_MAX_PATTERN_CHARS = 1_000


def check_patterns(path: Path, patterns: Any, what: str) -> None:
    """Refuse a rank/alpha pattern mapping from a file whose regexes could take hours to match.

    Python's ``re`` backtracks: a quantified group such as ``(.|..)*x`` takes exponential time and
    k quantifiers in a row take n^k on an n-character module name, and a file can hold thousands of
    keys. PEFT itself writes module names and simple patterns, which pass.
    """
    if not isinstance(patterns, Mapping):
        raise file_error(path, f"{what} is not a mapping of pattern -> value")
    if len(patterns) > _MAX_PATTERNS:
        raise file_error(path, f"{what} has {len(patterns)} patterns; visionlora reads up to {_MAX_PATTERNS}")
    for key in patterns:
        if not isinstance(key, str) or not _quick_regex(key):
            shown = repr(key) if len(repr(key)) < 100 else repr(key)[:97] + "..."
            raise file_error(
                path,
                f"{what} key {shown} is not a pattern visionlora matches: at most {_MAX_PATTERN_CHARS} "
                "characters, no quantified group such as '(...)*', and at most two of '*', '+', '{'",
            )


def _quick_regex(pattern: str) -> bool:
    """No quantified group and at most two unbounded quantifiers: matching a module name stays fast."""
    if len(pattern) > _MAX_PATTERN_CHARS:
        return False
    quantifiers, escaped, in_class, previous = 0, False, False, ""
    for char in pattern:
        if escaped or (in_class and char != "]"):
            escaped, previous = False, "x"
        elif char == "\\":
            escaped = True
        elif char == "[":
            in_class = True
        elif char == "]":
            in_class, previous = False, "x"
        else:
            if char in "*+{":
                if previous == ")":
                    return False
                quantifiers += 1
            previous = char
    return quantifiers <= 2


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of ``name``."""
    for key, value in patterns.items():
        if not isinstance(key, str):
            continue
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except (re.error, RecursionError, OverflowError):  # not a regex PEFT could have written either
            continue
    return default


def scalar_alpha(path: Path, key: str, tensor: torch.Tensor) -> float:
    """The value of a one-element ``.alpha`` tensor; other shapes and bool/complex dtypes are refused by name."""
    if tensor.numel() != 1 or tensor.dtype == torch.bool or tensor.is_complex():
        raise file_error(path, f"{key} is a {tensor.dtype} tensor of shape {tuple(tensor.shape)}, not a real scalar")
    return float(tensor.double().item())


def unmappable(path: Path, keys: Iterable[str], what: str, hint: str = "", known: Iterable[str] = ()) -> None:
    """Raise listing the tensor keys a converter cannot map, if there are any, with the nearest of
    the ``known`` names for each of the first few."""
    keys = sorted(keys)
    if keys:
        more = f" ... and {len(keys) - 20} more" if len(keys) > 20 else ""
        known = list(known)
        near = {k: difflib.get_close_matches(k, known, n=2, cutoff=0.5) for k in keys[:5]} if known else {}
        pairs = ", ".join(f"{k} -> {v}" for k, v in near.items() if v)
        nearest = f"; nearest names: {pairs}" if pairs else ""
        raise file_error(path, f"{len(keys)} keys cannot be mapped onto a {what}: {keys[:20]}{more}{hint}{nearest}")


def require_exportable(
    file: AdapterFile, format_name: str, *, lora_only: bool, families: Iterable[str] = ("lora", "dora")
) -> None:
    """Refuse, naming them, the layers (and tensors) that ``format_name`` would load differently or drop,
    and layers of a family other than ``families``."""
    families = tuple(families)
    other = sorted(n for n, s in file.layers.items() if s.family not in families)
    if other:
        family = file.layers[other[0]].family
        raise file_error(
            file.path,
            f"{other[0]!r} is a {family} adapter, which {format_name} files cannot hold here (they hold "
            f"{', '.join(families)}); {len(other)} such layers. "
            + (
                "kohya files hold LoRA only on Flux's and SD3's fused modules: export to 'diffusers' (DoRA) or "
                "keep the visionlora file"
                if format_name == "kohya"
                else "Export LoHa and LoKr to 'kohya' or keep the visionlora file"
            ),
        )
    problems = []
    for name, spec in file.layers.items():
        if spec.kind.startswith("ConvTranspose"):
            problems.append(f"{name}: a {spec.kind}, for which {format_name} has no LoRA layer")
            continue
        if spec.geometry is None:
            if spec.kind != "Linear":
                problems.append(f"{name}: no conv geometry recorded (file from an older visionlora; export the model)")
            continue
        reason = spec.geometry.foreign_problem()
        if reason is not None:
            problems.append(f"{name}: {reason}")
    if problems:
        raise file_error(
            file.path,
            f"{format_name} LoRA layers cannot run these layers the way visionlora does (they rebuild a conv "
            "from kernel size, stride and padding only): " + "; ".join(problems),
        )
    held = file.extra + file.buffers
    if lora_only and held:
        raise file_error(
            file.path,
            f"the {format_name} format holds LoRA weights only; this adapter also trains {held[:10]}"
            f"{' ...' if len(held) > 10 else ''} (export to 'peft' or keep the visionlora file)",
        )


def foreign_record(
    path: Path,
    format_name: str,
    tensors: dict[str, torch.Tensor],
    alphas: Mapping[str, float],
    *,
    extra: list[str] | None = None,
    rslora: bool = False,
    dropout: float = 0.0,
    bias: str = "none",
    trainable: list[str] | None = None,
    origins: Mapping[str, str] | None = None,
) -> AdapterFile:
    """The record for canonical ``tensors`` read from another tool's file, ranks taken from the shapes;
    ``origins``: each layer's key stem in the file (see :attr:`AdapterFile.origins`). A layer's family
    follows from its tensors' names (:func:`~visionlora.io.lycoris.family_of`)."""
    layers: dict[str, LayerSpec] = {}
    held_in_full = set(extra or [])
    grouped = adapter_tensors({k: v for k, v in tensors.items() if k not in held_in_full})
    if not grouped:
        raise file_error(path, f"no LoRA layers found in this {format_name} file")
    for name, group in sorted(grouped.items()):
        family = family_of(group)
        if family in ("lora", "dora"):
            a, b = group.get("lora_A.weight"), group.get("lora_B.weight")
            if a is None or b is None:
                raise file_error(path, f"layer {name!r} has only one of its two LoRA matrices")
            kind = KINDS_BY_NDIM.get(a.ndim)
            rank = a.shape[0] if kind is not None else 0  # a scalar or vector A has no rank to read
            if kind is None or b.ndim != a.ndim or b.shape[1] != rank or not 1 <= rank <= MAX_RANK:
                raise file_error(
                    path,
                    f"layer {name!r}: LoRA matrices of shapes {tuple(a.shape)} and {tuple(b.shape)} do not pair up",
                )
        elif family is None:
            raise file_error(path, f"layer {name!r}: {sorted(group)} without LoRA, LoHa or LoKr factors")
        else:
            missing = missing_parts(family, group)
            if missing:
                raise file_error(path, f"layer {name!r}: a {family} module needs {missing}; it has {sorted(group)}")
            rank = family_rank(family, group) or 0
            if not 1 <= rank <= MAX_RANK:
                raise file_error(
                    path, f"layer {name!r}: {family} tensors {sorted(group)} show no rank in [1, {MAX_RANK}]"
                )
            # A 2-D factor does not say whether the kernel was a conv's: the model settles the kind on load.
            ndim = max(t.ndim for n, t in group.items() if n != "magnitude")
            kind = KINDS_BY_NDIM.get(ndim, "Linear")
        alpha = alphas.get(name, float(rank))
        if family == "lokr" and full_kron(group):
            alpha = float(rank)  # two full halves: scale 1, whatever the file's alpha
        if not is_finite_number(alpha) or alpha <= 0:
            raise file_error(path, f"layer {name!r}: alpha {alpha!r} is not a finite number > 0")
        # The tools that write these formats only build plain layers: no groups, dilation or padding modes.
        geometry = Geometry(dilation=(1,) * (KINDS_BY_NDIM_INV[kind] - 2))
        layers[name] = LayerSpec(kind, rank, float(alpha), None, geometry, family)
    check_tensors(path, tensors, [k for k in tensors if k.endswith("num_batches_tracked")])
    families = {s.family for s in layers.values()}
    config = LoraConfig(
        targets=["re:" + exact_regex(layers)[1:-1]],
        family=families.pop() if len(families) == 1 else "lora",
        family_pattern={}
        if len({s.family for s in layers.values()}) == 1
        else {n: s.family for n, s in layers.items()},
        rank=most_common(s.rank for s in layers.values()),
        alpha=most_common(s.alpha for s in layers.values()),
        rslora=rslora,
        dropout=dropout,
        bias=bias,  # type: ignore[arg-type]  # checked by LoraConfig
        trainable=trainable or [],
    )
    held = list(extra or [])
    buffers = [k for k in held if not tensors[k].is_floating_point()]  # parameters are never integer
    held = [k for k in held if k not in buffers]
    kept = {n: o for n, o in (origins or {}).items() if n in layers}
    return AdapterFile(path, "default", config, layers, held, buffers, tensors, format_name, origins=kept)


def header_json(path: Path, raw: str, key: str) -> Any:
    """The JSON value of header entry ``key`` (text ``raw``); a file error naming the entry if it is not JSON."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise file_error(path, f"the {key!r} header entry is not JSON") from None


def kept_key(component: str) -> str:
    """The header entry keeping ``component``'s record: ``visionlora``, or ``visionlora.text_encoder`` and so on."""
    return META_KEY if component in DENOISERS else f"{META_KEY}.{component}"


def kept_record(file: AdapterFile, header: Mapping[str, str]) -> AdapterFile:
    """``file`` with the visionlora record an export kept in ``header`` restored, B unfolded where needed.

    Without a kept record ``file`` is returned as is. A record that disagrees with the tensors
    (other layers, other ranks) is an error rather than a silent mix of the two.
    """
    key = kept_key(file.component)
    raw = header.get(key)
    if raw is None:
        return file
    meta = header_json(file.path, raw, key)
    listed: list[str] = []
    for key in ("extra", "buffers"):
        names = meta.get(key) if isinstance(meta, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise file_error(file.path, f"the kept visionlora record's {key!r} is not a list of tensor names")
        listed += names
    # PEFT also stores the untouched tensors of every modules_to_save module; the record lists what trained.
    kept_tensors = {k: v for k, v in file.tensors.items() if k in listed or split_adapter_key(k) is not None}
    kept = parse_record(file.path, raw, kept_tensors, EXPORT_FORMAT)
    grouped = adapter_tensors(kept_tensors)
    if set(kept.layers) != set(file.layers) or any(
        kept.layers[n].family != file.layers[n].family
        or (kept.layers[n].rank != file.layers[n].rank and not full_kron(grouped[n]))
        for n in file.layers
    ):
        raise file_error(file.path, "the kept visionlora record does not match the file's LoRA tensors")
    tensors = dict(kept_tensors)
    for name in file.layers:
        ratio = layer_scale(file, name) / layer_scale(kept, name)
        if abs(ratio - 1) > _SAME_SCALE:
            key = f"{name}.{scale_key(file.layers[name].family, grouped[name])}"
            tensors[key] = (tensors[key].double() * ratio).to(tensors[key].dtype)
            if not torch.isfinite(tensors[key]).all():  # a record whose alpha lies can overflow B here
                raise file_error(
                    file.path,
                    f"layer {name!r}: the kept visionlora record's scale differs from the file's by a factor "
                    f"of {ratio:g}, and B rescaled by it overflows {tensors[key].dtype}",
                )
    return dataclasses.replace(
        kept, tensors=tensors, format=file.format, component=file.component, origins=file.origins
    )


def export_header(file: AdapterFile) -> dict[str, str]:
    """The header entry that keeps ``file``'s full record inside an exported file."""
    return {kept_key(file.component): record_metadata(file, EXPORT_FORMAT)}
