"""The adapter formats, as one table: recognise a path, read it, write any of them.

Each format is one :class:`Format` record: how a path in it is recognised, how one component of
it is read into an :class:`~visionlora.io.adapter.AdapterFile`, and a pure ``to_tensors`` that
turns records into what to write (:class:`~visionlora.io.adapter.Payload`). One writer,
:func:`write_export`, writes every format atomically. Adding a format is adding a record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import nn

from visionlora.errors import ConfigError
from visionlora.io.adapter import (
    EXPORT_FORMAT,
    META_KEY,
    AdapterFile,
    Parts,
    Payload,
    Source,
    adapter_record,
    file_error,
    native_record,
    native_tensors,
    require_finite,
)
from visionlora.io.convert import COMPONENTS, DENOISERS
from visionlora.io.diffusers_lora import LORA_WEIGHTS_FILE, diffusers_tensors, read_diffusers
from visionlora.io.diffusers_lora import components_in as diffusers_components
from visionlora.io.files import atomic_folder, read_safetensors, refuse_existing, write_safetensors, write_text
from visionlora.io.kohya import components_in as kohya_components
from visionlora.io.kohya import is_kohya, read_kohya, resolve_names
from visionlora.io.kohya_export import kohya_tensors
from visionlora.io.peft import CONFIG_FILE as PEFT_CONFIG
from visionlora.io.peft import WEIGHTS_FILE as PEFT_WEIGHTS
from visionlora.io.peft import peft_tensors, read_peft

__all__ = [
    "FORMATS",
    "FORMAT_TABLE",
    "PIPELINE_FORMATS",
    "AdapterFormat",
    "Format",
    "check_component",
    "components_of",
    "file_components",
    "format_named",
    "open_adapter",
    "read_adapter",
    "read_component",
    "refuse_output",
    "save_adapter",
    "write_adapter",
    "write_export",
]

AdapterFormat = Literal["visionlora", "peft", "diffusers", "kohya"]
"""The names of the formats in :data:`FORMAT_TABLE` (recipes' ``output.export`` takes these)."""


@dataclass(frozen=True)
class Format:
    """One adapter format: how to recognise, read and write it."""

    name: str
    read: Callable[[Source, str], AdapterFile]
    """The record of one component (``unet`` for a one-model format) of an opened source."""
    to_tensors: Callable[[Parts], Payload]
    """What to write for ``parts``: pure, no I/O; refuses (naming them) layers the format cannot run."""
    detect: Callable[[Source], bool] | None = None
    """Whether an opened single file is in this format (None: a folder format, known by ``folder_marker``)."""
    components: Callable[[Source], list[str]] | None = None
    """The pipeline components a file holds LoRA for (None: one model, ``["unet"]``)."""
    holds_extras: bool = True
    """It can hold trained non-LoRA tensors (a new head, BatchNorm statistics), not LoRA weights only."""
    runs_lora_layers: bool = False
    """Its tools run LoRA through PEFT's layers (not on merged weights), so conv geometry matters on load."""
    families: tuple[str, ...] = ("lora", "dora", "loha", "lokr")
    """The adapter families it holds; with ``runs_lora_layers`` (PEFT's one ``use_dora``) one per model."""
    fit_names: Callable[[AdapterFile, nn.Module], AdapterFile] | None = None
    """Maps the module names a file could not keep onto a model's (kohya's flattened ones); None: exact."""
    weights_file: str | None = None
    """The weights' file name inside a folder of this format."""
    folder_marker: str | None = None
    """For a folder format: the file that makes a folder this format (and an earlier output of it)."""

    @property
    def pipeline(self) -> bool:
        """Whether one file holds a pipeline's components (UNet and text encoders)."""
        return self.components is not None

    def output_name(self, part: str = "") -> str:
        """The name a training run gives this export: ``adapter-kohya.safetensors``, ``adapter-peft-text-encoder``."""
        suffix = "" if self.folder_marker is not None else ".safetensors"
        return f"adapter-{self.name}{'-' + part if part else ''}{suffix}"


def _claims_native(source: Source) -> bool:
    """A ``visionlora`` header entry that is not an export's kept record: the native reader judges it."""
    raw = source.header.get(META_KEY)
    if raw is None:
        return False
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        return True
    return not (isinstance(meta, dict) and meta.get("format") == EXPORT_FORMAT)


def _read_native(source: Source, component: str) -> AdapterFile:
    return native_record(source.path, source.tensors, source.header)


def _diffusers_keys(source: Source) -> bool:
    return any(".lora_A." in k or ".lora_B." in k for k in source.tensors)


FORMAT_TABLE: dict[str, Format] = {
    f.name: f
    for f in (
        Format("visionlora", _read_native, native_tensors, detect=_claims_native),
        Format(
            "peft",
            read_peft,
            peft_tensors,
            runs_lora_layers=True,
            families=("lora", "dora"),
            weights_file=PEFT_WEIGHTS,
            folder_marker=PEFT_CONFIG,
        ),
        Format(
            "diffusers",
            read_diffusers,
            diffusers_tensors,
            detect=_diffusers_keys,
            components=lambda source: diffusers_components(source.tensors),
            holds_extras=False,
            runs_lora_layers=True,
            families=("lora", "dora"),
            weights_file=LORA_WEIGHTS_FILE,
        ),
        Format(
            "kohya",
            read_kohya,
            kohya_tensors,
            detect=lambda source: is_kohya(source.tensors),
            components=lambda source: kohya_components(source.tensors, source.header),
            holds_extras=False,
            fit_names=resolve_names,
        ),
    )
}
"""Every format, by name, in the order single files are tried (visionlora's own header first)."""

FORMATS: tuple[str, ...] = tuple(FORMAT_TABLE)
PIPELINE_FORMATS: tuple[str, ...] = tuple(n for n, f in FORMAT_TABLE.items() if f.pipeline)
"""Formats whose one file holds a pipeline's UNet and text encoders, LoRA weights only (no other modules)."""


def format_named(name: str) -> Format:
    if name not in FORMAT_TABLE:
        raise ConfigError(f"format {name!r} is not one of {list(FORMATS)}")
    return FORMAT_TABLE[name]


def open_adapter(path: str | os.PathLike[str]) -> tuple[Format, Source]:
    """The format ``path`` holds and the path opened once (a single file's tensors and header read).

    Raises:
        AdapterFileError: naming the path and what was found instead of a known format.
    """
    path = Path(path)
    for fmt in FORMAT_TABLE.values():  # a folder format: its folder, or its weights file inside one
        if fmt.folder_marker is None:
            continue
        folder = path.parent if path.name == fmt.weights_file else path
        if folder.is_dir() and (folder / fmt.folder_marker).is_file():
            return fmt, Source(folder)
    if path.is_dir():  # a single-file format's file inside a folder (diffusers' save_lora_weights)
        inside = [f.weights_file for f in FORMAT_TABLE.values() if f.weights_file and f.folder_marker is None]
        found = [name for name in inside if (path / name).is_file()]
        if not found:
            wanted = [
                f"{f.folder_marker or f.weights_file} ({f.name})" for f in FORMAT_TABLE.values() if f.weights_file
            ]
            raise file_error(path, f"is a folder without {' or '.join(wanted)}; give the adapter file itself")
        path = path / found[0]
    tensors, header = read_safetensors(path)
    source = Source(path, tensors, header)
    for fmt in FORMAT_TABLE.values():
        if fmt.detect is not None and fmt.detect(source):
            return fmt, source
    keys = sorted(tensors)
    raise file_error(
        path, f"not an adapter in a format visionlora reads ({', '.join(FORMATS)}); first keys: {keys[:5]}"
    )


def components_of(fmt: Format, source: Source) -> list[str]:
    return fmt.components(source) if fmt.components is not None else [COMPONENTS[0]]


def read_component(fmt: Format, source: Source, component: str | None) -> AdapterFile:
    """The record of ``component`` (default: the denoiser the file holds, or the one model) in an opened source."""
    if fmt.pipeline:
        held = components_of(fmt, source)
        return fmt.read(source, component or next((c for c in held if c in DENOISERS), COMPONENTS[0]))
    file = fmt.read(source, COMPONENTS[0])
    if component not in (None, COMPONENTS[0]):
        raise file_error(
            file.path,
            f"is a {file.format} adapter of one model; component={component!r} picks a part of a "
            f"{' or '.join(PIPELINE_FORMATS)} pipeline LoRA file (load this file onto the text encoder without "
            "component=)",
        )
    return file


def check_component(component: str | None) -> None:
    if component is not None and component not in COMPONENTS:
        raise ConfigError(f"component {component!r} is not one of {list(COMPONENTS)}")


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
    check_component(component)
    return read_component(*open_adapter(path), component)


def file_components(path: str | os.PathLike[str]) -> list[str]:
    """The pipeline components an adapter file holds LoRA for: ``["unet"]`` for single-model formats.

    Raises:
        AdapterFileError: as :func:`read_adapter`, for a path that holds no adapter.
    """
    return components_of(*open_adapter(path))


def refuse_output(fmt: Format, path: Path, overwrite: bool) -> None:
    if fmt.folder_marker is not None:
        refuse_existing(path, overwrite, fmt.folder_marker)
    else:
        refuse_existing(path / fmt.weights_file if fmt.weights_file and path.is_dir() else path, overwrite)


def write_export(fmt: Format, parts: Parts, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``parts`` in format ``fmt`` to ``path``, atomically; return the path written.

    A folder format's folder is assembled and swapped in whole; a single-file format given a
    folder writes its ``weights_file`` inside it. An existing output is replaced only with
    ``overwrite`` (and a folder only if it is an earlier output of the same format).

    Raises:
        AdapterFileError: what ``fmt.to_tensors`` refuses, NaN/Inf in the written tensors, an
            existing output without ``overwrite``, or a failed write (the old output is intact).
    """
    path = Path(path)
    refuse_output(fmt, path, overwrite)
    payload = fmt.to_tensors(parts)
    header = {**parts.header, **payload.header}
    tensors = require_finite(next(iter(parts.records.values())).path, payload.tensors)
    if fmt.folder_marker is not None and fmt.weights_file is not None:  # a folder format
        with atomic_folder(path, fmt.folder_marker, overwrite=overwrite) as staging:
            write_safetensors(staging / fmt.weights_file, tensors, header)
            for name, text in payload.files.items():
                write_text(staging / name, text)
        return path
    if fmt.weights_file is not None and path.is_dir():
        path = path / fmt.weights_file
    return write_safetensors(path, tensors, header, overwrite=overwrite)


def write_adapter(file: AdapterFile, *, overwrite: bool = False, header: Mapping[str, str] | None = None) -> Path:
    """Write a record to ``file.path`` as a visionlora adapter file (atomically, self-describing)."""
    parts = Parts({COMPONENTS[0]: file}, header=header or {})
    return write_export(FORMAT_TABLE["visionlora"], parts, file.path, overwrite=overwrite)


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    adapter_name: str = "default",
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write adapter ``adapter_name`` (LoRA weights + trainable modules and biases) to ``path``.

    Buffers that changed since LoRA was added (BatchNorm statistics of a run in train mode) are
    saved too, so the file reproduces the trained model on its base. The write is atomic; the
    config and each layer's kind, rank and alpha go in the header, beside ``metadata``. Returns the path.

    Raises:
        AdapterFileError: ``path`` exists and ``overwrite`` is off, a tensor holds NaN/Inf, or the
            write failed (e.g. no space left); the old file is then intact.

    Example:
        >>> vl.save_adapter(model, "adapter.safetensors")
        >>> vl.save_adapter(model, "adapter.safetensors", overwrite=True)  # replace the earlier one
    """
    path = Path(path)
    return write_adapter(adapter_record(model, path, adapter_name), overwrite=overwrite, header=metadata)
