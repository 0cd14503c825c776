"""kohya LoRA / LoCon files, as A1111, ComfyUI and diffusers' kohya converter read them.

Per adapted module ``lora_unet_<module name with . replaced by _>``:

- ``.lora_down.weight``: A (a conv's keeps the kernel: ``[r, in, kh, kw]``);
- ``.lora_up.weight``: B (``[out, r]``, or ``[out, r, 1, 1]`` for a conv);
- ``.alpha``: a scalar tensor; the branch is scaled by alpha / r.

Every module gets its own true ``.alpha`` (the only form every consumer reads). On import,
LyCORIS' Tucker form (``.lora_mid.weight``: down is 1x1, the kernel sits in mid) is read exactly by
folding mid into A, since up·(mid∘down) = up·A with A = mid∘down. Module names are flattened
with ``_``, so mapping them back needs the model (:func:`resolve_names`) unless the file keeps
visionlora's own record.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from visionlora.inject import adaptable_kind, iter_modules
from visionlora.io.adapter import META_KEY, AdapterFile, LayerSpec, check_tensors, file_error
from visionlora.io.convert import (
    KINDS_BY_NDIM,
    export_header,
    foreign_record,
    kept_record,
    layer_scale,
    most_common,
    require_exportable,
    require_finite,
    scalar_alpha,
    unmappable,
)
from visionlora.io.files import write_safetensors

__all__ = ["PREFIX", "TEXT_PREFIXES", "flat_name", "read_kohya", "resolve_names", "write_kohya"]

PREFIX = "lora_unet_"
TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
_PARTS = (".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".alpha")


def flat_name(name: str) -> str:
    """The kohya module name for ``name``: ``down_blocks.0.attn1.to_q`` -> ``down_blocks_0_attn1_to_q``."""
    return name.replace(".", "_")


def write_kohya(file: AdapterFile, path: Path, *, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write ``file`` as a kohya LoRA (LoCon for convs) file with a true ``.alpha`` per module.

    An existing file at ``path`` is replaced only with ``overwrite``.

    Raises:
        AdapterFileError: a layer kohya-style loaders would run differently, trained non-LoRA
            tensors, or two module names that flatten to the same kohya name; each is named.
    """
    require_exportable(file, "kohya", lora_only=True)
    by_flat: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, spec in file.layers.items():
        key = PREFIX + flat_name(name)
        if key in by_flat:
            raise file_error(file.path, f"modules {by_flat[key]!r} and {name!r} both flatten to kohya name {key!r}")
        by_flat[key] = name
        a, b = file.tensors[f"{name}.lora_A.weight"], file.tensors[f"{name}.lora_B.weight"]
        tensors[f"{key}.lora_down.weight"] = a if dtype is None else a.to(dtype)
        tensors[f"{key}.lora_up.weight"] = b if dtype is None else b.to(dtype)
        # alpha / r must give the layer's scale; float32 so any alpha survives (fp16 would round it).
        tensors[f"{key}.alpha"] = torch.tensor(layer_scale(file, name) * spec.rank, dtype=torch.float32)
    linear = [s for s in file.layers.values() if s.kind == "Linear"] or list(file.layers.values())
    conv = [s for s in file.layers.values() if s.kind != "Linear"]
    header = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(most_common(s.rank for s in linear)),
        "ss_network_alpha": str(most_common(s.alpha for s in linear)),
        **({"ss_network_args": _conv_args(conv)} if conv else {}),
        **export_header(file),
    }
    return write_safetensors(path, require_finite(file.path, tensors), header, overwrite=overwrite)


def _conv_args(conv: list[LayerSpec]) -> str:
    """kohya's ``network_args`` for LoCon: the conv layers' (most common) rank and alpha."""
    return json.dumps(
        {"conv_dim": str(most_common(s.rank for s in conv)), "conv_alpha": str(most_common(s.alpha for s in conv))}
    )


def _fold_mid(path: Path, base: str, down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """A for a Tucker (down 1x1, mid kxk) LoCon: A[a, i, ...] = sum_b mid[a, b, ...] · down[b, i]."""
    if down.ndim != mid.ndim or down.ndim < 3 or any(s != 1 for s in down.shape[2:]) or mid.shape[1] != down.shape[0]:
        raise file_error(
            path, f"{base}: lora_mid {tuple(mid.shape)} and lora_down {tuple(down.shape)} are not a Tucker pair"
        )
    folded = torch.einsum("ab...,bi->ai...", mid.double(), down.double().flatten(1))
    return folded.to(down.dtype)


def read_kohya(path: Path, raw: dict[str, torch.Tensor], header: Mapping[str, str]) -> AdapterFile:
    """A kohya LoRA/LoCon file as a record; names stay flattened unless the file keeps visionlora's record.

    Raises:
        AdapterFileError: text-encoder keys, LoHa/LoKr/DoRA/full-diff keys or anything else that
            is not a LoRA down/up(/mid)/alpha of a UNet module, listed.
    """
    text = [k for k in raw if k.startswith(TEXT_PREFIXES)]
    unmappable(path, text, "UNet", " (text-encoder LoRA is not something visionlora adapts)")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, tensor in raw.items():
        part = next((p for p in _PARTS if key.endswith(p)), None)
        if part is None or not key.startswith(PREFIX):
            bad.append(key)
            continue
        groups.setdefault(key[len(PREFIX) : -len(part)], {})[part] = tensor
    unmappable(path, bad, "LoRA layer", " (LoHa, LoKr, DoRA and full-weight diffs are not LoRA)")
    # Checked under their kohya names, before a Tucker mid is folded into A and its dtype lost.
    check_tensors(path, {k: v for k, v in raw.items() if not k.endswith(".alpha")})
    tensors: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for base, parts in groups.items():
        down, up, mid = parts.get(".lora_down.weight"), parts.get(".lora_up.weight"), parts.get(".lora_mid.weight")
        if down is None or up is None:
            raise file_error(path, f"{PREFIX}{base}: needs both lora_down and lora_up, has {sorted(parts)}")
        tensors[f"{base}.lora_A.weight"] = down if mid is None else _fold_mid(path, PREFIX + base, down, mid)
        tensors[f"{base}.lora_B.weight"] = up
        if ".alpha" in parts:
            alphas[base] = scalar_alpha(path, f"{PREFIX}{base}.alpha", parts[".alpha"])
    file = foreign_record(path, "kohya", tensors, alphas)
    real = _kept_names(path, header)
    if real is None:
        return dataclasses.replace(file, flat_names=True)
    return kept_record(_rename(file, {flat_name(n): n for n in real}), header)


def _kept_names(path: Path, header: Mapping[str, str]) -> list[str] | None:
    raw = header.get(META_KEY)
    if raw is None:
        return None
    try:
        layers = json.loads(raw).get("layers")
    except (ValueError, RecursionError, AttributeError):
        raise file_error(path, "the 'visionlora' header entry is not a JSON object") from None
    if not isinstance(layers, dict):
        raise file_error(path, "the 'visionlora' header entry has no 'layers' mapping")
    return list(layers)


def _rename(file: AdapterFile, names: Mapping[str, str]) -> AdapterFile:
    """``file`` with layer names replaced through ``names`` (tensors renamed to match)."""
    tensors = {}
    for key, tensor in file.tensors.items():
        layer, _, suffix = key.rpartition(".lora_")
        tensors[f"{names.get(layer, layer)}.lora_{suffix}"] = tensor
    layers = {names.get(n, n): s for n, s in file.layers.items()}
    return dataclasses.replace(file, layers=layers, tensors=tensors, flat_names=False)


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
    modules = dict(iter_modules(model))
    candidates: dict[str, list[str]] = {}
    for name, module in modules.items():
        if adaptable_kind(name, module, modules) is not None:
            candidates.setdefault(flat_name(name), []).append(name)
    unknown = sorted(PREFIX + n for n in file.layers if n not in candidates)
    unmappable(file.path, unknown, type(model).__name__, " (no module of that kohya name)")
    twice = sorted(f"{PREFIX}{n} -> {candidates[n]}" for n in file.layers if len(candidates[n]) > 1)
    if twice:
        raise file_error(file.path, f"kohya names match more than one module: {twice[:10]}")
    renamed = _rename(file, {n: candidates[n][0] for n in file.layers})
    tensors, layers = dict(renamed.tensors), dict(renamed.layers)
    for name, spec in renamed.layers.items():
        kind = adaptable_kind(name, modules[name], modules) or spec.kind
        a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        tensors[a_key], tensors[b_key] = _reshaped(spec, tensors[a_key], tensors[b_key], kind)
        layers[name] = dataclasses.replace(spec, kind=KINDS_BY_NDIM.get(tensors[a_key].ndim, spec.kind))
    return dataclasses.replace(renamed, tensors=tensors, layers=layers)
