"""Writing kohya LoRA / LoCon files (and LyCORIS' LoHa, LoKr and DoRA in that layout): one file for
a model's or a pipeline's adapters, as sd-scripts writes them. The layout is described in
:mod:`visionlora.io.kohya` and :mod:`visionlora.io.lycoris`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import torch

from visionlora.branches import adapter_tensors
from visionlora.config import FAMILIES
from visionlora.io.adapter import AdapterFile, LayerSpec, Parts, Payload, file_error
from visionlora.io.convert import export_header, layer_scale, most_common, require_exportable
from visionlora.io.dit import original_family
from visionlora.io.fused import fused_record
from visionlora.io.kohya import NAMES_KEY, PREFIXES, flat_name, kohya_name, sgm_names
from visionlora.io.lycoris import file_parts, full_kron, scale_key

__all__ = ["kohya_tensors"]

logger = logging.getLogger("visionlora")


def _prefix_for(component: str, names: list[str], xl: bool, flux: bool) -> str:
    """The prefix sd-scripts writes for ``component``: ``lora_te1_`` beside a second encoder (SDXL,
    SD3, Flux), ``lora_te3_`` for a T5 (Flux's ``text_encoder_2``)."""
    if component == "text_encoder":
        return "lora_te1_" if xl else "lora_te_"
    if component == "text_encoder_2" and (flux or any(n.startswith("encoder.block.") for n in names)):
        return "lora_te3_"
    return PREFIXES[component][0]


def kohya_tensors(parts: Parts) -> Payload:
    """``parts.records`` (component -> record) as one kohya LoRA (LoCon for convs) file, every module
    with the same ``.alpha`` (the most common true alpha) and its own scale folded into its up (a
    LoHa's w1_a, a LoKr's w1). DoRA, LoHa and LoKr modules are written as LyCORIS writes them.

    The UNet's modules become ``lora_unet_<name>``, a text encoder's ``lora_te_text_model_<name>``
    (``lora_te2_`` for a second one).

    Raises:
        AdapterFileError: a layer kohya-style loaders would run differently, trained non-LoRA
            tensors, or two module names that flatten to the same kohya name; each is named.
    """
    by_flat: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    kept: dict[str, str] = {}
    dtype = parts.dtype
    sgm = sgm_names(list(parts.model_state)) if parts.model_state is not None and "unet" in parts.records else None
    for component, file in parts.records.items():
        # Flux's and SD3's fused modules take LoRA only: LoHa, LoKr and DoRA do not split into q, k, v exactly.
        families = ("lora",) if component == "transformer" else FAMILIES
        require_exportable(file, "kohya", lora_only=True, families=families)
    records = {c: fused_record(f, parts.model_state) if c == "transformer" else f for c, f in parts.records.items()}
    flux = "transformer" in records and original_family(records["transformer"].layers) == "flux"
    xl = sgm is not None or "text_encoder_2" in records or "transformer" in records  # sd-scripts' lora_te1_
    # diffusers' kohya converter loses per-module alphas: every module gets one alpha and the rest of
    # its scale is folded into B (the kept record unfolds it). Modules whose alpha is the shared one
    # keep B bit for bit.
    shared = most_common(s.alpha for file in records.values() for s in file.layers.values())
    for component, file in records.items():
        prefix = _prefix_for(component, list(file.layers), xl, flux)
        grouped = adapter_tensors(file.tensors)
        for name, spec in file.layers.items():
            flat = flat_name(sgm[name]) if sgm is not None and component == "unet" else kohya_name(component, name)
            key = prefix + flat
            if key in by_flat:
                raise file_error(file.path, f"modules {by_flat[key]!r} and {name!r} both flatten to kohya name {key!r}")
            by_flat[key] = name
            held = dict(grouped[name])
            # The file's scale is alpha / r (1 for a LoKr of two full halves); the rest is folded in.
            written = 1.0 if spec.family == "lokr" and full_kron(held) else shared / spec.rank
            ratio = layer_scale(file, name) / written
            if abs(ratio - 1) > 1e-12:
                carrier = scale_key(spec.family, held)
                held[carrier] = (held[carrier].double() * ratio).to(held[carrier].dtype)
            for ending, tensor in file_parts(spec.family, held).items():
                tensors[key + ending] = tensor if dtype is None else tensor.to(dtype)
            # alpha / r gives the layer's scale; float32 so any alpha survives (fp16 would round it).
            tensors[f"{key}.alpha"] = torch.tensor(shared, dtype=torch.float32)
        kept.update(export_header(parts.records[component]))
        _warn_attention_without_out_proj(component, file)
    specs = [s for file in records.values() for s in file.layers.values()]
    linear = [s for s in specs if s.kind == "Linear"] or specs
    conv = [s for s in specs if s.kind != "Linear"]
    algos = sorted({s.family for s in specs} - {"lora"})
    header = {
        "ss_network_module": "lycoris.kohya" if algos else "networks.lora",
        "ss_network_dim": str(most_common(s.rank for s in linear)),
        "ss_network_alpha": str(shared),
        **({"ss_network_args": _network_args(conv, shared, algos)} if conv or algos else {}),
        **kept,
    }
    if "transformer" in records and not flux:
        logger.warning(
            "%s: SD3 LoRA in sd-scripts' layout (lora_unet_joint_blocks_*) is read by ComfyUI and sd-scripts; "
            "diffusers' load_lora_weights has no converter for it and loads nothing: use format='diffusers' there",
            records["transformer"].path,
        )
    if any(k.endswith(".dora_scale") for k in tensors):
        logger.warning(
            "%s: DoRA in the kohya layout (dora_scale) is read by LyCORIS, ComfyUI and sd-scripts; diffusers' "
            "load_lora_weights drops dora_scale from kohya files (it loads plain LoRA, with a warning): use "
            "format='diffusers' there",
            next(iter(records.values())).path,
        )
    if sgm is not None:
        header[NAMES_KEY] = json.dumps({flat_name(sgm[n]): n for n in parts.records["unet"].layers})
    return Payload(tensors, header)


def _warn_attention_without_out_proj(component: str, file: AdapterFile) -> None:
    """diffusers' kohya converter misreads text-encoder q/k/v LoRA unless out_proj has LoRA too: say so."""
    attention = [n for n in file.layers if n.endswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))]
    if component != "unet" and attention and not any(n.endswith("self_attn.out_proj") for n in file.layers):
        logger.warning(
            "%s: the %s adapter has q/k/v_proj LoRA but none on out_proj; A1111 and ComfyUI read this kohya file "
            "whole, but diffusers' load_lora_weights cannot convert those keys without out_proj's (it refuses the "
            "file, or drops them next to MLP LoRA). For diffusers, export format='diffusers' or adapt out_proj too",
            file.path,
            component,
        )


def _network_args(conv: list[LayerSpec], alpha: float, algos: Sequence[str]) -> str:
    """kohya's ``network_args``: for LoCon the conv layers' (most common) rank and the file's alpha; for
    LyCORIS the algorithm (``loha``, ``lokr``; DoRA as ``dora_wd``)."""
    args = {"conv_dim": str(most_common(s.rank for s in conv)), "conv_alpha": str(alpha)} if conv else {}
    algo = [a for a in algos if a != "dora"]
    if algo:
        args["algo"] = algo[0] if len(algo) == 1 else ",".join(algo)
    if "dora" in algos:
        args["dora_wd"] = "True"
    return json.dumps(args)
