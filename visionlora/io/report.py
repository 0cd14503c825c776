"""What an adapter file holds and where each of its keys would go, before anything is loaded
(``visionlora inspect FILE --against MODEL``).

The report names the format, the trainer that wrote the file where its header or key style says
so, the adapter family (LoRA, LoCon, LoHa, LoKr, DoRA, full diffs), and per pipeline part each key
stem's modules, ranks and alphas. Against a model it lists what would not fit: keys whose module
the model lacks (with the nearest names), shapes, dtypes, geometry. A part the reader refuses is
reported with the reader's reason (which lists the keys nothing reads).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionlora.branches import split_adapter_key
from visionlora.errors import VisionLoraError
from visionlora.io.adapter import AdapterFile
from visionlora.io.files import read_safetensors
from visionlora.io.formats import FORMAT_TABLE, components_of, open_adapter, read_component
from visionlora.io.load import fit_file, fit_problems
from visionlora.models.loading import build_model, load_component

__all__ = ["FileReport", "PartReport", "describe_adapter", "families_of", "models_to_check", "render", "trainer_of"]

_FAMILIES = (
    ("LoHa", ("hada_w1_a", "hada_w2_a")),
    ("LoKr", ("lokr_w1", "lokr_w2")),
    ("DoRA", ("dora_scale", "lora_magnitude_vector", ".magnitude")),
    ("full diff", (".diff", ".diff_b")),
    ("LoRA", (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.")),
)


@dataclass
class PartReport:
    """One pipeline part of a file: its record (None when the reader refuses it), each key stem's
    modules, and what would not fit the model it was checked against."""

    component: str
    record: AdapterFile | None
    error: str | None = None
    stems: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class FileReport:
    """Everything :func:`describe_adapter` found."""

    path: str
    format: str
    trainer: str
    families: list[str]
    parts: list[PartReport]
    checked: bool
    """Whether the parts were checked against a model."""

    @property
    def loads(self) -> bool:
        """Whether every key would be applied (against the model, when one was given)."""
        return all(p.error is None and not p.problems for p in self.parts)


def trainer_of(header: Mapping[str, str], keys: list[str]) -> str:
    """The tool that wrote a file, as far as its header and key style say."""
    software = header.get("software", "")
    try:
        name = json.loads(software).get("name", "") if software.startswith("{") else software
    except (ValueError, AttributeError, RecursionError):
        name = ""
    network = header.get("ss_network_module", "")
    if any(k == "visionlora" or k.startswith("visionlora.") for k in header):
        return "visionlora"
    if "ai-toolkit" in str(name):
        return "ai-toolkit"
    if network:
        return f"LyCORIS ({network})" if "lycoris" in network else f"kohya sd-scripts ({network})"
    if header.get("modelspec.implementation") == "diffusers" or "trained_words" in header:
        return "SimpleTuner (diffusers format)"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "ComfyUI (LoraSave)"
    if "lora_adapter_metadata" in header:
        return "diffusers (save_lora_weights)"
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya-style (sd-scripts, A1111 or ComfyUI; no trainer metadata)"
    if any(k.startswith("base_model.model.") or ".base_model.model." in k for k in keys):
        return "PEFT"
    if any(".lora_A." in k for k in keys):
        return "diffusers/PEFT-style (no trainer metadata)"
    return "unknown"


def families_of(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The adapter families a file's keys belong to (LoCon: kohya LoRA on convs)."""
    found = [name for name, marks in _FAMILIES if any(m in k for k in tensors for m in marks)]
    convs = any(k.endswith(".lora_down.weight") and v.ndim == 4 and v.shape[2:] != (1, 1) for k, v in tensors.items())
    return [("LoRA + LoCon" if f == "LoRA" and convs else f) for f in found]


def describe_adapter(
    path: str | os.PathLike[str], against: nn.Module | Mapping[str, nn.Module] | None = None
) -> FileReport:
    """What the adapter at ``path`` holds, and, ``against`` a model (or a pipeline's parts by
    name), where each key would go and what would not fit. Reads the file; changes nothing.

    Raises:
        AdapterFileError: ``path`` is no adapter in a format visionlora recognises.
    """
    fmt, source = open_adapter(path)
    tensors, header = source.tensors, source.header
    if fmt.folder_marker is not None and fmt.weights_file is not None:
        weights = source.path / fmt.weights_file
        tensors, header = read_safetensors(weights) if weights.is_file() else ({}, {})
    parts = []
    held = components_of(fmt, source)
    for component in held:
        part = PartReport(component, None)
        try:
            part.record = read_component(fmt, source, component if fmt.pipeline else None)
        except VisionLoraError as exc:
            part.error = str(exc)
            parts.append(part)
            continue
        model = _model_for(against, component)
        if model is not None:
            try:
                part.record = fit_file(part.record, model)
                part.problems = [_with_origin(part.record, p) for p in fit_problems(part.record, model)[1]]
            except VisionLoraError as exc:
                part.error = str(exc)
        for name in part.record.layers:
            part.stems.setdefault(part.record.origins.get(name, name), []).append(name)
        parts.append(part)
    return FileReport(
        str(source.path), fmt.name, trainer_of(header, list(tensors)), families_of(tensors), parts, against is not None
    )


def models_to_check(spec: str, parts: list[str]) -> nn.Module | dict[str, nn.Module]:
    """The model ``spec`` names (a pipeline folder: each of ``parts``), built on the meta device:
    names and shapes to check a file against, no weights read and no memory taken."""
    if (Path(spec) / "model_index.json").is_file():
        return {part: load_component(spec, part, weights=False) for part in parts}
    with torch.device("meta"):
        return build_model(spec)


def _with_origin(record: AdapterFile, problem: str) -> str:
    """``problem`` prefixed with the file's key stem of its layer where that differs from the layer's name."""
    head = problem.split(":", 1)[0]
    name = (split_adapter_key(head) or (head, ""))[0]
    origin = record.origins.get(name)
    return f"{origin} -> {problem}" if origin is not None and origin != name else problem


def _model_for(against: Any, component: str) -> nn.Module | None:
    if against is None or isinstance(against, nn.Module):
        return against
    return against.get(component)


def render(report: FileReport) -> str:
    """The report as the text ``visionlora inspect`` prints."""
    fmt = FORMAT_TABLE[report.format]
    lines = [
        f"{report.path}: {report.format} file, written by {report.trainer}; family: {', '.join(report.families)}",
        f"parts: {', '.join(p.component for p in report.parts)}" + ("" if fmt.pipeline else " (one model)"),
    ]
    for part in report.parts:
        lines.append(f"\n[{part.component}]")
        if part.error is not None:
            lines.append(f"  NOT READ: {part.error}")
            continue
        record = part.record
        assert record is not None
        ranks = sorted({s.rank for s in record.layers.values()})
        alphas = sorted({s.alpha for s in record.layers.values()})
        lines.append(f"  {len(record.layers)} layers; ranks {ranks}; alphas {[f'{a:g}' for a in alphas]}")
        for stem, names in part.stems.items():
            shown = names[0] if len(names) == 1 else f"{names[0]} + {len(names) - 1} more ({', '.join(names[1:])})"
            rank = "+".join(str(record.layers[n].rank) for n in names)
            lines.append(f"  {stem} -> {shown}  rank {rank}" if stem != names[0] else f"  {stem}  rank {rank}")
        if part.problems:
            lines.append(f"  WOULD NOT LOAD ({len(part.problems)} problems):")
            lines += [f"    {p}" for p in part.problems[:40]]
    if report.checked:
        verdict = "every key would be applied" if report.loads else "the load would be refused; nothing would change"
        lines.append(f"\nagainst the model: {verdict}")
    return "\n".join(lines)
