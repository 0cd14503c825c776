"""diffusers LoRA files: ``unet.<module>.lora_A.weight`` / ``unet.<module>.lora_B.weight``.

A Flux or SD3 transformer's LoRA sits under ``transformer.``; a text encoder's in the same file
under ``text_encoder.`` (``text_encoder_2.``, ``text_encoder_3.`` for the further ones), each
with its own ``lora_adapter_metadata`` entries, as ``save_lora_weights`` writes them. Files from
diffusers' training scripts, SimpleTuner and ai-toolkit are in this format; PEFT's own
``base_model.model.`` inside the keys (``transformer.base_model.model.<module>...``) is read too.

diffusers reads this format on two paths that disagree about alpha: ``pipeline.load_lora_weights``
reads the ``lora_adapter_metadata`` header, while ``UNet2DConditionModel.load_lora_adapter(path)``
without ``weight_name`` drops the header and takes alpha = rank (scale 1) for every module. The
writer makes both paths agree by folding each module's whole scale into its B and declaring
alpha = rank for every module in the header too; the original ranks, alphas and config stay in
the ``visionlora`` header entry (``visionlora.text_encoder`` for the text encoder), so
visionlora reads the file back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from visionlora.io.adapter import AdapterFile, Parts, Payload, Source, file_error
from visionlora.io.convert import (
    COMPONENTS,
    anchored,
    check_patterns,
    exact_regex,
    export_header,
    foreign_record,
    header_json,
    kept_record,
    layer_scale,
    most_common,
    pattern_value,
    require_exportable,
    scalar_alpha,
    unmappable,
)
from visionlora.io.peft import PEFT_MAGNITUDE, peft_dora, peft_magnitude, record_magnitude

__all__ = ["LORA_WEIGHTS_FILE", "METADATA_KEY", "components_in", "diffusers_tensors", "read_diffusers"]

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # what load_lora_weights(folder) looks for
METADATA_KEY = "lora_adapter_metadata"
logger = logging.getLogger("visionlora")
_PEFT_PREFIX = "base_model.model."


def diffusers_tensors(parts: Parts) -> Payload:
    """``parts.records`` (component -> record) as one diffusers LoRA file.

    Each component's keys and ``lora_adapter_metadata`` entries carry its prefix (``unet.``,
    ``text_encoder.``), as ``save_lora_weights`` writes them.

    Raises:
        AdapterFileError: a layer diffusers' PEFT layers would run differently, or trained
            non-LoRA tensors (the format has no place for them); each is named.
    """
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, Any] = {}
    kept: dict[str, str] = {}
    for component, file in parts.records.items():
        require_exportable(file, "diffusers", lora_only=True)
        dora = peft_dora(file, "diffusers")
        for name in file.layers:
            a, b = file.tensors[f"{name}.lora_A.weight"], file.tensors[f"{name}.lora_B.weight"]
            out_dtype = parts.dtype or b.dtype
            tensors[f"{component}.{name}.lora_A.weight"] = a.to(out_dtype)
            tensors[f"{component}.{name}.lora_B.weight"] = (b.double() * layer_scale(file, name)).to(out_dtype)
            if dora:
                magnitude = peft_magnitude(file.tensors[f"{name}.magnitude"])
                tensors[f"{component}.{name}.{PEFT_MAGNITUDE}"] = magnitude.to(out_dtype)
        metadata.update({f"{component}.{k}": v for k, v in _peft_config(file, dora).items()})
        kept.update(export_header(file))
    t5 = [
        c
        for c, f in parts.records.items()
        if c != "text_encoder" and any(n.startswith("encoder.block.") for n in f.layers)
    ]
    if "transformer" in parts.records and t5:
        logger.warning(
            "%s: diffusers' Flux and SD3 loaders read no T5 LoRA, so pipe.load_lora_weights would skip the %s part "
            "of this file; vl.load_adapter(pipe, path) reads it, and the kohya export (lora_te3_) is read by ComfyUI",
            next(iter(parts.records.values())).path,
            t5[0],
        )
    return Payload(tensors, {"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True), **kept})


def _peft_config(file: AdapterFile, dora: bool) -> dict[str, Any]:
    """The LoraConfig diffusers builds for one component: alpha = rank everywhere (the scale is in B)."""
    ranks = {n: s.rank for n, s in file.layers.items()}
    rank = most_common(ranks.values())
    pattern = {anchored(n): r for n, r in ranks.items() if r != rank}
    return {
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": pattern,
        "alpha_pattern": pattern,
        "target_modules": exact_regex(file.layers),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": dora,
        "lora_bias": False,
        "init_lora_weights": True,
    }


def components_in(raw: Mapping[str, torch.Tensor]) -> list[str]:
    """The components a diffusers file holds LoRA for, in :data:`COMPONENTS` order (unprefixed keys: the UNet)."""
    found = {k.split(".", 1)[0] for k in raw}
    if not found & set(COMPONENTS):
        return [COMPONENTS[0]] if raw else []
    return [c for c in COMPONENTS if c in found]


def _declared_alphas(
    path: Path, header: Mapping[str, str], names: set[str], component: str
) -> tuple[dict[str, float], bool, bool | None]:
    """Per-layer alphas, rsLoRA and use_dora from diffusers' ``lora_adapter_metadata`` header (empty, False,
    None without one)."""
    raw = header.get(METADATA_KEY)
    if not raw:
        return {}, False, None
    meta = header_json(path, raw, METADATA_KEY)
    if not isinstance(meta, dict):
        raise file_error(path, f"the {METADATA_KEY!r} header entry is not a JSON object")
    own = {k.removeprefix(f"{component}."): v for k, v in meta.items() if k.startswith(f"{component}.")}
    if not own and component == COMPONENTS[0] and not any(k.split(".", 1)[0] in COMPONENTS for k in meta):
        own = meta  # written without prefixes: the UNet's
    if own.get("lora_bias"):
        raise file_error(path, "the adapter uses LoRA biases, which visionlora does not reproduce")
    alpha, patterns = own.get("lora_alpha", own.get("r")), own.get("alpha_pattern") or {}
    check_patterns(path, patterns, f"the {METADATA_KEY!r} header's alpha_pattern")
    alphas = {n: pattern_value(patterns, n, alpha) for n in names}
    dora = own.get("use_dora")
    return {n: a for n, a in alphas.items() if a is not None}, own.get("use_rslora") is True, dora is True


def read_diffusers(source: Source, component: str = COMPONENTS[0]) -> AdapterFile:
    """One component's LoRA from a diffusers (PEFT-keyed) file: alphas from its header, else alpha = rank.

    Raises:
        AdapterFileError: the file holds nothing for ``component`` (the message says what it
            holds), or keys that belong to no component or are not LoRA tensors, listed.
    """
    path, raw, header = source.path, source.tensors, source.header
    held = components_in(raw)
    prefixed = any(k.split(".", 1)[0] in COMPONENTS for k in raw)
    outside = [k for k in raw if prefixed and k.split(".", 1)[0] not in COMPONENTS]
    unmappable(path, outside, "pipeline component", f" (a diffusers LoRA file's keys start with one of {COMPONENTS})")
    if component not in held:
        raise file_error(path, f"holds no {component} LoRA; it holds LoRA for {held} (pass component=<one of those>)")
    tensors: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    origins: dict[str, str] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    bad = []
    for key, tensor in raw.items():
        if prefixed and not key.startswith(f"{component}."):
            continue
        name = key.removeprefix(f"{component}.") if prefixed else key
        name = name.removeprefix(_PEFT_PREFIX)  # PEFT's own key prefix, kept by some trainers
        if name.endswith((".lora_A.weight", ".lora_B.weight")):
            tensors[name] = tensor
            origins[name.rsplit(".lora_", 1)[0]] = key.rsplit(".lora_", 1)[0]
        elif name.endswith(f".{PEFT_MAGNITUDE}"):
            magnitudes[name.removesuffix(f".{PEFT_MAGNITUDE}")] = tensor
            origins[name.removesuffix(f".{PEFT_MAGNITUDE}")] = key.removesuffix(f".{PEFT_MAGNITUDE}")
        elif name.endswith(".alpha"):
            alphas[name.removesuffix(".alpha")] = scalar_alpha(path, key, tensor)
        else:
            bad.append(key)
    names = {k.rsplit(".lora_", 1)[0] for k in tensors}
    bad += [f"{n}.alpha" for n in alphas if n not in names] + [
        f"{origins[n]}.{PEFT_MAGNITUDE}" for n in magnitudes if n not in names
    ]
    for name, magnitude in magnitudes.items():
        if name in names and f"{name}.lora_A.weight" in tensors:
            tensors[f"{name}.magnitude"] = record_magnitude(magnitude, tensors[f"{name}.lora_A.weight"].ndim)
    unmappable(
        path, bad, "LoRA layer", " (expected <module>.lora_A.weight / .lora_B.weight / .alpha / .lora_magnitude_vector)"
    )
    declared, rslora, dora = _declared_alphas(path, header, names, component)
    if dora is not None and dora != bool(magnitudes):
        raise file_error(
            path,
            f"its metadata says use_dora={dora} but it holds {'no' if dora else ''} {PEFT_MAGNITUDE} tensors; "
            "diffusers would build other layers than the tensors describe",
        )
    file = foreign_record(path, "diffusers", tensors, {**declared, **alphas}, rslora=rslora, origins=origins)
    return kept_record(dataclasses.replace(file, component=component), header)
