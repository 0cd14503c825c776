"""diffusers LoRA files: ``unet.<module>.lora_A.weight`` / ``unet.<module>.lora_B.weight``.

diffusers reads this format on two paths that disagree about alpha: ``pipeline.load_lora_weights``
reads the ``lora_adapter_metadata`` header, while ``UNet2DConditionModel.load_lora_adapter(path)``
without ``weight_name`` drops the header and takes alpha = rank (scale 1) for every module. The
writer makes both paths agree by folding each module's whole scale into its B and declaring
alpha = rank for every module in the header too; the original ranks, alphas and config stay in
the ``visionlora`` header entry, so visionlora reads the file back unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from visionlora.io.adapter import AdapterFile, file_error
from visionlora.io.convert import (
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
    require_finite,
    scalar_alpha,
    unmappable,
)
from visionlora.io.files import write_safetensors

__all__ = ["LORA_WEIGHTS_FILE", "METADATA_KEY", "PREFIX", "read_diffusers", "write_diffusers"]

PREFIX = "unet"
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # what load_lora_weights(folder) looks for
METADATA_KEY = "lora_adapter_metadata"


def write_diffusers(
    file: AdapterFile, path: Path, *, dtype: torch.dtype | None = None, overwrite: bool = False
) -> Path:
    """Write ``file`` as a diffusers LoRA file (a folder gets ``pytorch_lora_weights.safetensors``).

    An existing file is replaced only with ``overwrite``.

    Raises:
        AdapterFileError: a layer diffusers' PEFT layers would run differently, or trained
            non-LoRA tensors (the format has no place for them); each is named.
    """
    require_exportable(file, "diffusers", lora_only=True)
    if path.is_dir():
        path = path / LORA_WEIGHTS_FILE
    tensors: dict[str, torch.Tensor] = {}
    for name in file.layers:
        a, b = file.tensors[f"{name}.lora_A.weight"], file.tensors[f"{name}.lora_B.weight"]
        out_dtype = dtype or b.dtype
        tensors[f"{PREFIX}.{name}.lora_A.weight"] = a.to(out_dtype)
        tensors[f"{PREFIX}.{name}.lora_B.weight"] = (b.double() * layer_scale(file, name)).to(out_dtype)
    ranks = {n: s.rank for n, s in file.layers.items()}
    rank = most_common(ranks.values())
    pattern = {anchored(n): r for n, r in ranks.items() if r != rank}
    config: dict[str, Any] = {
        "r": rank,
        "lora_alpha": rank,  # alpha = rank everywhere: the scale is folded into B
        "rank_pattern": pattern,
        "alpha_pattern": pattern,
        "target_modules": exact_regex(file.layers),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
    }
    header = {
        "format": "pt",
        METADATA_KEY: json.dumps({f"{PREFIX}.{k}": v for k, v in config.items()}, sort_keys=True),
        **export_header(file),
    }
    return write_safetensors(path, require_finite(file.path, tensors), header, overwrite=overwrite)


def _declared_alphas(path: Path, header: Mapping[str, str], names: set[str]) -> tuple[dict[str, float], bool]:
    """Per-layer alphas (and rsLoRA) from diffusers' ``lora_adapter_metadata`` header; empty without one."""
    raw = header.get(METADATA_KEY)
    if not raw:
        return {}, False
    meta = header_json(path, raw, METADATA_KEY)
    if not isinstance(meta, dict):
        raise file_error(path, f"the {METADATA_KEY!r} header entry is not a JSON object")
    meta = {k.removeprefix(f"{PREFIX}."): v for k, v in meta.items()}
    if meta.get("use_dora") or meta.get("lora_bias"):
        raise file_error(path, "the adapter uses DoRA or LoRA biases, which visionlora does not reproduce")
    alpha, patterns = meta.get("lora_alpha", meta.get("r")), meta.get("alpha_pattern") or {}
    check_patterns(path, patterns, f"the {METADATA_KEY!r} header's alpha_pattern")
    alphas = {n: pattern_value(patterns, n, alpha) for n in names}
    return {n: a for n, a in alphas.items() if a is not None}, meta.get("use_rslora") is True


def read_diffusers(path: Path, raw: dict[str, torch.Tensor], header: Mapping[str, str]) -> AdapterFile:
    """A diffusers (PEFT-keyed) LoRA file as a record: alphas from its header, else alpha = rank.

    Raises:
        AdapterFileError: text-encoder or other keys that cannot be mapped onto the UNet, listed.
    """
    prefixed = any(k.startswith(f"{PREFIX}.") for k in raw)
    outside = [k for k in raw if prefixed and not k.startswith(f"{PREFIX}.")]
    unmappable(path, outside, "UNet", " (text-encoder LoRA is not something visionlora adapts)")
    tensors: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    bad = []
    for key, tensor in raw.items():
        name = key.removeprefix(f"{PREFIX}.") if prefixed else key
        if name.endswith((".lora_A.weight", ".lora_B.weight")):
            tensors[name] = tensor
        elif name.endswith(".alpha"):
            alphas[name.removesuffix(".alpha")] = scalar_alpha(path, key, tensor)
        else:
            bad.append(key)
    names = {k.rsplit(".lora_", 1)[0] for k in tensors}
    bad += [f"{n}.alpha" for n in alphas if n not in names]
    unmappable(path, bad, "LoRA layer", " (expected <module>.lora_A.weight / .lora_B.weight / .alpha)")
    declared, rslora = _declared_alphas(path, header, names)
    file = foreign_record(path, "diffusers", tensors, {**declared, **alphas}, rslora=rslora)
    return kept_record(file, header)
