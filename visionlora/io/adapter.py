"""The visionlora adapter file: one safetensors file that describes itself.

Tensors:
    ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` for every adapted layer (layouts as in
    :mod:`visionlora.layers`), the full tensors of ``trainable`` modules and trained biases, and the
    buffers training changed (BatchNorm running statistics), under their names in the un-adapted
    model (``fc.weight``, ``layer4.0.bn1.running_mean``).

Metadata, one JSON document under the header key ``visionlora``::

    {"format": "visionlora.adapter", "format_version": 1, "adapter_name": "default",
     "config": {...LoraConfig...},
     "layers": {"layer4.0.conv1": {"kind": "Conv2d", "rank": 16, "alpha": 8.0, "resolution": 4}, ...},
     "extra": ["fc.bias", "fc.weight"],
     "buffers": ["layer4.0.bn1.running_mean", ...]}
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionlora.config import LAYER_KINDS, MAX_RANK, LoraConfig, is_finite_number
from visionlora.errors import AdapterError, AdapterFileError, ConfigError, VisionLoraError
from visionlora.inject import (
    Match,
    activate,
    adaptable_kind,
    adapter_configs,
    add_adapters,
    changed_buffers,
    check_adapter_name,
    check_selected,
    check_wrappable,
    extra_parameters,
    iter_modules,
    lora_layers,
    mark_trainable,
    original_buffers,
    original_parameters,
    require_unmerged,
    snapshot_buffers,
)
from visionlora.io.files import read_safetensors, write_safetensors
from visionlora.layers import base_layer, layer_kind, lora_shapes

__all__ = ["AdapterFile", "LayerSpec", "load_adapter", "read_adapter", "save_adapter", "write_adapter"]

FORMAT = "visionlora.adapter"
FORMAT_VERSION = 1
META_KEY = "visionlora"
_MAX_METADATA_BYTES = 16 * 1024 * 1024
_MAX_RESOLUTION = 1 << 20
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LayerSpec:
    """What the file says about one adapted layer."""

    kind: str
    rank: int
    alpha: float
    resolution: int | None


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


def save_adapter(model: nn.Module, path: str | os.PathLike[str], *, adapter_name: str = "default") -> Path:
    """Write adapter ``adapter_name`` (LoRA weights + trainable modules and biases) to ``path``.

    Buffers that changed since LoRA was first added to the model (BatchNorm running statistics
    updated by training in train mode) are saved too, so the file reproduces the trained model
    on the base it was trained from. The write is atomic; the config and each layer's name,
    kind, rank and alpha go in the file's metadata. Returns the path.

    Example:
        >>> vl.save_adapter(model, "adapter.safetensors")
    """
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise AdapterError(f"model has no adapter {adapter_name!r}; it has {list(configs) or 'none'}")
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, LayerSpec] = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.adapters:
            adapter = layer.adapter(adapter_name)
            tensors[f"{name}.lora_A.weight"] = adapter.lora_A
            tensors[f"{name}.lora_B.weight"] = adapter.lora_B
            layers[name] = LayerSpec(layer_kind(layer.base) or "", adapter.rank, adapter.alpha, adapter.resolution)
    extra = extra_parameters(model, adapter_name)
    buffers = changed_buffers(model)
    tensors.update(extra)
    tensors.update(buffers)
    record = AdapterFile(Path(path), adapter_name, configs[adapter_name], layers, list(extra), sorted(buffers), tensors)
    return write_adapter(record)


def write_adapter(file: AdapterFile) -> Path:
    """Write an adapter record to ``file.path`` atomically, with its self-describing metadata."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter_name": file.adapter_name,
        "config": file.config.to_dict(),
        "layers": {name: dataclasses.asdict(spec) for name, spec in file.layers.items()},
        "extra": list(file.extra),
        "buffers": list(file.buffers),
    }
    return write_safetensors(file.path, file.tensors, {META_KEY: json.dumps(meta)})


def _fail(path: Path, problem: str) -> AdapterFileError:
    return AdapterFileError(f"{path}: {problem}")


def _parse_layers(path: Path, raw: Any) -> dict[str, LayerSpec]:
    if not isinstance(raw, dict) or not raw:
        raise _fail(path, "metadata 'layers' must be a non-empty mapping of module name -> {kind, rank, alpha}")
    layers = {}
    for name, spec in raw.items():
        if not isinstance(spec, dict) or set(spec) != {"kind", "rank", "alpha", "resolution"}:
            raise _fail(
                path, f"metadata for layer {name!r} must have exactly kind, rank, alpha and resolution, got {spec!r}"
            )
        kind, rank, alpha, resolution = spec["kind"], spec["rank"], spec["alpha"], spec["resolution"]
        if kind not in LAYER_KINDS:
            raise _fail(path, f"layer {name!r}: kind {kind!r} is not one of {list(LAYER_KINDS)}")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
            raise _fail(path, f"layer {name!r}: rank {rank!r} is not an integer in [1, {MAX_RANK}]")
        if not is_finite_number(alpha) or alpha <= 0:
            raise _fail(path, f"layer {name!r}: alpha {alpha!r} is not a finite number > 0")
        if resolution is not None and (
            not isinstance(resolution, int) or isinstance(resolution, bool) or not 0 <= resolution <= _MAX_RESOLUTION
        ):
            raise _fail(
                path, f"layer {name!r}: resolution {resolution!r} is not null or an integer in [0, {_MAX_RESOLUTION}]"
            )
        layers[name] = LayerSpec(kind, rank, float(alpha), resolution)
    return layers


def read_adapter(path: str | os.PathLike[str]) -> AdapterFile:
    """Read and check a visionlora adapter file on its own: header, config, keys, dtypes, finiteness.

    Raises:
        AdapterFileError: naming the file and what is wrong with it.
    """
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    raw = metadata.get(META_KEY)
    if raw is None:
        raise _fail(path, f"no '{META_KEY}' metadata; this is not a visionlora adapter file")
    if len(raw) > _MAX_METADATA_BYTES:
        raise _fail(path, f"metadata is {len(raw)} bytes, over the {_MAX_METADATA_BYTES} limit")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _fail(path, f"metadata is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _fail(path, f"metadata 'format' is not {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise _fail(
            path,
            f"format_version {meta.get('format_version')!r} is not supported (this visionlora reads {FORMAT_VERSION})",
        )
    name: Any = meta.get("adapter_name")
    try:
        check_adapter_name(name)
    except AdapterError as exc:
        raise _fail(path, f"metadata 'adapter_name': {exc}") from None
    try:
        config = LoraConfig.from_dict(meta.get("config"))  # type: ignore[arg-type]  # checked inside
    except ConfigError as exc:
        raise _fail(path, f"stored config is invalid: {exc}") from None
    layers = _parse_layers(path, meta.get("layers"))
    extra: Any = meta.get("extra")
    buffers: Any = meta.get("buffers")
    for field_name, names in (("extra", extra), ("buffers", buffers)):
        if not isinstance(names, list) or not all(isinstance(k, str) for k in names):
            raise _fail(path, f"metadata {field_name!r} must be a list of tensor names")
    expected = {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"} | set(extra) | set(buffers)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise _fail(path, f"tensors do not match the metadata: missing {missing[:10]}, unexpected {unexpected[:10]}")
    for key, tensor in tensors.items():
        floating = tensor.dtype in _DTYPES
        if not floating and (key not in buffers or tensor.is_floating_point() or tensor.is_complex()):
            raise _fail(
                path, f"tensor {key!r} has dtype {tensor.dtype}; expected one of float16/bfloat16/float32/float64"
            )
        if floating and not torch.isfinite(tensor).all():
            raise _fail(path, f"tensor {key!r} holds NaN or Inf")
    return AdapterFile(path, name, config, layers, list(extra), list(buffers), tensors)


def _fit(file: AdapterFile, model: nn.Module, adapter_name: str) -> list[Match]:
    """The matches the file describes in ``model``; every mismatch is collected and raised together."""
    modules = dict(iter_modules(model))
    problems: list[str] = []
    matches: list[Match] = []
    for name, spec in file.layers.items():
        module = modules.get(name)
        if module is None:
            problems.append(f"{name}: no such module in {type(model).__name__}")
            continue
        if adaptable_kind(name, module, modules) != spec.kind:
            problems.append(f"{name}: file has a {spec.kind} adapter, the model has a {type(module).__name__} there")
            continue
        base = base_layer(module)
        for key, shape in zip(
            (f"{name}.lora_A.weight", f"{name}.lora_B.weight"),
            lora_shapes(base, spec.rank, file.config.conv_groups),
            strict=True,
        ):
            if tuple(file.tensors[key].shape) != shape:
                problems.append(
                    f"{key}: shape {tuple(file.tensors[key].shape)} in the file, {shape} expected for rank {spec.rank}"
                )
        matches.append(Match(name, module, spec.kind, spec.rank, spec.alpha, spec.resolution))
    for keys, existing, what in (
        (file.extra, original_parameters(model), "parameter"),
        (file.buffers, original_buffers(model), "buffer"),
    ):
        for key in keys:
            if key not in existing:
                problems.append(f"{key}: no such {what} in {type(model).__name__}")
            elif existing[key].shape != file.tensors[key].shape:
                found, wanted = tuple(file.tensors[key].shape), tuple(existing[key].shape)
                problems.append(f"{key}: shape {found} in the file, {wanted} in the model")
            elif existing[key].is_floating_point() != file.tensors[key].is_floating_point():
                problems.append(
                    f"{key}: dtype {file.tensors[key].dtype} in the file, {existing[key].dtype} in the model"
                )
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise _fail(file.path, f"does not fit {type(model).__name__}:\n  " + "\n  ".join(problems[:20]) + more)
    return matches


def _leave_empty(a: torch.Tensor, rank: int, generator: torch.Generator | None = None) -> None:
    """An init that draws nothing, so loading leaves the caller's random stream untouched."""


def load_adapter(model: nn.Module, path: str | os.PathLike[str], *, adapter_name: str | None = None) -> nn.Module:
    """Add the adapter stored in ``path`` to ``model`` (in place) and make it the active one.

    Every key, shape, dtype and value is checked before anything changes: on any error the model
    is left exactly as it was. Trainability is set as :func:`visionlora.apply_lora` sets it.

    Args:
        model: A model of the architecture the adapter was trained on (no LoRA needed).
        path: A file written by :func:`save_adapter`.
        adapter_name: Name to load under; defaults to the name stored in the file.

    Raises:
        AdapterFileError: the file is invalid or does not fit the model; the message lists the keys.

    Example:
        >>> vl.load_adapter(torchvision.models.resnet50(), "adapter.safetensors")
    """
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    file = read_adapter(path)
    name = adapter_name or file.adapter_name
    require_unmerged(model, "load an adapter")
    if name in adapter_configs(model):
        raise AdapterError(f"model already has adapter {name!r}; pass adapter_name='<new name>'")
    matches = _fit(file, model, name)
    try:
        check_selected(model, {m.name: m.module for m in matches}, name)
        check_wrappable(matches, file.config.dropout)
    except VisionLoraError as exc:
        raise _fail(file.path, str(exc)) from None
    snapshot_buffers(model)
    add_adapters(model, matches, file.config, name, init=_leave_empty)  # values come from the file
    layers = dict(lora_layers(model))
    params = original_parameters(model)
    buffers = original_buffers(model)
    with torch.no_grad():
        for m in matches:
            adapter = layers[m.name].adapter(name)
            adapter.lora_A.copy_(file.tensors[f"{m.name}.lora_A.weight"])
            adapter.lora_B.copy_(file.tensors[f"{m.name}.lora_B.weight"])
        for key in file.extra:
            params[key].copy_(file.tensors[key])
        for key in file.buffers:
            buffers[key].copy_(file.tensors[key])
    adapter_configs(model)[name] = file.config
    activate(model, {name: 1.0})
    mark_trainable(model, name)
    return model
