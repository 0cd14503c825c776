"""Exporting an adapter (from a model or a file in any format) to any format, a pipeline's parts in one file."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from visionlora.errors import ConfigError
from visionlora.io.adapter import AdapterFile, Parts, adapter_record, file_error
from visionlora.io.convert import COMPONENTS, DENOISERS
from visionlora.io.dit import dit_family
from visionlora.io.formats import (
    PIPELINE_FORMATS,
    AdapterFormat,
    Format,
    check_component,
    components_of,
    format_named,
    open_adapter,
    read_component,
    refuse_output,
    write_export,
)
from visionlora.io.load import fit_file
from visionlora.state import original_state_dict

__all__ = ["export_adapter"]


def export_adapter(
    model_or_file: nn.Module | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    format: AdapterFormat = "visionlora",
    adapter_name: str = "default",
    dtype: torch.dtype | None = None,
    text_encoder: nn.Module | str | os.PathLike[str] | None = None,
    component: str | None = None,
    overwrite: bool = False,
    text_encoder_2: nn.Module | str | os.PathLike[str] | None = None,
    model: nn.Module | Mapping[str, nn.Module] | None = None,
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
    given as ``model_or_file`` that already holds one keeps it; ``text_encoder_2`` likewise for
    SDXL's second (``text_encoder_2.*`` / ``lora_te2_*``). ``component`` exports one part of
    such a file only; the ``peft`` and ``visionlora`` formats hold one model, so a file holding
    several parts needs it.

    ``model`` (the model a file's adapter is for, or a pipeline's parts by name; weights are not
    needed, a meta-device model does) maps kohya's flattened module names onto the model and tells
    a Flux from an SD3 transformer where the file alone does not.

    Every export keeps the full visionlora record in its header, so reading it back with visionlora
    gives the same ranks, alphas, resolutions and config. ``dtype`` casts the written weights.
    An existing file (or non-empty folder) at ``path`` is refused unless ``overwrite`` is set.

    Raises:
        AdapterFileError: a layer or tensor ``format`` cannot hold exactly (the message names each),
            parts of the file a one-model format cannot hold (without ``component``), ``path``
            exists and ``overwrite`` is off, or the write failed (the old output is intact).
        ConfigError: an unknown format or component, or ``text_encoder`` with a one-model format.

    Example:
        >>> vl.export_adapter(model, "lora_peft", format="peft")
        >>> vl.export_adapter("adapter.safetensors", "style.safetensors", format="kohya", dtype=torch.float16)
        >>> vl.export_adapter(pipe.unet, "style.safetensors", format="kohya", text_encoder=pipe.text_encoder)
        >>> vl.export_adapter("style.safetensors", "te.safetensors", component="text_encoder")
    """
    fmt = format_named(format)
    check_component(component)
    encoders = {n: m for n, m in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)) if m is not None}
    for name in encoders:
        _check_added_part(name, fmt, component)
    path = Path(path)
    refuse_output(fmt, path, overwrite)
    model_state: dict[str, torch.Tensor] | None = None
    if isinstance(model_or_file, nn.Module):
        model_state = original_state_dict(model_or_file)
        denoiser = "transformer" if dit_family(model_state) is not None else COMPONENTS[0]
        records = {denoiser: dataclasses.replace(adapter_record(model_or_file, path, adapter_name), component=denoiser)}
    else:
        source_format, source = open_adapter(model_or_file)
        records = {c: read_component(source_format, source, c) for c in components_of(source_format, source)}
    for name, encoder in encoders.items():
        if isinstance(encoder, nn.Module):
            record = adapter_record(encoder, path, adapter_name)
        else:  # a pipeline file's part of that name, or a one-model file's whole adapter
            te_format, te_source = open_adapter(encoder)
            record = read_component(te_format, te_source, name if name in components_of(te_format, te_source) else None)
        records[name] = dataclasses.replace(record, component=name)
    if model is not None and not isinstance(model_or_file, nn.Module):
        records, model_state = _fitted(records, model)
    records = _chosen(records, fmt, component)
    for part in records.values():
        if part.flat_names:
            raise file_error(
                part.path,
                "is a kohya file whose module names are flattened (down_blocks_0_...); load it onto its model "
                "with vl.load_adapter and export the model",
            )
    return write_export(fmt, Parts(records, dtype, model_state), path, overwrite=overwrite)


def _fitted(
    records: dict[str, AdapterFile], model: nn.Module | Mapping[str, nn.Module]
) -> tuple[dict[str, AdapterFile], dict[str, torch.Tensor] | None]:
    """Each record with its names mapped onto its part of ``model``, and the denoiser's state dict."""
    parts = {c: model for c in records} if isinstance(model, nn.Module) else dict(model)
    state = None
    for component, part in parts.items():
        if component in records:
            records[component] = fit_file(records[component], part)
        if component in DENOISERS or isinstance(model, nn.Module):
            state = original_state_dict(part)
    return records, state


def _check_added_part(name: str, fmt: Format, component: str | None) -> None:
    """Refuse a text encoder's adapter added to a one-model format, or beside ``component=``."""
    if not fmt.pipeline:
        pipeline = " or ".join(repr(name) for name in PIPELINE_FORMATS)
        raise ConfigError(
            f"{name}=: the {fmt.name} format holds one model's adapter; export the text encoder to a path "
            f"of its own, or use format={pipeline} for one pipeline file"
        )
    if component is not None:
        raise ConfigError(f"component= exports one part of a pipeline file; {name}= adds a part: give one")


def _chosen(records: dict[str, AdapterFile], fmt: Format, component: str | None) -> dict[str, AdapterFile]:
    """The parts ``fmt`` writes: ``component``'s alone if given, all of them for a pipeline format."""
    if component is not None:
        if component not in records:
            first = next(iter(records.values()))
            raise file_error(first.path, f"holds no {component} LoRA; it holds LoRA for {list(records)}")
        records = {component: records[component]}
    if fmt.pipeline:
        return records
    if len(records) > 1:
        first = next(iter(records.values()))
        raise file_error(
            first.path,
            f"holds LoRA for {list(records)}, and the {fmt.name} format holds one model's adapter: pass "
            f"component=<one of those> (--component on the command line) to export one of them",
        )
    (record,) = records.values()
    return {COMPONENTS[0]: dataclasses.replace(record, component=COMPONENTS[0])}  # the one model of the file
