"""LoRA on a diffusion transformer's fused original-layout modules <-> LoRA on diffusers' separate
modules, exactly.

LoRA on separate diffusers modules becomes one LoRA on the fused module without approximation:
A is the parts' A stacked, B is block-diagonal with each part's scaled B, rank the sum of the
parts' ranks (:func:`fuse_lora`); this is also how sd-scripts saves its ``split_qkv`` LoRA. A
fused LoRA splits back exactly (:func:`split_lora`): each part keeps the columns of B its rows
use, or all of them, sharing A, when B is not block-diagonal (sd-scripts' default fused LoRA).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from visionlora.io.adapter import AdapterFile, file_error
from visionlora.io.convert import foreign_record, layer_scale
from visionlora.io.dit import Group, dit_family, layout, split_sizes, swap_halves, swapped

__all__ = ["fuse_lora", "fused_record", "split_lora", "split_record"]


def _ab(file: AdapterFile, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return file.tensors[f"{name}.lora_A.weight"], file.tensors[f"{name}.lora_B.weight"]


def fuse_lora(
    file: AdapterFile, family: str, model_state: Mapping[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A diffusers-named transformer LoRA as LoRA on the original layout's modules: tensors
    (``<original>.lora_A/B.weight``) and alphas (alpha = rank: every scale is folded into B).

    Raises:
        AdapterFileError: a layer with no place in the original layout.
    """
    names = list(file.layers)
    groups = layout(family, names + list(model_state or {}))
    placed = {p for g in groups for p in g.parts}
    missing = [n for n in names if n not in placed]
    if missing:
        raise file_error(file.path, f"{family} layers with no module in the original layout: {missing[:10]}")
    tensors: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for group in groups:
        present = [p for p in group.parts if p in file.layers]
        if not present:
            continue
        a_parts, b_parts = [], []
        width = _ab(file, present[0])[0].shape[1]
        rows = [_rows(file, group, p, width, model_state) for p in group.parts]
        for part in present:
            a, b = _ab(file, part)
            a_parts.append(a.double())
            b_parts.append(b.double() * layer_scale(file, part))
        rank = sum(a.shape[0] for a in a_parts)
        b_fused = torch.zeros(sum(rows), rank, dtype=torch.float64)
        column = 0
        for part, b in zip(present, b_parts, strict=True):
            start = sum(rows[: group.parts.index(part)])
            b_fused[start : start + b.shape[0], column : column + b.shape[1]] = b
            column += b.shape[1]
        if swapped(group, b_fused.shape[0], width):
            b_fused = swap_halves(b_fused)
        dtype = _ab(file, present[0])[1].dtype
        tensors[f"{group.original}.lora_A.weight"] = torch.cat(a_parts).to(dtype)
        tensors[f"{group.original}.lora_B.weight"] = b_fused.to(dtype)
        alphas[group.original] = float(rank)
    return tensors, alphas


def _rows(
    file: AdapterFile, group: Group, part: str, width: int, model_state: Mapping[str, torch.Tensor] | None
) -> int:
    """The output rows of ``part`` within ``group``'s fused module."""
    if part in file.layers:
        return int(_ab(file, part)[1].shape[0])
    if model_state is not None and f"{part}.weight" in model_state:
        return int(model_state[f"{part}.weight"].shape[0])
    if part.endswith("proj_mlp"):
        return 4 * width  # Flux.1's MLP ratio
    return width  # q, k, v: as wide as the input


def split_lora(
    file: AdapterFile, family: str, ranks: Mapping[str, int] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, str]]:
    """An original-layout LoRA (``file``'s layers named as the original modules) as LoRA on the
    diffusers modules: tensors, alphas (each part with the fused module's scale) and each part's
    original module.

    A part keeps the columns of B its rows use when the parts use disjoint columns (a fused export
    of separate LoRAs: ``ranks``, e.g. from a kept record, says how many each has); else every part
    shares the whole A. Parts whose rows are all zero in a block-diagonal B hold nothing and are left out.

    Raises:
        AdapterFileError: a layer that is no module of the original layout, rows that do not split
            into its parts, or ``ranks`` that disagree with B's nonzero blocks.
    """
    by_name = {g.original: g for g in layout(family, list(file.layers))}
    unknown = [n for n in file.layers if n not in by_name]
    if unknown:
        raise file_error(file.path, f"{family} original-layout names that are no LoRA-able module: {unknown[:10]}")
    tensors: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    fused: dict[str, str] = {}
    for name in file.layers:
        group = by_name[name]
        a, b = _ab(file, name)
        scale = layer_scale(file, name)
        if swapped(group, b.shape[0], a.shape[1]):
            b = swap_halves(b)
        sizes = split_sizes(group, b.shape[0], a.shape[1])
        if sizes is None:
            raise file_error(file.path, f"{name}: {b.shape[0]} output rows do not split into {list(group.parts)}")
        blocks = list(torch.split(b, sizes, dim=0))
        columns = _columns(file, name, group, blocks, ranks)
        for part, block, cols in zip(group.parts, blocks, columns, strict=True):
            if cols is None:
                continue
            tensors[f"{part}.lora_A.weight"] = a[cols].contiguous()
            tensors[f"{part}.lora_B.weight"] = block[:, cols].contiguous()
            alphas[part] = scale * len(cols)
            fused[part] = name
    return tensors, alphas, fused


def _columns(
    file: AdapterFile, name: str, group: Group, blocks: list[torch.Tensor], ranks: Mapping[str, int] | None
) -> list[list[int] | None]:
    """The columns of B (rows of A) each part keeps; None for a part that holds nothing."""
    rank = blocks[0].shape[1]
    every = list(range(rank))
    if len(blocks) == 1:
        return [every]
    if ranks is not None and any(p in ranks for p in group.parts):
        chosen: list[list[int] | None] = []
        start = 0
        for part in group.parts:
            count = ranks.get(part)
            chosen.append(None if count is None else list(range(start, start + count)))
            start += count or 0
        outside = [[c for c in every if c not in (cols or [])] for cols in chosen]
        if start != rank or any(bool(blk[:, cols].any()) for blk, cols in zip(blocks, outside, strict=True)):
            raise file_error(file.path, f"{name}: the kept record's ranks do not match the fused LoRA's blocks")
        return chosen
    support = [[c for c in every if bool(block[:, c].any())] for block in blocks]
    flat = [c for cols in support for c in cols]
    if flat and len(flat) == len(set(flat)):  # block-diagonal: each part its own columns
        return [cols or None for cols in support]
    return [every] * len(blocks)


def fused_record(file: AdapterFile, model_state: Mapping[str, torch.Tensor] | None) -> AdapterFile:
    """A Flux or SD3 transformer's LoRA record on its original layout's (fused) modules.

    Raises:
        AdapterFileError: the layer names (and ``model_state``) do not tell Flux from SD3.
    """
    family = dit_family(list(file.layers) + list(model_state or {}))
    if family is None:
        raise file_error(
            file.path,
            "is a transformer LoRA whose layer names do not tell Flux from SD3; export it from the model "
            "(vl.export_adapter(pipe.transformer, ...)) or convert it with --model",
        )
    tensors, alphas = fuse_lora(file, family, model_state)
    return dataclasses.replace(foreign_record(file.path, file.format, tensors, alphas), component="transformer")


def split_record(file: AdapterFile, family: str, ranks: Mapping[str, int] | None) -> AdapterFile:
    """An original-layout LoRA record (dotted original names) as the record on diffusers' modules;
    each part keeps the key stem of its fused module as its origin."""
    tensors, alphas, fused = split_lora(file, family, ranks)
    origins = {part: file.origins.get(name, name) for part, name in fused.items()}
    record = foreign_record(file.path, file.format, tensors, alphas, origins=origins)
    return dataclasses.replace(record, component="transformer")
