"""SVD re-factorisation of adapters: resize trained adapters, extract adapters from full fine-tunes.

Every layer's ΔW is handled as a stack of matrices, one per group: ``(g, out / g, in / g · prod(k))``
for the per-group conv layout, a single ``(out, in / g · prod(k))`` matrix for Linear layers and the
shared layout. The best rank-r approximation of each matrix (Eckart–Young) is its truncated SVD, and
its relative error in the Frobenius norm is sqrt(Σ dropped σ²) / sqrt(Σ σ²).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from visionlora.bnb import float_weight
from visionlora.config import LoraConfig, is_finite_number
from visionlora.errors import ConfigError, TargetError
from visionlora.inject import Match, attach, check_new_adapter, match_targets, warn_ranks
from visionlora.io.adapter import LayerSpec, read_native
from visionlora.io.formats import write_adapter
from visionlora.layers import Adapter, LoraAdapter, LoraLayer, base_layer
from visionlora.lora_math import ConvGroups, is_transposed, lora_scale, lora_shapes
from visionlora.state import (
    adapter_state,
    lora_layers,
    original_buffers,
    original_parameters,
    require_unmerged,
    trained_extras,
)

__all__ = ["ResizedLayer", "extract_lora", "factor_svd", "resize_adapter", "split_svd"]


@dataclass(frozen=True)
class ResizedLayer:
    """One layer of a resize: its name, old and new rank, and ||ΔW - ΔW'||_F / ||ΔW||_F."""

    name: str
    old_rank: int
    new_rank: int
    relative_error: float


def factor_svd(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of each group's B_j @ A_j without forming the product (float64).

    Args:
        a: A, ``(groups · r, ...)`` (or ``(r, ...)`` for one group).
        b: B, ``(out, r, ...)``.

    Returns:
        U ``(g, out / g, k)``, S ``(g, k)``, Vh ``(g, k, f)`` with k = min(out / g, r, f) and
        B_j @ A_j = U_j diag(S_j) Vh_j; f is A's per-row size.
    """
    rank = b.shape[1]
    groups = a.shape[0] // rank
    a64 = a.detach().double().reshape(groups, rank, -1)
    b64 = b.detach().double().reshape(groups, b.shape[0] // groups, rank)
    q_b, r_b = torch.linalg.qr(b64)  # B_j = Q_b R_b
    q_a, r_a = torch.linalg.qr(a64.transpose(1, 2))  # A_j^T = Q_a R_a
    u, s, vh = torch.linalg.svd(r_b @ r_a.transpose(1, 2), full_matrices=False)
    return q_b @ u, s, vh @ q_a.transpose(1, 2)


def split_svd(u: Tensor, s: Tensor, vh: Tensor, rank: int, scale: float) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors (B, A) with scale · B @ A = the truncated SVD, split evenly (√σ each side).

    Components beyond those available are zero, so the shapes are always ``(g, out / g, rank)``
    and ``(g, rank, f)``.
    """
    k = min(rank, s.shape[1])
    root = torch.sqrt(s[:, :k] / scale)
    b = torch.zeros(u.shape[0], u.shape[1], rank, dtype=u.dtype, device=u.device)
    a = torch.zeros(vh.shape[0], rank, vh.shape[2], dtype=vh.dtype, device=vh.device)
    b[:, :, :k] = u[:, :, :k] * root[:, None, :]
    a[:, :k, :] = root[:, :, None] * vh[:, :k, :]
    return b, a


def _energy_rank(s: Tensor, energy: float) -> int:
    """Smallest r with Σ_groups Σ_{i<r} σ² >= energy · Σ σ² (at least 1)."""
    power = (s**2).sum(dim=0)  # energy of the i-th component, summed over groups
    total = power.sum()
    if total == 0:
        return 1
    kept = torch.cumsum(power, 0) / total
    return int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1


def _dropped_error(s: Tensor, rank: int) -> float:
    total = (s**2).sum()
    return 0.0 if total == 0 else math.sqrt(((s[:, rank:] ** 2).sum() / total).item())


def _rows_of_transposed(a: Tensor, groups: int) -> Tensor:
    """A transposed conv's A ``(in, r, *k)`` as a conv's ``(g·r, in/g · prod(k))``: group j's rows."""
    rank = a.shape[1]
    return a.reshape(groups, a.shape[0] // groups, rank, -1).transpose(1, 2).reshape(groups * rank, -1)


def _transposed_of_rows(rows: Tensor, groups: int, inputs: int, kernel: tuple[int, ...]) -> Tensor:
    """The inverse of :func:`_rows_of_transposed`: ``(g·r, in/g · prod(k))`` -> ``(in, r, *k)``."""
    rank = rows.shape[0] // groups
    return rows.reshape(groups, rank, inputs // groups, -1).transpose(1, 2).reshape(inputs, rank, *kernel)


def _transposed_groups(layer: nn.Module) -> int:
    """A ConvTranspose's groups; 0 for any other layer."""
    return int(getattr(layer, "groups", 1)) if is_transposed(layer) else 0


def _resize_factors(
    a: Tensor, b: Tensor, old_rank: int, target: int | None, energy: float | None, transposed: int = 0
) -> tuple[Tensor, Tensor, int, float]:
    """New (A, B) of a rank-``target`` (or ``energy``) truncation; ``transposed``: a ConvTranspose's groups."""
    rows = _rows_of_transposed(a, transposed) if transposed else a
    u, s, vh = factor_svd(rows, b)
    new_rank = min(old_rank, target if target is not None else _energy_rank(s, energy or 1.0))
    b_new, a_new = split_svd(u, s, vh, new_rank, 1.0)
    if transposed:
        a_out = _transposed_of_rows(a_new.reshape(-1, a_new.shape[-1]), transposed, a.shape[0], a.shape[2:]).to(a.dtype)
    else:
        a_out = a_new.reshape(-1, *a.shape[1:]).to(a.dtype)
    b_out = b_new.reshape(b.shape[0], new_rank, *b.shape[2:]).to(b.dtype)
    return a_out, b_out, new_rank, _dropped_error(s, new_rank)


def _check_resize_args(rank: int | None, energy: float | None) -> None:
    if (rank is None) == (energy is None):
        raise ConfigError("resize_adapter: give exactly one of rank= (a fixed rank) or energy= (a share in (0, 1])")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"resize_adapter: rank={rank!r} is invalid; ranks are integers >= 1")
    if energy is not None and not (is_finite_number(energy) and 0 < energy <= 1):
        raise ConfigError(f"resize_adapter: energy={energy!r} is invalid; it is a share of spectral energy in (0, 1]")


def _same_scale_alpha(adapter_scale: float, rank: int, rslora: bool) -> float:
    """The alpha that keeps the branch's scale when the rank changes."""
    return adapter_scale * (math.sqrt(rank) if rslora else rank)


def resize_adapter(
    model_or_file: nn.Module | str | os.PathLike[str],
    *,
    rank: int | None = None,
    energy: float | None = None,
    adapter_name: str = "default",
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> list[ResizedLayer]:
    """Re-factorise each layer's B·A by SVD to a smaller rank and report the error per layer.

    ``rank`` caps every layer at that rank; ``energy`` gives each layer the smallest rank that
    keeps that share of ΔW's spectral energy. Ranks never grow. Each layer keeps its scale (alpha
    becomes scale · r'), so outputs change only by the truncation, whose relative error is reported.

    Args:
        model_or_file: A model with adapter ``adapter_name`` (resized in place), or an adapter file.
        rank: Fixed target rank.
        energy: Share of spectral energy to keep, in (0, 1].
        adapter_name: The adapter to resize on a model.
        out: Where to write the resized file (required for a file, not used for a model).
        overwrite: Replace an existing ``out`` (otherwise it is refused).

    Example:
        >>> for row in vl.resize_adapter("adapter.safetensors", energy=0.9, out="small.safetensors"):
        ...     print(row.name, row.old_rank, "->", row.new_rank, f"{row.relative_error:.2%}")
    """
    _check_resize_args(rank, energy)
    if isinstance(model_or_file, nn.Module):
        if out is not None:
            raise ConfigError("resize_adapter: out= is for files; a model is resized in place")
        return _resize_model(model_or_file, rank, energy, adapter_name)
    if out is None:
        raise ConfigError("resize_adapter: give out= (the path of the resized file) when resizing a file")
    file = read_native(model_or_file)
    others = sorted(n for n, spec in file.layers.items() if spec.family not in ("lora", "dora"))
    if others:
        raise ConfigError(
            f"resize_adapter: {others[0]!r} is a {file.layers[others[0]].family} layer, whose kernel shape the file "
            "does not record; load the file onto its model (vl.load_adapter) and resize the model"
        )
    tensors = dict(file.tensors)
    layers: dict[str, LayerSpec] = {}
    report = []
    for name, spec in file.layers.items():
        a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        a, b, new_rank, error = _resize_factors(tensors[a_key], tensors[b_key], spec.rank, rank, energy)
        tensors[a_key], tensors[b_key] = a, b
        scale = lora_scale(spec.alpha, spec.rank, file.config.rslora)
        layers[name] = dataclasses.replace(
            spec, rank=new_rank, alpha=_same_scale_alpha(scale, new_rank, file.config.rslora)
        )
        report.append(ResizedLayer(name, spec.rank, new_rank, error))
    write_adapter(dataclasses.replace(file, path=Path(out), layers=layers, tensors=tensors), overwrite=overwrite)
    return report


def _set_factors(adapter: LoraAdapter, a: Tensor, b: Tensor, rank: int) -> None:
    trains = adapter.lora_A.requires_grad
    adapter.lora_A = nn.Parameter(a.to(adapter.lora_A.dtype), requires_grad=trains)
    adapter.lora_B = nn.Parameter(b.to(adapter.lora_B.dtype), requires_grad=trains)
    adapter.alpha = _same_scale_alpha(adapter.scale, rank, adapter.rslora)
    adapter.rank = rank
    adapter.scale = lora_scale(adapter.alpha, rank, adapter.rslora)
    adapter.held_rank, adapter.schedule = None, {}  # B's held-back columns are zero: the SVD saw the live ΔW


def _resize_model(model: nn.Module, rank: int | None, energy: float | None, adapter_name: str) -> list[ResizedLayer]:
    require_unmerged(model, "resize an adapter")
    cfg = adapter_state(model).configs.get(adapter_name)
    layers = [(n, layer) for n, layer in lora_layers(model) if adapter_name in layer.adapters]
    if cfg is None or not layers:
        raise TargetError(f"resize_adapter: the model has no layer with adapter {adapter_name!r}")
    resized: list[tuple[str, LoraLayer, Adapter, Tensor, Tensor, int, float]] = []
    for name, layer in layers:
        adapter = layer.adapter(adapter_name)
        if isinstance(adapter, LoraAdapter):
            t = _transposed_groups(layer.base)
            resized.append(
                (name, layer, adapter, *_resize_factors(adapter.lora_A, adapter.lora_B, adapter.rank, rank, energy, t))
            )
        else:
            delta = adapter.factor_delta(float_weight(layer.base).shape, layer.delta, torch.float64)
            resized.append((name, layer, adapter, *_lora_of_delta(layer.base, delta, rank, energy, cfg.conv_groups)))
    report = []
    for name, layer, adapter, a, b, new_rank, error in resized:  # every SVD has succeeded: now write
        report.append(ResizedLayer(name, adapter.rank, new_rank, error))
        if isinstance(adapter, LoraAdapter):
            _set_factors(adapter, a, b, new_rank)
        else:
            layer.adapters[adapter_name] = _as_lora(adapter, a, b, new_rank)
    families = {layer.adapter(adapter_name).family for _, layer in layers}
    cfg.rank_schedule = {}  # a resized adapter holds its new rank: no schedule grows it
    cfg.family, cfg.family_pattern = (families.pop(), {}) if len(families) == 1 else (cfg.family, {
        n: layer.adapter(adapter_name).family for n, layer in layers
    })  # fmt: skip
    return report


def _lora_of_delta(
    base: nn.Module, delta: Tensor, target: int | None, energy: float | None, conv_groups: ConvGroups
) -> tuple[Tensor, Tensor, int, float]:
    """(A, B) of the best LoRA of ``delta`` (a LoHa's or LoKr's ΔW) at rank ``target`` (or ``energy``), scale 1."""
    layer: Any = base
    groups = layer.groups if isinstance(base, nn.Conv1d | nn.Conv2d | nn.Conv3d) and conv_groups == "per_group" else 1
    u, s, vh = torch.linalg.svd(delta.reshape(groups, delta.shape[0] // groups, -1), full_matrices=False)
    new_rank = target if target is not None else _energy_rank(s, energy or 1.0)
    b, a = split_svd(u, s, vh, new_rank, 1.0)
    a_shape, b_shape = lora_shapes(layer, new_rank, conv_groups)
    return a.reshape(a_shape), b.reshape(b_shape), new_rank, _dropped_error(s, new_rank)


def _as_lora(adapter: Adapter, a: Tensor, b: Tensor, rank: int) -> LoraAdapter:
    """The LoRA adapter (scale 1) that replaces a LoHa or LoKr ``adapter``; a DoRA magnitude is kept."""
    like = next(iter(adapter.factors().values()))
    alpha = _same_scale_alpha(1.0, rank, adapter.rslora)
    new = LoraAdapter(
        a.to(like.dtype), b.to(like.dtype), rank=rank, alpha=alpha, rslora=adapter.rslora, dropout=adapter.dropout
    )  # LoHa and LoKr are never on a transposed conv (check_family)
    new.resolution, new.magnitude, new.norm_axis = adapter.resolution, adapter.magnitude, adapter.norm_axis
    return new.requires_grad_(like.requires_grad)


def _best_factors(match: Match, tuned: Tensor, base: Tensor, cfg: LoraConfig) -> tuple[Tensor, Tensor]:
    """(B, A) as group stacks with scale · B @ A the best rank-r approximation of tuned - base."""
    if tuned.device != base.device:
        raise TargetError(f"{match.name}: the fine-tuned weight is on {tuned.device}, the base's on {base.device}")
    delta = tuned.detach().double() - base.detach().double()
    if not torch.isfinite(delta).all():
        raise TargetError(f"{match.name}: the fine-tuned weight holds NaN or Inf")
    layer = base_layer(match.module)
    groups = getattr(layer, "groups", 1) if cfg.conv_groups == "per_group" or is_transposed(layer) else 1
    if is_transposed(layer):  # (in, out/g, *k) -> each group's (out/g, in/g · prod(k))
        matrices = delta.reshape(groups, delta.shape[0] // groups, delta.shape[1], -1).transpose(1, 2)
        matrices = matrices.reshape(groups, delta.shape[1], -1)
    else:
        matrices = delta.reshape(groups, delta.shape[0] // groups, -1)
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    return split_svd(u, s, vh, match.rank, lora_scale(match.alpha, match.rank, cfg.rslora))


def extract_lora(
    base_model: nn.Module,
    finetuned_model: nn.Module,
    cfg: LoraConfig,
    *,
    adapter_name: str = "default",
    example_input: Any = None,
) -> nn.Module:
    """Turn a full fine-tune into LoRA: add to ``base_model`` (in place) the adapter whose scale · B·A is
    the best rank-r approximation of (fine-tuned - base) weight on every target.

    Conv kernels are flattened to ``(out, in / g · prod(k))`` and handled per group (or as one
    matrix with ``conv_groups="shared"``). The ``trainable`` modules and chosen biases are copied
    from the fine-tune, and so are its buffers (BatchNorm statistics), so :func:`save_adapter`
    writes a file that reproduces the fine-tune as far as rank r allows. Returns ``base_model``.

    Raises:
        TargetError: if the two models differ in a targeted weight's name or shape.

    Example:
        >>> vl.extract_lora(base, finetuned, vl.LoraConfig(targets="preset:resnet-last-blocks", rank=16))
        >>> vl.save_adapter(base, "extracted.safetensors")
    """
    cfg = check_new_adapter(base_model, cfg, adapter_name)
    cfg.rank_schedule = {}  # an extracted adapter is whole from the start
    matches = match_targets(base_model, cfg, adapter_name=adapter_name, example_input=example_input)
    others = [m for m in matches if m.family != "lora"]
    if others:
        raise ConfigError(
            f"extract_lora: {others[0].name!r} would get family {others[0].family!r}; extraction gives the best "
            "rank-r LoRA (truncated SVD), which has no DoRA, LoHa or LoKr counterpart; use family='lora'"
        )
    tuned, base = original_parameters(finetuned_model), original_parameters(base_model)
    base |= {f"{m.name}.weight": float_weight(base_layer(m.module)) for m in matches}  # a bitsandbytes base's too
    extras = list(trained_extras(base_model, cfg, {m.name for m in matches}))
    needed = [f"{m.name}.weight" for m in matches] + extras
    problems = [k for k in needed if k not in tuned or tuned[k].shape != base[k].shape]
    if problems:
        raise TargetError(f"the fine-tuned model lacks, or has other shapes for: {', '.join(problems[:10])}")
    values = {k: tuned[k] for k in extras}
    for m in matches:
        b, a = _best_factors(m, tuned[f"{m.name}.weight"], base[f"{m.name}.weight"], cfg)
        layer = base_layer(m.module)
        a_shape, b_shape = lora_shapes(layer, m.rank, cfg.conv_groups)
        if is_transposed(layer):
            a = _transposed_of_rows(a.reshape(-1, a.shape[-1]), _transposed_groups(layer), a_shape[0], a_shape[2:])
        values[f"{m.name}.lora_A.weight"], values[f"{m.name}.lora_B.weight"] = a.reshape(a_shape), b.reshape(b_shape)
    tuned_buffers = original_buffers(finetuned_model)
    for key, buffer in original_buffers(base_model).items():
        if key in tuned_buffers and tuned_buffers[key].shape == buffer.shape:
            values[key] = tuned_buffers[key]
    warn_ranks(matches, cfg)
    attach(base_model, matches, cfg, adapter_name, values=values)  # every check has passed
    return base_model
