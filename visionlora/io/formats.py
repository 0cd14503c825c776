"""Which adapter format a path holds, reading any of them, and exporting to any of them."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from visionlora.errors import ConfigError
from visionlora.inject import original_state_dict
from visionlora.io.adapter import (
    EXPORT_FORMAT,
    META_KEY,
    AdapterFile,
    adapter_record,
    file_error,
    native_record,
    write_adapter,
)
from visionlora.io.convert import COMPONENTS, cast_tensors, require_finite
from visionlora.io.diffusers_lora import LORA_WEIGHTS_FILE, read_diffusers, write_diffusers
from visionlora.io.diffusers_lora import components_in as diffusers_components
from visionlora.io.files import read_safetensors, refuse_existing
from visionlora.io.kohya import components_in as kohya_components
from visionlora.io.kohya import is_kohya, read_kohya, write_kohya
from visionlora.io.peft import CONFIG_FILE as PEFT_CONFIG
from visionlora.io.peft import WEIGHTS_FILE as PEFT_WEIGHTS
from visionlora.io.peft import is_peft_folder, read_peft, write_peft

__all__ = ["FORMATS", "PIPELINE_FORMATS", "AdapterFormat", "export_adapter", "read_adapter"]

AdapterFormat = Literal["visionlora", "peft", "diffusers", "kohya"]
FORMATS: tuple[str, ...] = ("visionlora", "peft", "diffusers", "kohya")
PIPELINE_FORMATS: tuple[str, ...] = ("diffusers", "kohya")
"""Formats whose one file holds a pipeline's UNet and text encoders, LoRA weights only (no other modules)."""

logger = logging.getLogger("visionlora")


def _claims_native(header: dict[str, str]) -> bool:
    """A ``visionlora`` header entry that is not an export's kept record: the native reader judges it."""
    raw = header.get(META_KEY)
    if raw is None:
        return False
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        return True
    return not (isinstance(meta, dict) and meta.get("format") == EXPORT_FORMAT)


def read_adapter(path: str | os.PathLike[str], *, component: str | None = None) -> AdapterFile:
    """Read an adapter in any supported format; the record's ``format`` says which was found.

    ``path`` may be a visionlora file, a PEFT adapter folder (or its ``adapter_model.safetensors``),
    a diffusers LoRA file (or a folder with ``pytorch_lora_weights.safetensors``), or a kohya
    LoRA/LoCon file. Nothing is unpickled. A diffusers or kohya file can hold a pipeline's UNet
    and text encoder(s) together: ``component`` (``"unet"``, ``"text_encoder"``,
    ``"text_encoder_2"``) picks one, the UNet by default.

    Raises:
        AdapterFileError: naming the path and what was found instead of a known format, or the
            components the file holds when it holds nothing for ``component``.
        ConfigError: ``component`` is not one of the names above.

    Example:
        >>> vl.read_adapter("lora.safetensors").format
        'kohya'
        >>> vl.read_adapter("lora.safetensors", component="text_encoder").layers
    """
    if component is not None and component not in COMPONENTS:
        raise ConfigError(f"component {component!r} is not one of {list(COMPONENTS)}")
    return _read(_open(path), component)


@dataclasses.dataclass(frozen=True)
class _Opened:
    """An adapter path with its format detected and, for single files, its tensors and header read once."""

    path: Path
    format: str
    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    header: dict[str, str] = dataclasses.field(default_factory=dict)


def _open(path: str | os.PathLike[str]) -> _Opened:
    """Which format ``path`` holds (see :func:`read_adapter`); a file error naming what was found otherwise."""
    path = Path(path)
    if is_peft_folder(path) or (path.name == PEFT_WEIGHTS and is_peft_folder(path.parent)):
        return _Opened(path if path.is_dir() else path.parent, "peft")
    if path.is_dir():
        if not (path / LORA_WEIGHTS_FILE).is_file():
            raise file_error(
                path,
                f"is a folder without adapter_config.json (PEFT) or {LORA_WEIGHTS_FILE} (diffusers); "
                "give the adapter file itself",
            )
        path = path / LORA_WEIGHTS_FILE
    tensors, header = read_safetensors(path)
    if _claims_native(header):
        return _Opened(path, "visionlora", tensors, header)
    if is_kohya(tensors):
        return _Opened(path, "kohya", tensors, header)
    if any(".lora_A." in k or ".lora_B." in k for k in tensors):
        return _Opened(path, "diffusers", tensors, header)
    keys = sorted(tensors)
    raise file_error(
        path,
        f"not an adapter in a format visionlora reads ({', '.join(FORMATS)}); first keys: {keys[:5]}",
    )


def _components(opened: _Opened) -> list[str]:
    """The pipeline components an opened file holds LoRA for: ``["unet"]`` for single-model formats."""
    if opened.format == "kohya":
        return kohya_components(opened.tensors)
    if opened.format == "diffusers":
        return diffusers_components(opened.tensors)
    return [COMPONENTS[0]]


def _read(opened: _Opened, component: str | None) -> AdapterFile:
    """The record of ``component`` (default: the UNet, or the one model) in an opened file."""
    if opened.format == "kohya":
        return read_kohya(opened.path, opened.tensors, opened.header, component or COMPONENTS[0])
    if opened.format == "diffusers":
        return read_diffusers(opened.path, opened.tensors, opened.header, component or COMPONENTS[0])
    if opened.format == "peft":
        file = read_peft(opened.path)
    else:
        file = native_record(opened.path, opened.tensors, opened.header)
    if component not in (None, COMPONENTS[0]):
        raise file_error(
            file.path,
            f"is a {file.format} adapter of one model; component={component!r} picks a part of a diffusers or "
            "kohya pipeline LoRA file (load this file onto the text encoder without component=)",
        )
    return file


def file_components(path: str | os.PathLike[str]) -> list[str]:
    """The pipeline components an adapter file holds LoRA for: ``["unet"]`` for single-model formats.

    Raises:
        AdapterFileError: as :func:`read_adapter`, for a path that holds no adapter.
    """
    return _components(_open(path))


def export_adapter(
    model_or_file: nn.Module | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    format: AdapterFormat = "visionlora",
    adapter_name: str = "default",
    dtype: torch.dtype | None = None,
    text_encoder: nn.Module | str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an adapter (from a model, or from a file in any format) in ``format``; returns the path.

    - ``peft``: a folder ``PeftModel.from_pretrained(base, path)`` loads; per-layer ranks and
      alphas exact, new heads and changed BatchNorm statistics through ``modules_to_save``.
    - ``diffusers``: a LoRA file that ``pipeline.load_lora_weights`` and
      ``unet.load_lora_adapter`` load exactly, with any alpha and per-layer ranks.
    - ``kohya``: ``lora_unet_*`` down/up/alpha keys (LoCon for convs) for A1111 and ComfyUI.
    - ``visionlora``: the native file (e.g. to convert a kohya file or change dtype).

    ``text_encoder`` (a model with LoRA, or its adapter file) puts a pipeline's text-encoder
    adapter in the same ``diffusers`` or ``kohya`` file (``text_encoder.*`` / ``lora_te_*`` keys),
    which ``pipeline.load_lora_weights`` and kohya's consumers apply to the text encoder; a file
    given as ``model_or_file`` that already holds one keeps it. The ``peft`` and ``visionlora``
    formats hold one model: export a text encoder to a path of its own.

    Every export keeps the full visionlora record in its header, so reading it back with visionlora
    gives the same ranks, alphas, resolutions and config. ``dtype`` casts the written weights.
    An existing file (or non-empty folder) at ``path`` is refused unless ``overwrite`` is set.

    Raises:
        AdapterFileError: a layer or tensor ``format`` cannot hold exactly (the message names each),
            ``path`` exists and ``overwrite`` is off, or the write failed (the old output is intact).
        ConfigError: ``text_encoder`` with a one-model format.

    Example:
        >>> vl.export_adapter(model, "lora_peft", format="peft")
        >>> vl.export_adapter("adapter.safetensors", "style.safetensors", format="kohya", dtype=torch.float16)
        >>> vl.export_adapter(pipe.unet, "style.safetensors", format="kohya", text_encoder=pipe.text_encoder)
    """
    if format not in FORMATS:
        raise ConfigError(f"format {format!r} is not one of {list(FORMATS)}")
    if text_encoder is not None and format not in PIPELINE_FORMATS:
        raise ConfigError(
            f"text_encoder=: the {format} format holds one model's adapter; export the text encoder to a path "
            f"of its own, or use format={PIPELINE_FORMATS[0]!r} or {PIPELINE_FORMATS[1]!r} for one pipeline file"
        )
    path = Path(path)
    if format == "peft":
        refuse_existing(path, overwrite, PEFT_CONFIG)
    else:
        refuse_existing(path / LORA_WEIGHTS_FILE if format == "diffusers" and path.is_dir() else path, overwrite)
    model_state: dict[str, torch.Tensor] | None = None
    if isinstance(model_or_file, nn.Module):
        parts = {COMPONENTS[0]: adapter_record(model_or_file, path, adapter_name)}
        model_state = original_state_dict(model_or_file)
    else:
        opened = _open(model_or_file)
        parts = {c: _read(opened, c) for c in _components(opened)}
    if text_encoder is not None:
        if isinstance(text_encoder, nn.Module):
            record = adapter_record(text_encoder, path, adapter_name)
        else:  # a pipeline file's text-encoder part, or a one-model file's whole adapter
            opened = _open(text_encoder)
            record = _read(opened, "text_encoder" if "text_encoder" in _components(opened) else None)
        parts["text_encoder"] = dataclasses.replace(record, component="text_encoder")
    for part in parts.values():
        if part.flat_names:
            raise file_error(
                part.path,
                "is a kohya file whose module names are flattened (down_blocks_0_...); load it onto its model "
                "with vl.load_adapter and export the model",
            )
    if format == "diffusers":
        return write_diffusers(parts, path, dtype=dtype, overwrite=overwrite)
    if format == "kohya":
        return write_kohya(parts, path, dtype=dtype, overwrite=overwrite)
    record = parts.pop(COMPONENTS[0] if COMPONENTS[0] in parts else next(iter(parts)))
    if parts:
        logger.warning(
            "%s: its %s LoRA is not written to %s (the %s format holds one model); read it with "
            "vl.read_adapter(..., component=...) and export it to a path of its own",
            record.path,
            " and ".join(parts),
            path,
            format,
        )
    if format == "peft":
        return write_peft(record, path, model_state=model_state, dtype=dtype, overwrite=overwrite)
    tensors = require_finite(record.path, cast_tensors(record.tensors, dtype))
    return write_adapter(dataclasses.replace(record, path=path, tensors=tensors), overwrite=overwrite)
