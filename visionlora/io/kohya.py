"""kohya LoRA / LoCon files, as A1111, ComfyUI and diffusers' kohya converter read them.

Per adapted module ``lora_unet_<module name with . replaced by _>`` (a text encoder's:
``lora_te_text_model_<name>``, ``lora_te2_`` for SDXL's second). An SDXL UNet's modules are named
as in its original SGM layout, as sd-scripts' ``sdxl_train_network.py`` writes them
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``):

- ``.lora_down.weight``: A (a conv's keeps the kernel: ``[r, in, kh, kw]``);
- ``.lora_up.weight``: B (``[out, r]``, or ``[out, r, 1, 1]`` for a conv);
- ``.alpha``: a scalar tensor; the branch is scaled by alpha / r.

Every module of the file carries the same ``.alpha`` and any difference of its own scale is folded
into B: sd-scripts, A1111, ComfyUI and LyCORIS read a true alpha per module, but diffusers' kohya
converter renames attention keys so that their alphas no longer line up and falls back to the
most common one. One alpha is the form all of them apply alike; the true per-module ranks and
alphas stay in the header's kept record, which visionlora's own import restores. On import,
LyCORIS' Tucker form (``.lora_mid.weight``: down is 1x1, the kernel sits in mid) is read exactly by
folding mid into A, since up·(mid∘down) = up·A with A = mid∘down. Module names are flattened
with ``_``, so mapping them back needs the model (:func:`resolve_names`) unless the file keeps
visionlora's own record (``visionlora``; ``visionlora.text_encoder`` for the text encoder).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionlora._tree import adaptable_kind, iter_modules
from visionlora.branches import split_adapter_key
from visionlora.io.adapter import AdapterFile, LayerSpec, Source, check_tensors, file_error
from visionlora.io.convert import (
    KINDS_BY_NDIM,
    foreign_record,
    header_json,
    kept_key,
    kept_record,
    scalar_alpha,
    unmappable,
)
from visionlora.io.dit import flat_original_names, layout
from visionlora.io.fused import split_record
from visionlora.io.ldm import unet_ldm_names
from visionlora.io.lycoris import FAMILY_PARTS, record_parts
from visionlora.state import original_state_dict

__all__ = [
    "NAMES_KEY",
    "PREFIXES",
    "components_in",
    "flat_name",
    "is_kohya",
    "kohya_name",
    "read_kohya",
    "resolve_names",
    "sgm_names",
]

PREFIXES: dict[str, tuple[str, ...]] = {
    "unet": ("lora_unet_", "lycoris_"),  # lycoris_: LyCORIS' own wrapper on any model
    "transformer": ("lora_unet_",),  # Flux / SD3, with the original layout's module names
    "text_encoder": ("lora_te_", "lora_te1_"),  # SD 1.x/2.x, and SDXL's, SD3's and Flux's CLIP-L
    "text_encoder_2": ("lora_te2_", "lora_te3_"),  # SDXL's and SD3's second CLIP; Flux's T5 is lora_te3_
    "text_encoder_3": ("lora_te3_",),  # SD3's T5
}
"""Key prefixes per component; the first is the one written (but see :func:`_prefix_for`)."""
_DIT_NAMES = re.compile(
    r"(double_blocks|single_blocks|joint_blocks)_\d+_|(img_in|txt_in|context_embedder|final_layer|x_embedder_proj)"
    r"(_|\.|$)|(time_in|vector_in|guidance_in|t_embedder|y_embedder)_"
)
"""Flattened module names of Flux's (BFL) and SD3's (SAI) original layouts, which sd-scripts writes."""
logger = logging.getLogger("visionlora")
_PARTS = (".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".alpha", *FAMILY_PARTS)
_TEXT_MODEL = "text_model."
NAMES_KEY = "visionlora.kohya_names"
"""Header entry of an export with SGM names: its flattened UNet names -> the diffusers module names."""


def sgm_names(state_keys: list[str]) -> dict[str, str] | None:
    """An SDXL UNet's module names (from its state dict's keys) -> their names in the original SGM
    layout; None for any other model."""
    if "add_embedding.linear_1.weight" not in state_keys:
        return None
    per_block = len({k.split(".")[3] for k in state_keys if k.startswith("down_blocks.0.resnets.")})
    names = unet_ldm_names(list(state_keys), per_block)
    return {k[: -len(".weight")]: v[: -len(".weight")] for k, v in names.items() if k.endswith(".weight")}


def flat_name(name: str) -> str:
    """The kohya module name for ``name``: ``down_blocks.0.attn1.to_q`` -> ``down_blocks_0_attn1_to_q``."""
    return name.replace(".", "_")


def kohya_name(component: str, name: str) -> str:
    """The flattened name kohya's consumers expect for module ``name`` of ``component`` (no prefix).

    Text encoders are named as CLIPTextModel's ``text_model.`` submodule, which recent transformers
    versions no longer have (``encoder.layers.0...``): the prefix is added where it is missing.
    """
    if component not in ("unet", "transformer") and not name.startswith((_TEXT_MODEL, "encoder.block.", "shared")):
        name = _TEXT_MODEL + name  # a CLIP's (a T5's names have no such prefix)
    return flat_name(name)


def _component_of(key: str, flux: bool = False) -> tuple[str, str] | None:
    """(component, prefix) of a kohya key, or None when no component's prefix starts it. ``flux``:
    the file is a Flux LoRA, whose ``lora_te3_`` is the pipeline's ``text_encoder_2`` (T5)."""
    if key.startswith("lora_unet_"):
        return ("transformer" if _DIT_NAMES.match(key[len("lora_unet_") :]) else "unet"), "lora_unet_"
    if key.startswith("lora_te3_"):
        return ("text_encoder_2" if flux else "text_encoder_3"), "lora_te3_"
    for component, prefixes in PREFIXES.items():
        for prefix in prefixes:
            if key.startswith(prefix) and prefix not in ("lora_unet_", "lora_te3_"):
                return component, prefix
    return None


def _is_flux(raw: Mapping[str, torch.Tensor], header: Mapping[str, str]) -> bool:
    """Whether a kohya file is a Flux LoRA: BFL block names, or sd-scripts' Flux network module."""
    network = header.get("ss_network_module", "")
    return "flux" in network or any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in raw)


_COMFY = "diffusion_model."


def _kohya_keys(raw: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """ComfyUI's saved form (``diffusion_model.<module>.lora_up.weight``, the original layout's dotted
    names) as kohya's ``lora_unet_<module>`` keys; any other file unchanged."""
    if not any(k.startswith(_COMFY) for k in raw):
        return raw
    renamed = {}
    for key, tensor in raw.items():
        part = next((p for p in _PARTS if key.endswith(p)), None)
        if key.startswith(_COMFY) and part is not None:
            key = "lora_unet_" + flat_name(key[len(_COMFY) : -len(part)]) + part
        renamed[key] = tensor
    return renamed


def is_kohya(raw: Mapping[str, torch.Tensor]) -> bool:
    """Whether a file's keys are kohya's (or ComfyUI's saved form of them): some start with a
    component prefix, none is PEFT-style (``.lora_A.``)."""
    raw = _kohya_keys(raw)
    return any(_component_of(k) is not None for k in raw) and not any(".lora_A." in k or ".lora_B." in k for k in raw)


def components_in(raw: Mapping[str, torch.Tensor], header: Mapping[str, str] | None = None) -> list[str]:
    """The components a kohya file holds LoRA for, in :data:`PREFIXES` order."""
    raw = _kohya_keys(raw)
    flux = _is_flux(raw, header or {})
    found = {c[0] for c in (_component_of(k, flux) for k in raw) if c is not None}
    return [c for c in PREFIXES if c in found]


def _fold_mid(path: Path, base: str, down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """A for a Tucker (down 1x1, mid kxk) LoCon: A[a, i, ...] = sum_b mid[a, b, ...] · down[b, i]."""
    if down.ndim != mid.ndim or down.ndim < 3 or any(s != 1 for s in down.shape[2:]) or mid.shape[1] != down.shape[0]:
        raise file_error(
            path, f"{base}: lora_mid {tuple(mid.shape)} and lora_down {tuple(down.shape)} are not a Tucker pair"
        )
    folded = torch.einsum("ab...,bi->ai...", mid.double(), down.double().flatten(1))
    return folded.to(down.dtype)


def read_kohya(source: Source, component: str = "unet") -> AdapterFile:
    """One component's LoRA from a kohya LoRA/LoCon file, names flattened unless the file keeps visionlora's record.

    Raises:
        AdapterFileError: the file holds nothing for ``component`` (the message says what it
            holds), or LoHa/LoKr/DoRA/full-diff keys or anything else that is not a LoRA
            down/up(/mid)/alpha of a component's module, listed.
    """
    path, raw, header = source.path, _kohya_keys(source.tensors), source.header
    groups: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    flux = _is_flux(raw, header)
    for key, tensor in raw.items():
        part = next((p for p in _PARTS if key.endswith(p)), None)
        owner = _component_of(key, flux)
        if part is None or owner is None:
            bad.append(key)
        elif owner[0] == component:
            groups.setdefault(key[len(owner[1]) : -len(part)], {})[part] = tensor
    unmappable(
        path,
        bad,
        "LoRA, DoRA, LoHa or LoKr layer",
        " (full-weight diffs and LyCORIS' OFT, BOFT, GLoRA, IA3 are not read)",
    )
    if not groups:
        held = components_in(raw, header)
        raise file_error(path, f"holds no {component} LoRA; it holds LoRA for {held} (pass component=<one of those>)")
    prefix = _component_prefix(raw, component, flux)
    # Checked under their kohya names, before a Tucker mid is folded into A and its dtype lost.
    check_tensors(path, {k: v for k, v in raw.items() if not k.endswith(".alpha") and _owned(k, component, flux)})
    tensors: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for base, parts in groups.items():
        down, up, mid = parts.get(".lora_down.weight"), parts.get(".lora_up.weight"), parts.get(".lora_mid.weight")
        family = record_parts(path, prefix + base, parts)  # LyCORIS' tensors, DoRA's magnitude included
        if down is not None or up is not None or mid is not None or set(family) <= {"magnitude"}:
            others = sorted(set(family) - {"magnitude"})
            if others:
                raise file_error(path, f"{prefix}{base}: holds LoRA (lora_down/lora_up) and {others} together")
            if down is None or up is None:
                raise file_error(path, f"{prefix}{base}: needs both lora_down and lora_up, has {sorted(parts)}")
            tensors[f"{base}.lora_A.weight"] = down if mid is None else _fold_mid(path, prefix + base, down, mid)
            tensors[f"{base}.lora_B.weight"] = up
        tensors.update({f"{base}.{n}": t for n, t in family.items()})
        if ".alpha" in parts:
            alphas[base] = scalar_alpha(path, f"{prefix}{base}.alpha", parts[".alpha"])
    origins = {base: prefix + base for base in groups}
    file = dataclasses.replace(foreign_record(path, "kohya", tensors, alphas, origins=origins), component=component)
    kept_layers = _kept_layers(path, header, component)
    if component == "transformer":
        other = sorted(origins[n] for n, spec in file.layers.items() if spec.family != "lora")
        if other:
            raise file_error(
                path,
                f"{other[0]} is a {file.layers[_stem_of(other[0], prefix)].family} module of Flux's or SD3's original "
                "layout; visionlora splits LoRA on fused modules exactly, but not yet DoRA, LoHa or LoKr",
            )
        return kept_record(_diffusers_names(file, header, prefix, kept_layers), header)
    real = None if kept_layers is None else list(kept_layers)
    if real is None:
        return dataclasses.replace(file, flat_names=True)
    flat = {kohya_name(component, n): n for n in real}
    if component == "unet" and NAMES_KEY in header:
        names = header_json(path, header[NAMES_KEY], NAMES_KEY)
        if not isinstance(names, dict) or sorted(names.values()) != sorted(real):
            raise file_error(path, f"the {NAMES_KEY!r} header entry does not list the kept record's layers")
        flat = names
    return kept_record(_rename(file, flat), header)


def _stem_of(key: str, prefix: str) -> str:
    return key[len(prefix) :]


def _owned(key: str, component: str, flux: bool) -> bool:
    owner = _component_of(key, flux)
    return owner is not None and owner[0] == component


def _component_prefix(raw: Mapping[str, torch.Tensor], component: str, flux: bool) -> str:
    """The prefix ``component``'s keys carry in this file (``lora_te_`` or ``lora_te1_``, ...)."""
    return next(o[1] for k in raw if (o := _component_of(k, flux)) is not None and o[0] == component)


def _diffusers_names(
    file: AdapterFile, header: Mapping[str, str], prefix: str, kept: dict[str, Any] | None
) -> AdapterFile:
    """A Flux or SD3 LoRA in sd-scripts' original-layout names as LoRA on diffusers' modules, fused
    modules split exactly (with the kept record's ranks where the file has one)."""
    network = header.get("ss_network_module", "")
    hint = "flux" if "flux" in network else "sd3" if "sd3" in network else None
    family, dotted = flat_original_names(file.layers, hint)
    unknown = sorted(prefix + n for n in file.layers if n not in dotted)
    where = "Flux (BFL) or SD3 (SAI)" if family is None else {"flux": "Flux (BFL)", "sd3": "SD3 (SAI)"}[family]
    known = [prefix + g.original.replace(".", "_") for g in layout(family or "flux", list(dotted.values()))]
    unmappable(file.path, unknown, f"{where} module", " (no module of that name in the original layout)", known)
    assert family is not None  # every name is known, so the family was found
    ranks = {n: v["rank"] for n, v in (kept or {}).items() if isinstance(v, dict) and isinstance(v.get("rank"), int)}
    return split_record(_rename(file, dotted), family, ranks if kept is not None else None)


def _kept_layers(path: Path, header: Mapping[str, str], component: str) -> dict[str, Any] | None:
    key = kept_key(component)
    raw = header.get(key)
    if raw is None:
        return None
    layers = header_json(path, raw, key)
    layers = layers.get("layers") if isinstance(layers, dict) else None
    if not isinstance(layers, dict):
        raise file_error(path, f"the {key!r} header entry has no 'layers' mapping")
    return layers


def _rename(file: AdapterFile, names: Mapping[str, str]) -> AdapterFile:
    """``file`` with layer names replaced through ``names`` (tensors renamed to match)."""
    tensors = {}
    for key, tensor in file.tensors.items():
        layer, suffix = split_adapter_key(key) or (key, "")
        tensors[f"{names.get(layer, layer)}.{suffix}" if suffix else key] = tensor
    layers = {names.get(n, n): s for n, s in file.layers.items()}
    origins = {names.get(n, n): o for n, o in file.origins.items()}
    return dataclasses.replace(file, layers=layers, tensors=tensors, flat_names=False, origins=origins)


def _reshaped(spec: LayerSpec, a: torch.Tensor, b: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B in ``kind``'s layout: kohya stores 1x1 convs and Linears interchangeably."""
    if kind == "Linear" and a.ndim > 2 and all(s == 1 for s in (*a.shape[2:], *b.shape[2:])):
        return a.flatten(1), b.flatten(1)
    if kind != "Linear" and a.ndim == 2:
        ones = (1,) * (int(kind[-2]) if kind[-2].isdigit() else 2)
        return a.reshape(*a.shape, *ones), b.reshape(*b.shape, *ones)
    return a, b


def resolve_names(file: AdapterFile, model: nn.Module) -> AdapterFile:
    """Map a kohya file's flattened names onto ``model``'s modules (and 1x1-conv/Linear layouts).

    Raises:
        AdapterFileError: names that match no adaptable module, or match two, listed.
    """
    if not file.flat_names:
        return file
    prefix = PREFIXES[file.component][0]
    modules = dict(iter_modules(model))
    sgm = sgm_names(list(original_state_dict(model))) if file.component == "unet" else None
    candidates: dict[str, list[str]] = {}
    for name, module in modules.items():
        if adaptable_kind(name, module, modules) is not None:
            flats = {flat_name(name), kohya_name(file.component, name)}
            if sgm is not None and name in sgm:
                flats.add(flat_name(sgm[name]))
            for flat in flats:
                candidates.setdefault(flat, []).append(name)
    unknown = sorted(prefix + n for n in file.layers if n not in candidates)
    known = [prefix + c for c in candidates]
    unmappable(file.path, unknown, type(model).__name__, " (no module of that kohya name)", known)
    twice = sorted(f"{prefix}{n} -> {candidates[n]}" for n in file.layers if len(candidates[n]) > 1)
    if twice:
        raise file_error(file.path, f"kohya names match more than one module: {twice[:10]}")
    renamed = _rename(file, {n: candidates[n][0] for n in file.layers})
    tensors, layers = dict(renamed.tensors), dict(renamed.layers)
    for name, spec in renamed.layers.items():
        kind = adaptable_kind(name, modules[name], modules) or spec.kind
        if spec.family in ("lora", "dora"):
            a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
            tensors[a_key], tensors[b_key] = _reshaped(spec, tensors[a_key], tensors[b_key], kind)
            kind = KINDS_BY_NDIM.get(tensors[a_key].ndim, spec.kind)
        dims = 2 if kind == "Linear" else int(kind[-2]) + 2
        for suffix in ("magnitude", "lokr_w2"):  # kept as (out, 1, …) / (b, d, …): the layer's dimensions
            if f"{name}.{suffix}" in tensors:
                t = tensors[f"{name}.{suffix}"]
                if t.ndim != dims and t.ndim >= 2 and t.shape[2:].numel() == 1:  # else the load names the mismatch
                    tensors[f"{name}.{suffix}"] = t.reshape(*t.shape[:2], *([1] * (dims - 2)))
        layers[name] = dataclasses.replace(spec, kind=kind)
    return dataclasses.replace(renamed, tensors=tensors, layers=layers)
