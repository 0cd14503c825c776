"""Which adapter format a path holds, reading any of them, and exporting to any of them."""

from __future__ import annotations

import dataclasses
import json
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
    read_native,
    write_adapter,
)
from visionlora.io.convert import cast_tensors, require_finite
from visionlora.io.diffusers_lora import LORA_WEIGHTS_FILE, read_diffusers, write_diffusers
from visionlora.io.files import read_safetensors, refuse_existing
from visionlora.io.kohya import PREFIX as KOHYA_PREFIX
from visionlora.io.kohya import TEXT_PREFIXES, read_kohya, write_kohya
from visionlora.io.peft import CONFIG_FILE as PEFT_CONFIG
from visionlora.io.peft import WEIGHTS_FILE as PEFT_WEIGHTS
from visionlora.io.peft import is_peft_folder, read_peft, write_peft

__all__ = ["FORMATS", "AdapterFormat", "export_adapter", "read_adapter"]

AdapterFormat = Literal["visionlora", "peft", "diffusers", "kohya"]
FORMATS: tuple[str, ...] = ("visionlora", "peft", "diffusers", "kohya")


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


def read_adapter(path: str | os.PathLike[str]) -> AdapterFile:
    """Read an adapter in any supported format; the record's ``format`` says which was found.

    ``path`` may be a visionlora file, a PEFT adapter folder (or its ``adapter_model.safetensors``),
    a diffusers LoRA file (or a folder with ``pytorch_lora_weights.safetensors``), or a kohya
    LoRA/LoCon file. Nothing is unpickled.

    Raises:
        AdapterFileError: naming the path and what was found instead of a known format.

    Example:
        >>> vl.read_adapter("lora.safetensors").format
        'kohya'
    """
    path = Path(path)
    if is_peft_folder(path):
        return read_peft(path)
    if path.name == PEFT_WEIGHTS and is_peft_folder(path.parent):
        return read_peft(path.parent)
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
        return read_native(path)
    if tensors and all(k.startswith((KOHYA_PREFIX, *TEXT_PREFIXES)) for k in tensors):
        return read_kohya(path, tensors, header)
    if any(".lora_A." in k or ".lora_B." in k for k in tensors):
        return read_diffusers(path, tensors, header)
    keys = sorted(tensors)
    raise file_error(
        path,
        f"not an adapter in a format visionlora reads ({', '.join(FORMATS)}); first keys: {keys[:5]}",
    )


def export_adapter(
    model_or_file: nn.Module | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    format: AdapterFormat = "visionlora",
    adapter_name: str = "default",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an adapter (from a model, or from a file in any format) in ``format``; returns the path.

    - ``peft``: a folder ``PeftModel.from_pretrained(base, path)`` loads; per-layer ranks and
      alphas exact, new heads and changed BatchNorm statistics through ``modules_to_save``.
    - ``diffusers``: a LoRA file that ``pipeline.load_lora_weights`` and
      ``unet.load_lora_adapter`` load exactly, with any alpha and per-layer ranks.
    - ``kohya``: ``lora_unet_*`` down/up/alpha keys (LoCon for convs) for A1111 and ComfyUI.
    - ``visionlora``: the native file (e.g. to convert a kohya file or change dtype).

    Every export keeps the full visionlora record in its header, so reading it back with visionlora
    gives the same ranks, alphas, resolutions and config. ``dtype`` casts the written weights.
    An existing file (or non-empty folder) at ``path`` is refused unless ``overwrite`` is set.

    Raises:
        AdapterFileError: a layer or tensor ``format`` cannot hold exactly (the message names each),
            ``path`` exists and ``overwrite`` is off, or the write failed (the old output is intact).

    Example:
        >>> vl.export_adapter(model, "lora_peft", format="peft")
        >>> vl.export_adapter("adapter.safetensors", "style.safetensors", format="kohya", dtype=torch.float16)
    """
    if format not in FORMATS:
        raise ConfigError(f"format {format!r} is not one of {list(FORMATS)}")
    path = Path(path)
    if format == "peft":
        refuse_existing(path, overwrite, PEFT_CONFIG)
    else:
        refuse_existing(path / LORA_WEIGHTS_FILE if format == "diffusers" and path.is_dir() else path, overwrite)
    model_state: dict[str, torch.Tensor] | None = None
    if isinstance(model_or_file, nn.Module):
        record = adapter_record(model_or_file, path, adapter_name)
        model_state = original_state_dict(model_or_file)
    else:
        record = read_adapter(model_or_file)
        if record.flat_names:
            raise file_error(
                record.path,
                "is a kohya file whose module names are flattened (down_blocks_0_...); load it onto its model "
                "with vl.load_adapter and export the model",
            )
    if format == "peft":
        return write_peft(record, path, model_state=model_state, dtype=dtype, overwrite=overwrite)
    if format == "diffusers":
        return write_diffusers(record, path, dtype=dtype, overwrite=overwrite)
    if format == "kohya":
        return write_kohya(record, path, dtype=dtype, overwrite=overwrite)
    tensors = require_finite(record.path, cast_tensors(record.tensors, dtype))
    return write_adapter(dataclasses.replace(record, path=path, tensors=tensors), overwrite=overwrite)
