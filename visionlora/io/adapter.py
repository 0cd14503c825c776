"""The visionlora adapter file: one safetensors file that describes itself.

Tensors:
    ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` for every adapted layer (layouts as in
    :mod:`visionlora.layers`), the full tensors of ``trainable`` modules and trained biases, and the
    buffers training changed (BatchNorm running statistics), under their names in the un-adapted
    model (``fc.weight``, ``layer4.0.bn1.running_mean``).

Metadata, one JSON document under the header key ``visionlora``::

    {"format": "visionlora.adapter", "format_version": 1, "adapter_name": "default",
     "config": {...LoraConfig...},
     "layers": {"layer4.0.conv1": {"kind": "Conv2d", "rank": 16, "alpha": 8.0, "resolution": 4,
                                   "geometry": {"groups": 1, "dilation": [1, 1], "padding_mode": "zeros",
                                                "custom_forward": false}}, ...},
     "extra": ["fc.bias", "fc.weight"],
     "buffers": ["layer4.0.bn1.running_mean", ...]}

``geometry`` (optional; files written before it existed lack it) records what other tools' LoRA
layers cannot reproduce, so an export from a file can refuse those layers by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionlora.branches import FAMILY_KEYS, REQUIRED_KEYS
from visionlora.config import FAMILIES, LAYER_KINDS, MAX_RANK, Family, LoraConfig, is_finite_number
from visionlora.errors import AdapterError, AdapterFileError, ConfigError
from visionlora.io.files import read_safetensors
from visionlora.layers import base_layer, layer_kind, transforms_weight_or_input
from visionlora.state import adapter_state, changed_buffers, check_adapter_name, extra_parameters, lora_layers

__all__ = [
    "AdapterFile",
    "Geometry",
    "LayerSpec",
    "Parts",
    "Payload",
    "Source",
    "adapter_record",
    "cast_tensors",
    "check_tensors",
    "geometry_of",
    "native_record",
    "native_tensors",
    "read_native",
    "require_finite",
]

FORMAT = "visionlora.adapter"
EXPORT_FORMAT = "visionlora.export"  # the same record, kept in the header of a file exported to another format
FORMAT_NAME = "visionlora"
FORMAT_VERSION = 1
META_KEY = "visionlora"
_MAX_METADATA_BYTES = 16 * 1024 * 1024
_MAX_RESOLUTION = 1 << 20
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Geometry:
    """How an adapted layer applies its weight, as far as other tools' LoRA layers need to know.

    PEFT, diffusers and kohya rebuild a conv's LoRA branch from kernel size, stride and padding
    only; a layer with groups, dilation, a padding mode other than zeros or a forward of its own
    (timm's StdConv2d, Conv2dSame) comes back different there.
    """

    groups: int = 1
    dilation: tuple[int, ...] = ()
    padding_mode: str = "zeros"
    custom_forward: bool = False

    def foreign_problem(self) -> str | None:
        """Why PEFT/diffusers/kohya would run this layer's LoRA differently, or None if they would not."""
        reasons = []
        if self.groups != 1:
            reasons.append(f"groups={self.groups}")
        if any(d != 1 for d in self.dilation):
            reasons.append(f"dilation={tuple(self.dilation)}")
        if self.padding_mode != "zeros":
            reasons.append(f"padding_mode={self.padding_mode!r}")
        if self.custom_forward:
            reasons.append("a forward of its own (weight standardisation or dynamic padding)")
        return ", ".join(reasons) or None


def geometry_of(module: nn.Module) -> Geometry:
    """The :class:`Geometry` of an adaptable layer (or of a LoRA layer's base)."""
    base = base_layer(module)
    custom = transforms_weight_or_input(base)
    if isinstance(base, nn.Linear):
        return Geometry(custom_forward=custom)
    conv: Any = base
    return Geometry(int(conv.groups), tuple(int(d) for d in conv.dilation), str(conv.padding_mode), custom)


@dataclass(frozen=True)
class LayerSpec:
    """What the file says about one adapted layer."""

    kind: str
    rank: int
    alpha: float
    resolution: int | None
    geometry: Geometry | None = None
    family: Family = "lora"
    """``lora``, ``dora``, ``loha`` or ``lokr``; the layer's tensors are :data:`FAMILY_KEYS` of it."""


@dataclass(frozen=True)
class AdapterFile:
    """A parsed, internally consistent adapter file (not yet checked against any model)."""

    path: Path
    adapter_name: str
    config: LoraConfig
    layers: dict[str, LayerSpec]
    extra: list[str]
    buffers: list[str]
    tensors: dict[str, torch.Tensor]
    format: str = FORMAT_NAME
    """The format the file was read from: ``visionlora``, ``peft``, ``diffusers`` or ``kohya``."""
    flat_names: bool = False
    """Layer names are kohya's flattened ones (``layer4_0_conv1``) until mapped onto a model."""
    component: str = "unet"
    """The pipeline part a diffusers or kohya file holds this adapter for (``unet``, ``transformer``,
    ``text_encoder``, ...); ``unet`` also stands for the one model of any other file."""
    origins: dict[str, str] = field(default_factory=dict)
    """Layer name -> the key stem in the file its tensors came from (``lora_unet_..._qkv`` for the
    q, k and v parts of a fused module); a layer not listed came from a key named as itself."""


@dataclass(frozen=True)
class Source:
    """An adapter path opened once: a folder (for a folder format), or a file with its tensors and header."""

    path: Path
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    header: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Parts:
    """What an export writes: a record per pipeline component (``unet`` also names the one model of a
    one-model format), the dtype of the written weights, and for PEFT the model's state dict."""

    records: dict[str, AdapterFile]
    dtype: torch.dtype | None = None
    model_state: dict[str, torch.Tensor] | None = None
    """The model's :func:`~visionlora.state.original_state_dict`, when exporting from a model."""
    header: Mapping[str, str] = field(default_factory=dict)
    """More header entries for the weights file (e.g. a classifier's class names); the format's own win."""


@dataclass(frozen=True)
class Payload:
    """What a format writes: tensors and header of its weights file, and text files beside it (a folder format)."""

    tensors: dict[str, torch.Tensor]
    header: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)


def adapter_record(model: nn.Module, path: Path, adapter_name: str = "default") -> AdapterFile:
    """Adapter ``adapter_name`` of ``model`` as an in-memory record (what :func:`save_adapter` writes)."""
    configs = adapter_state(model).configs
    if adapter_name not in configs:
        raise AdapterError(f"model has no adapter {adapter_name!r}; it has {list(configs) or 'none'}")
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, LayerSpec] = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.adapters:
            adapter = layer.adapter(adapter_name)
            tensors.update({f"{name}.{key}": t.detach() for key, t in adapter.tensors().items()})
            kind = layer_kind(layer.base) or ""
            spec = LayerSpec(kind, adapter.rank, adapter.alpha, adapter.resolution, geometry_of(layer), adapter.family)
            layers[name] = spec
    extra = {k: v.detach() for k, v in extra_parameters(model, adapter_name).items()}
    buffers = changed_buffers(model)
    tensors.update(extra)
    tensors.update(buffers)
    return AdapterFile(path, adapter_name, configs[adapter_name], layers, list(extra), sorted(buffers), tensors)


def record_metadata(file: AdapterFile, format_name: str = FORMAT) -> str:
    """The JSON document stored under the ``visionlora`` header key for ``file``."""
    meta = {
        "format": format_name,
        "format_version": FORMAT_VERSION,
        "adapter_name": file.adapter_name,
        "config": _config_to_dict(file.config),
        "layers": {name: _spec_to_dict(spec) for name, spec in file.layers.items()},
        "extra": list(file.extra),
        "buffers": list(file.buffers),
    }
    return json.dumps(meta)


_FAMILY_FIELDS = ("family", "family_pattern", "lokr_factor", "decompose_both", "tucker")


def _config_to_dict(config: LoraConfig) -> dict[str, Any]:
    """The stored config; the family fields only where they differ from LoRA's defaults, so that a LoRA
    file stays readable by visionlora versions before families."""
    out = config.to_dict()
    defaults = {f.name: f.default for f in dataclasses.fields(LoraConfig) if f.name in _FAMILY_FIELDS}
    for name in _FAMILY_FIELDS:
        if out[name] in (defaults[name], {}):
            del out[name]
    return out


def _spec_to_dict(spec: LayerSpec) -> dict[str, Any]:
    out = dataclasses.asdict(spec)
    if spec.family == "lora":  # LoRA files stay readable by versions before families
        del out["family"]
    if spec.geometry is None:
        del out["geometry"]
    else:
        out["geometry"]["dilation"] = list(spec.geometry.dilation)
    return out


def native_tensors(parts: Parts) -> Payload:
    """The visionlora file of ``parts``' one record: its tensors (cast to ``parts.dtype``) and its metadata."""
    (file,) = parts.records.values()
    return Payload(cast_tensors(file.tensors, parts.dtype), {META_KEY: record_metadata(file)})


def cast_tensors(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating tensors cast to ``dtype`` (integers kept); unchanged when ``dtype`` is None."""
    if dtype is None:
        return dict(tensors)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def require_finite(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors``, if every floating one is finite (after a cast to fp16, say); else an error naming them."""
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise file_error(path, f"nothing was written: NaN/Inf in {bad[:10]} (after a cast to fp16, an overflow?)")
    return tensors


def file_error(path: Path, problem: str) -> AdapterFileError:
    """An :class:`AdapterFileError` that names ``path``."""
    return AdapterFileError(f"{path}: {problem}")


def _parse_geometry(path: Path, name: str, raw: Any) -> Geometry:
    fields = {"groups", "dilation", "padding_mode", "custom_forward"}
    if not isinstance(raw, dict) or set(raw) != fields:
        raise file_error(path, f"layer {name!r}: geometry must have exactly {sorted(fields)}, got {raw!r}")
    groups, dilation, mode, custom = raw["groups"], raw["dilation"], raw["padding_mode"], raw["custom_forward"]
    ok = (
        isinstance(groups, int)
        and not isinstance(groups, bool)
        and groups >= 1
        and isinstance(dilation, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dilation)
        and isinstance(mode, str)
        and isinstance(custom, bool)
    )
    if not ok:
        raise file_error(path, f"layer {name!r}: geometry {raw!r} has a value of the wrong type")
    return Geometry(groups, tuple(dilation), mode, custom)


def _parse_layers(path: Path, raw: Any) -> dict[str, LayerSpec]:
    if not isinstance(raw, dict) or not raw:
        raise file_error(path, "metadata 'layers' must be a non-empty mapping of module name -> {kind, rank, alpha}")
    layers = {}
    required = {"kind", "rank", "alpha", "resolution"}
    for name, spec in raw.items():
        if not isinstance(spec, dict) or not required <= set(spec) <= required | {"geometry", "family"}:
            raise file_error(
                path,
                f"metadata for layer {name!r} must have kind, rank, alpha, resolution (and optionally geometry, "
                f"family), got {spec!r}",
            )
        family = spec.get("family", "lora")
        if family not in FAMILIES:
            raise file_error(path, f"layer {name!r}: family {family!r} is not one of {list(FAMILIES)}")
        kind, rank, alpha, resolution = spec["kind"], spec["rank"], spec["alpha"], spec["resolution"]
        if kind not in LAYER_KINDS:
            raise file_error(path, f"layer {name!r}: kind {kind!r} is not one of {list(LAYER_KINDS)}")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
            raise file_error(path, f"layer {name!r}: rank {rank!r} is not an integer in [1, {MAX_RANK}]")
        if not is_finite_number(alpha) or alpha <= 0:
            raise file_error(path, f"layer {name!r}: alpha {alpha!r} is not a finite number > 0")
        if resolution is not None and (
            not isinstance(resolution, int) or isinstance(resolution, bool) or not 0 <= resolution <= _MAX_RESOLUTION
        ):
            raise file_error(
                path, f"layer {name!r}: resolution {resolution!r} is not null or an integer in [0, {_MAX_RESOLUTION}]"
            )
        geometry = _parse_geometry(path, name, spec["geometry"]) if "geometry" in spec else None
        layers[name] = LayerSpec(kind, rank, float(alpha), resolution, geometry, family)
    return layers


def read_native(path: str | os.PathLike[str]) -> AdapterFile:
    """Read and check a visionlora adapter file on its own: header, config, keys, dtypes, finiteness.

    Raises:
        AdapterFileError: naming the file and what is wrong with it.
    """
    path = Path(path)
    return native_record(path, *read_safetensors(path))


def native_record(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> AdapterFile:
    """The checked record of a visionlora file whose tensors and header are already read (see :func:`read_native`)."""
    raw = header.get(META_KEY)
    if raw is None:
        raise file_error(path, f"no '{META_KEY}' metadata; this is not a visionlora adapter file")
    file = parse_record(path, raw, tensors, FORMAT)
    check_tensors(path, tensors, file.buffers)
    return file


def parse_record(path: Path, raw: str, tensors: dict[str, torch.Tensor], format_name: str) -> AdapterFile:
    """The record a ``visionlora`` metadata document describes, checked against the tensor names it lists."""
    if len(raw) > _MAX_METADATA_BYTES:
        raise file_error(path, f"metadata is {len(raw)} bytes, over the {_MAX_METADATA_BYTES} limit")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise file_error(path, f"metadata is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != format_name:
        raise file_error(path, f"metadata 'format' is not {format_name!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise file_error(
            path,
            f"format_version {meta.get('format_version')!r} is not supported (this visionlora reads {FORMAT_VERSION})",
        )
    name: Any = meta.get("adapter_name")
    try:
        check_adapter_name(name)
    except AdapterError as exc:
        raise file_error(path, f"metadata 'adapter_name': {exc}") from None
    try:
        config = LoraConfig.from_dict(meta.get("config"))  # type: ignore[arg-type]  # checked inside
    except ConfigError as exc:
        raise file_error(path, f"stored config is invalid: {exc}") from None
    layers = _parse_layers(path, meta.get("layers"))
    extra: Any = meta.get("extra")
    buffers: Any = meta.get("buffers")
    for field_name, names in (("extra", extra), ("buffers", buffers)):
        if not isinstance(names, list) or not all(isinstance(k, str) for k in names):
            raise file_error(path, f"metadata {field_name!r} must be a list of tensor names")
    expected = set(extra) | set(buffers)
    for n, spec in layers.items():
        held = {k[len(n) + 1 :] for k in tensors if k.startswith(n + ".")} & set(FAMILY_KEYS[spec.family])
        expected |= {f"{n}.{key}" for key in held | set(REQUIRED_KEYS[spec.family])}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise file_error(
            path, f"tensors do not match the metadata: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    return AdapterFile(path, name, config, layers, list(extra), list(buffers), tensors)


def check_tensors(path: Path, tensors: dict[str, torch.Tensor], integer_ok: list[str] | tuple[str, ...] = ()) -> None:
    """Every tensor is float16/bfloat16/float32/float64 and finite (integers only for ``integer_ok``)."""
    for key, tensor in tensors.items():
        floating = tensor.dtype in _DTYPES
        if not floating and (key not in integer_ok or tensor.is_floating_point() or tensor.is_complex()):
            raise file_error(
                path, f"tensor {key!r} has dtype {tensor.dtype}; expected one of float16/bfloat16/float32/float64"
            )
        if floating and not torch.isfinite(tensor).all():
            raise file_error(path, f"tensor {key!r} holds NaN or Inf")
