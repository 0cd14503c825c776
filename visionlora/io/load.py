"""Adding a stored adapter to a model: any supported format, checked in full before anything changes."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionlora._tree import adaptable_kind, iter_modules
from visionlora.bnb import float_weight
from visionlora.branches import FAMILY_KEYS, adapter_shapes, adapter_tensors
from visionlora.errors import AdapterError, ConfigError, VisionLoraError
from visionlora.inject import Match, attach, check_selected, check_wrappable
from visionlora.io.adapter import AdapterFile, file_error, geometry_of
from visionlora.io.formats import FORMAT_TABLE, check_component, components_of, open_adapter, read_component
from visionlora.layers import base_layer
from visionlora.models.loading import DENOISERS
from visionlora.state import adapter_state, check_adapter_name, original_buffers, original_parameters, require_unmerged

__all__ = ["fit_file", "fit_problems", "load_adapter"]

logger = logging.getLogger("visionlora")


def fit_problems(file: AdapterFile, model: nn.Module) -> tuple[list[Match], list[str]]:
    """The matches the file describes in ``model``, and every mismatch (``<layer or key>: <what>``)."""
    modules = dict(iter_modules(model))
    problems: list[str] = []
    matches: list[Match] = []
    grouped = adapter_tensors(file.tensors)
    for name, spec in file.layers.items():
        module = modules.get(name)
        if module is None:
            near = difflib.get_close_matches(name, list(modules), n=3, cutoff=0.5)
            problems.append(
                f"{name}: no such module in {type(model).__name__} (nothing would read its keys)"
                + (f"; nearest: {', '.join(near)}" if near else "")
            )
            continue
        if adaptable_kind(name, module, modules) != spec.kind:
            problems.append(f"{name}: file has a {spec.kind} adapter, the model has a {type(module).__name__} there")
            continue
        base = base_layer(module)
        held = {k: tuple(t.shape) for k, t in grouped.get(name, {}).items() if k in FAMILY_KEYS[spec.family]}
        try:
            shapes = adapter_shapes(base, spec.family, spec.rank, file.config, held)
        except ConfigError as exc:
            problems.append(f"{name}: {exc}")
            continue
        for key in sorted(set(held) - set(shapes)):
            problems.append(f"{name}.{key}: not part of a {spec.family} adapter laid out as {sorted(shapes)}")
        for suffix, shape in shapes.items():
            key = f"{name}.{suffix}"
            if key not in file.tensors:
                problems.append(
                    f"{key}: missing; a {spec.family} adapter of rank {spec.rank} here has {sorted(shapes)}"
                )
            elif tuple(file.tensors[key].shape) != shape:
                problems.append(
                    f"{key}: shape {tuple(file.tensors[key].shape)} in the file, {shape} expected for rank {spec.rank}"
                )
            elif not _fits_dtype(file.tensors[key], dtype := float_weight(base).dtype):
                problems.append(f"{key}: its values overflow the model's {dtype} (Inf after the cast)")
        matches.append(Match(name, module, spec.kind, spec.rank, spec.alpha, spec.resolution, spec.family))
    for keys, existing, what in (
        (file.extra, original_parameters(model), "parameter"),
        (file.buffers, original_buffers(model), "buffer"),
    ):
        for key in keys:
            if key not in existing:
                problems.append(f"{key}: no such {what} in {type(model).__name__}")
            elif existing[key].shape != file.tensors[key].shape:
                found, wanted = tuple(file.tensors[key].shape), tuple(existing[key].shape)
                problems.append(f"{key}: shape {found} in the file, {wanted} in the model")
            elif existing[key].is_floating_point() != file.tensors[key].is_floating_point() or (
                not existing[key].is_floating_point() and existing[key].dtype != file.tensors[key].dtype
            ):
                problems.append(
                    f"{key}: dtype {file.tensors[key].dtype} in the file, {existing[key].dtype} in the model"
                )
            elif not _fits_dtype(file.tensors[key], existing[key].dtype):
                problems.append(f"{key}: its values overflow the model's {existing[key].dtype} (Inf after the cast)")
    if FORMAT_TABLE[file.format].runs_lora_layers:
        for m in matches:
            reason = geometry_of(m.module).foreign_problem()
            if reason is not None:
                problems.append(
                    f"{m.name}: {reason}; {file.format}'s own LoRA layer runs this conv without it, so its unmerged "
                    "outputs differ from its merged ones and no load reproduces both"
                )
    return matches, problems


def _fit(file: AdapterFile, model: nn.Module) -> list[Match]:
    """The matches the file describes in ``model``; every mismatch is collected and raised together."""
    matches, problems = fit_problems(file, model)
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise file_error(file.path, f"does not fit {type(model).__name__}:\n  " + "\n  ".join(problems[:20]) + more)
    return matches


def _fits_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``tensor`` stays finite when copied into a ``dtype`` tensor (a float64 1e300 does not fit float32)."""
    return not dtype.is_floating_point or bool(torch.isfinite(tensor.to(dtype)).all())


def _sort_state(file: AdapterFile, model: nn.Module) -> AdapterFile:
    """Other formats do not say which non-LoRA tensors are parameters and which are buffers: ask the model."""
    buffers = original_buffers(model)
    names = file.extra + file.buffers
    return dataclasses.replace(
        file, extra=[k for k in names if k not in buffers], buffers=[k for k in names if k in buffers]
    )


def load_adapter(
    model: nn.Module | Any,
    path: str | os.PathLike[str],
    *,
    adapter_name: str | None = None,
    component: str | None = None,
) -> Any:
    """Add the adapter stored in ``path`` to ``model`` (in place) and make it the active one.

    Every key of the file is accounted for: each is applied to a module, or nothing is loaded.
    Every key, shape, dtype and value is checked before anything changes: on any error the model
    is left exactly as it was, and the error lists the keys nothing would read with the nearest
    module names. Trainability is set as :func:`visionlora.apply_lora` sets it.

    Args:
        model: A model of the architecture the adapter was trained on (no LoRA needed), or a
            diffusers pipeline: each part the file holds LoRA for (``unet`` or ``transformer``,
            ``text_encoder``, ...) is loaded onto the pipeline's component of that name.
        path: A visionlora adapter file, a PEFT adapter folder, a diffusers LoRA file (or folder) or
            a kohya LoRA/LoCon file. The format is detected; it is logged (logger ``visionlora``,
            INFO) and kept in :func:`visionlora.read_adapter`'s ``format``.
        adapter_name: Name to load under; defaults to the name stored in the file.
        component: For a diffusers or kohya file holding a whole pipeline's LoRA, the one part to
            load (``"unet"``, ``"transformer"``, ``"text_encoder"``, ...). A file holding several
            parts loads onto one model only with it (the other parts are then left out knowingly).

    Raises:
        AdapterFileError: the file is invalid, holds keys that cannot be mapped, does not fit the
            model, or holds several parts for one model without ``component``; the message lists the keys.

    Example:
        >>> vl.load_adapter(torchvision.models.resnet50(), "adapter.safetensors")
        >>> vl.load_adapter(pipe, "style.safetensors")  # UNet/transformer and text encoders
        >>> vl.load_adapter(pipe.text_encoder, "style.safetensors", component="text_encoder")
    """
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    check_component(component)
    fmt, source = open_adapter(path)
    held = components_of(fmt, source)
    targets = _targets(model, source.path, held if fmt.pipeline else [], component)
    prepared = [_prepare(read_component(fmt, source, part), module, adapter_name) for part, module in targets.items()]
    for file, module, matches, name in prepared:  # every part was checked: attaching cannot fail midway
        attach(module, matches, file.config, name, values=file.tensors)
    return model


def _targets(model: Any, path: Path, held: list[str], component: str | None) -> dict[str | None, nn.Module]:
    """The module each part of the file goes to: a pipeline's components, or the one model. ``held``
    is empty for a one-model format, which goes to the pipeline's UNet or transformer (or ``component``)."""
    if not isinstance(model, nn.Module) and not held:
        denoiser = component or next((d for d in DENOISERS if isinstance(getattr(model, d, None), nn.Module)), None)
        module = getattr(model, denoiser, None) if denoiser is not None else None
        if not isinstance(module, nn.Module):
            raise file_error(path, f"holds one model's adapter; {type(model).__name__} has no {denoiser or 'UNet'}")
        return {None: module}
    if isinstance(model, nn.Module):
        if component is None and len(held) > 1:
            raise file_error(
                path,
                f"holds LoRA for {held}; loaded onto one {type(model).__name__} the other parts would be left "
                "unread. Load it onto the pipeline (vl.load_adapter(pipe, path)), or pass component=<one of those> "
                "to load that part alone",
            )
        return {component: model}
    parts = [component] if component is not None else held
    modules = {p: getattr(model, p, None) for p in parts}
    missing = [p for p, m in modules.items() if not isinstance(m, nn.Module)]
    if missing:
        has = [n for n, m in vars(model).items() if isinstance(m, nn.Module)]
        raise file_error(path, f"holds LoRA for {missing}, which {type(model).__name__} does not have; it has {has}")
    return {p: m for p, m in modules.items() if isinstance(m, nn.Module)}


def fit_file(file: AdapterFile, model: nn.Module) -> AdapterFile:
    """``file`` with its names resolved onto ``model`` (kohya's flattened ones) and its non-LoRA
    tensors sorted into parameters and buffers as the model has them."""
    fit_names = FORMAT_TABLE[file.format].fit_names
    return _sort_state(fit_names(file, model) if fit_names is not None else file, model)


def _prepare(
    file: AdapterFile, model: nn.Module, adapter_name: str | None
) -> tuple[AdapterFile, nn.Module, list[Match], str]:
    """``file`` fitted to ``model``: its names resolved, every key checked; nothing changed."""
    file = fit_file(file, model)
    logger.info("%s: read as a %s adapter with %d LoRA layers", file.path, file.format, len(file.layers))
    name = adapter_name or file.adapter_name
    require_unmerged(model, "load an adapter")
    if name in adapter_state(model).configs:
        raise AdapterError(f"model already has adapter {name!r}; pass adapter_name='<new name>'")
    matches = _fit(file, model)
    try:
        check_selected(model, {m.name: m.module for m in matches}, name)
        check_wrappable(matches, file.config.dropout)
    except VisionLoraError as exc:
        raise file_error(file.path, str(exc)) from None
    return file, model, matches, name
