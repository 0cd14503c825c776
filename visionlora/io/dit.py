"""Diffusion transformers' original layouts: Flux.1 as BFL ships it, SD3/3.5 as SAI ships it.

The original models fuse some Linears that diffusers keeps apart: a Flux double block's
``img_attn.qkv`` is diffusers' ``attn.to_q``, ``to_k``, ``to_v`` stacked by rows, a single block's
``linear1`` is ``to_q``, ``to_k``, ``to_v`` and ``proj_mlp``; SD3's ``x_block.attn.qkv`` likewise.
A :class:`Group` records one original module and the diffusers modules its rows hold, in order;
``swap`` marks the final AdaLN modulation, whose two row halves are (shift, scale) in the original
and (scale, shift) in diffusers; SD3's last block's context modulation is swapped too, and is
known by its shape (2 chunks of the width where the other blocks have 6). Whole checkpoints map
both ways (:func:`original_state_dict`, :func:`diffusers_state_dict`); LoRA on these modules is
:mod:`visionlora.io.fused`'s.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from visionlora.errors import ConfigError

__all__ = [
    "Group",
    "diffusers_state_dict",
    "dit_family",
    "flat_original_names",
    "groups",
    "layout",
    "original_family",
    "original_state_dict",
    "split_sizes",
    "swap_halves",
    "swapped",
]

_FLUX_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
_FLUX_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
_FLUX_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_SD3_BLOCK = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block.attn.proj": ("attn.to_out.0",),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",),
    "x_block.adaLN_modulation.1": ("norm1.linear",),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block.attn.proj": ("attn.to_add_out",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",),
    "context_block.mlp.fc2": ("ff_context.net.2",),
    "context_block.adaLN_modulation.1": ("norm1_context.linear",),
}
_SD3_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_NORMS = {
    "double_blocks": {
        "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
        "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
        "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
        "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    },
    "single_blocks": {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"},
    "joint_blocks": {
        "x_block.attn.ln_q.weight": "attn.norm_q.weight",
        "x_block.attn.ln_k.weight": "attn.norm_k.weight",
        "context_block.attn.ln_q.weight": "attn.norm_added_q.weight",
        "context_block.attn.ln_k.weight": "attn.norm_added_k.weight",
        "x_block.attn2.ln_q.weight": "attn2.norm_q.weight",
        "x_block.attn2.ln_k.weight": "attn2.norm_k.weight",
    },
}
"""Parameters that are no Linear's: original name -> diffusers name, per block (SD3's ``pos_embed`` too)."""
_DIFFUSERS_STACK = {
    "double_blocks": "transformer_blocks",
    "single_blocks": "single_transformer_blocks",
    "joint_blocks": "transformer_blocks",
}
_STACKS = {"flux": ("double_blocks", "single_blocks"), "sd3": ("joint_blocks",)}


@dataclass(frozen=True)
class Group:
    """One module of the original layout and the diffusers modules its output rows hold, in order."""

    original: str
    parts: tuple[str, ...]
    swap: bool = False
    """The rows are (shift, scale) halves in the original and (scale, shift) in diffusers."""


def groups(family: str, blocks: int, singles: int = 0) -> list[Group]:
    """Every LoRA-able module of a ``family`` model with ``blocks`` double/joint blocks and ``singles``
    single blocks."""
    found: list[Group] = []
    if family == "flux":
        for i in range(blocks):
            found += [
                _group(f"double_blocks.{i}.", f"transformer_blocks.{i}.", o, ps) for o, ps in _FLUX_DOUBLE.items()
            ]
        for i in range(singles):
            found += [
                _group(f"single_blocks.{i}.", f"single_transformer_blocks.{i}.", o, ps)
                for o, ps in _FLUX_SINGLE.items()
            ]
        top = _FLUX_TOP
    else:
        for i in range(blocks):
            found += [_group(f"joint_blocks.{i}.", f"transformer_blocks.{i}.", o, ps) for o, ps in _SD3_BLOCK.items()]
        top = _SD3_TOP
    found += [Group(o, (d,)) for o, d in top.items()]
    found.append(Group("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True))
    return found


def _group(original: str, diffusers: str, name: str, parts: tuple[str, ...]) -> Group:
    return Group(original + name, tuple(diffusers + p for p in parts))


def swapped(group: Group, rows: int, width: int) -> bool:
    """Whether ``group``'s rows are swapped halves: the final layer's, and SD3's last context modulation
    (the only one with 2 chunks)."""
    return group.swap or (group.original.endswith("context_block.adaLN_modulation.1") and rows == 2 * width)


def _count(names: Iterable[str], stack: str) -> int:
    indices = [int(m.group(1)) for n in names if (m := re.match(rf"{stack}\.(\d+)\.", n))]
    return max(indices) + 1 if indices else 0


def original_family(names: Iterable[str]) -> str | None:
    """``flux`` or ``sd3`` for module names in an original layout (dotted), else None."""
    names = list(names)
    for family, stacks in _STACKS.items():
        if any(n.startswith(f"{s}.") for n in names for s in stacks):
            return family
    return None


_FLAT_FAMILY = (
    ("flux", ("double_blocks_", "single_blocks_", "img_in", "txt_in", "time_in_", "vector_in_", "guidance_in_")),
    ("sd3", ("joint_blocks_", "x_embedder_proj", "t_embedder_", "y_embedder_")),
)


def flat_original_names(flat: Iterable[str], family: str | None = None) -> tuple[str | None, dict[str, str]]:
    """The family of sd-scripts' flattened original-layout names (``double_blocks_0_img_attn_qkv``)
    and each known one's dotted name (``double_blocks.0.img_attn.qkv``); ``family`` where the names
    alone do not tell (a file with only ``final_layer`` LoRA)."""
    flat = list(flat)
    for name, starts in _FLAT_FAMILY:
        if family is None and any(f.startswith(starts) for f in flat):
            family = name
    if family is None:
        return None, {}
    numbered = [re.sub(r"^(double_blocks|single_blocks|joint_blocks)_(\d+)_", r"\1.\2.", f) for f in flat]
    layout = groups(
        family, _count(numbered, "double_blocks") + _count(numbered, "joint_blocks"), _count(numbered, "single_blocks")
    )
    known = {g.original.replace(".", "_"): g.original for g in layout}
    return family, {f: known[f] for f in flat if f in known}


def dit_family(names: Iterable[str]) -> str | None:
    """``flux`` or ``sd3`` for a diffusers transformer's parameter or module names, else None.

    A Flux model has single-stream blocks or a linear patch embedder (``x_embedder``); SD3 a conv
    one (``pos_embed.proj``). LoRA names alone may not tell (both have ``transformer_blocks``).
    """
    names = list(names)
    if any(
        n.startswith(("single_transformer_blocks.", "x_embedder", "time_text_embed.guidance_embedder")) for n in names
    ):
        return "flux"
    if any(n.startswith(("pos_embed.", "transformer_blocks.0.attn2.")) for n in names):
        return "sd3"
    return None


def layout(family: str, names: list[str]) -> list[Group]:
    blocks = max(_count(names, "double_blocks"), _count(names, "joint_blocks"), _count(names, "transformer_blocks"))
    singles = max(_count(names, "single_blocks"), _count(names, "single_transformer_blocks"))
    return groups(family, blocks, singles)


def swap_halves(b: torch.Tensor) -> torch.Tensor:
    """``b`` with its two row halves exchanged (the original's (shift, scale) <-> diffusers' (scale, shift))."""
    first, second = b.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def split_sizes(group: Group, rows: int, width: int) -> list[int] | None:
    count = len(group.parts)
    if count == 1:
        return [rows]
    if group.parts[-1].endswith("proj_mlp"):  # Flux linear1: q, k, v as wide as the input, then the MLP
        return [width] * 3 + [rows - 3 * width] if rows > 3 * width else None
    return [rows // count] * count if rows % count == 0 else None


def _renames(family: str, names: list[str]) -> dict[str, str]:
    """Original -> diffusers names of the parameters that are no Linear's (norm scales, SD3's positions)."""
    found = {"pos_embed": "pos_embed.pos_embed"} if family == "sd3" else {}
    for stack in _STACKS[family]:
        count = max(_count(names, stack), _count(names, _DIFFUSERS_STACK[stack]))
        if stack == "single_blocks":
            count = max(_count(names, "single_blocks"), _count(names, "single_transformer_blocks"))
        for i in range(count):
            for original, diffusers in _NORMS[stack].items():
                found[f"{stack}.{i}.{original}"] = f"{_DIFFUSERS_STACK[stack]}.{i}.{diffusers}"
    return found


def original_state_dict(state: Mapping[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """A diffusers Flux or SD3 transformer's state dict in the original layout (BFL's, SAI's),
    fused modules concatenated and swapped halves swapped, as the original checkpoints hold it.

    Raises:
        ConfigError: tensors with no place in the original layout, or a fused module with only
            some of its parts.
    """
    names = list(state)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for group in layout(family, names):
        weights = [f"{p}.weight" for p in group.parts]
        present = [k for k in weights if k in state]
        if not present:
            continue
        if len(present) != len(weights):
            raise ConfigError(f"{group.original}: the model has {present} but not all of {weights}")
        rows, width = sum(state[k].shape[0] for k in weights), state[weights[0]].shape[1]
        for param in ("weight", "bias"):
            keys = [f"{p}.{param}" for p in group.parts]
            if all(k in state for k in keys):
                fused = torch.cat([state[k] for k in keys])
                out[f"{group.original}.{param}"] = swap_halves(fused) if swapped(group, rows, width) else fused
                used.update(keys)
    for original, diffusers in _renames(family, names).items():
        if diffusers in state:
            out[original] = state[diffusers]
            used.add(diffusers)
    left = [k for k in names if k not in used]
    if left:
        raise ConfigError(f"{family} transformer tensors with no place in the original layout: {left[:10]}")
    return out


def diffusers_state_dict(original: Mapping[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """An original-layout Flux or SD3 checkpoint (``model.diffusion_model.`` prefixes allowed) as
    the diffusers transformer's state dict: the inverse of :func:`original_state_dict`.

    Raises:
        ConfigError: tensors that are no part of the original layout, or rows that do not split.
    """
    state = {k.removeprefix("model.diffusion_model."): v for k, v in original.items()}
    names = list(state)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for group in layout(family, names):
        weight = state.get(f"{group.original}.weight")
        if weight is None:
            continue
        rows, width = weight.shape[0], weight.shape[1]
        sizes = split_sizes(group, rows, width)
        if sizes is None:
            raise ConfigError(f"{group.original}: {rows} rows do not split into {list(group.parts)}")
        for param in ("weight", "bias"):
            key = f"{group.original}.{param}"
            if key in state:
                tensor = swap_halves(state[key]) if swapped(group, rows, width) else state[key]
                out.update({f"{p}.{param}": t for p, t in zip(group.parts, torch.split(tensor, sizes), strict=True)})
                used.add(key)
    for source, target in _renames(family, names).items():
        if source in state:
            out[target] = state[source]
            used.add(source)
    left = [k for k in names if k not in used]
    if left:
        raise ConfigError(f"tensors that are no part of the {family} original layout: {left[:10]}")
    return out
