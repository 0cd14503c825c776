"""A base model's weights from a file: ``.safetensors``, or ``.pt`` read with ``weights_only=True``.

Nothing here unpickles arbitrary objects; every tensor is checked against the model before
``load_state_dict`` (strict) puts it in place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionlora._tree import from_diffusers
from visionlora.errors import AdapterFileError, ConfigError, UnsupportedModuleError
from visionlora.io.dit import diffusers_state_dict, dit_family
from visionlora.io.files import read_safetensors
from visionlora.models.heads import classifier_names, replace_head
from visionlora.models.loading import build_model
from visionlora.quantize import float_state_dict

__all__ = ["fit_head", "load_base", "load_original_transformer", "read_state_dict"]


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pt``/``.pth`` file read with ``weights_only=True``.

    Raises:
        AdapterFileError: if the file is unreadable or is not a flat mapping of names to tensors.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles arbitrary objects
    except Exception as exc:  # torch raises several types for unreadable or unsafe files
        raise AdapterFileError(
            f"{path}: not a readable weights-only checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # the common {"state_dict": ...} wrapper
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AdapterFileError(f"{path}: expected a mapping of parameter names to tensors")
    return state


def _check_weights(path: str, state: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> None:
    """Refuse, by name, weights of the wrong kind of dtype or that hold NaN/Inf in the model's dtype."""
    for key, value in state.items():
        target = current.get(key)
        if target is None:
            continue  # load_state_dict(strict=True) names unknown and missing keys
        if value.is_complex() or value.is_floating_point() != target.is_floating_point():
            raise AdapterFileError(f"{path}: tensor {key!r} is {value.dtype}; the model's is {target.dtype}")
        if target.is_floating_point() and not torch.isfinite(value.to(target.dtype)).all():
            raise AdapterFileError(f"{path}: tensor {key!r} holds NaN or Inf (in the model's {target.dtype})")


def fit_head(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give ``model`` a head of the class count ``state``'s head weight has, if it differs (``state``: a
    fine-tuned base's weights, or an adapter's tensors with a new head)."""
    if from_diffusers(model):
        return
    current = model.state_dict()
    try:
        heads = classifier_names(model)
    except UnsupportedModuleError:
        return
    for head in heads:
        key = f"{head}.weight"
        if key in state and key in current and state[key].ndim >= 1 and state[key].shape[0] != current[key].shape[0]:
            replace_head(model, int(state[key].shape[0]))
            return


def load_base(spec: str, *, arch: str | None = None, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The base model for a merge: a model spec with its pretrained weights, or ``arch`` + a weights file.

    ``spec`` is a torchvision/timm name (its pretrained weights are fetched by those libraries), a
    diffusers folder (read from disk), or a ``.safetensors`` / ``.pt`` state dict for the
    architecture ``arch`` (loaded strictly, after the head is resized to the file's class count; int8
    weights of a re-quantized merged checkpoint are read as float32).
    """
    if Path(spec).is_file():
        if arch is None:
            raise ConfigError(f"{spec!r} is a weights file: give the architecture too (e.g. --arch resnet50)")
        model = build_model(arch, kwargs=kwargs)
        state = float_state_dict(model, read_state_dict(spec))  # a re-quantized merged checkpoint: in float
        fit_head(model, state)
        _check_weights(spec, state, model.state_dict())
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise AdapterFileError(f"{spec}: does not fit {arch} ({exc})") from None
        return model
    if arch is not None:
        raise ConfigError(f"--arch is for weights files; {spec!r} names its architecture itself")
    return build_model(spec, pretrained=True, kwargs=kwargs)


def load_original_transformer(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> nn.Module:
    """A Flux or SD3 transformer from one checkpoint in BFL's or SAI's original layout, built from
    the config of the pipeline folder ``folder`` (its ``transformer/`` subfolder; its weights unread).

    The checkpoint may hold the transformer alone (``flux1-dev.safetensors``) or, under
    ``model.diffusion_model.``, beside a pipeline's other parts (an SAI SD3 file: only the
    transformer is taken; the text encoders and VAE come from ``folder``).

    Raises:
        AdapterFileError: keys or shapes that do not fit the configured transformer, or unreadable values.
        ConfigError: ``folder`` has no transformer config of a Flux or SD3 model.
    """
    with torch.device("meta"):  # module names and shapes only: the weights come from the file
        model = build_model(str(Path(folder) / "transformer"))
    family = dit_family(model.state_dict())
    if family is None:
        raise ConfigError(f"{folder}/transformer: a {type(model).__name__}, not a Flux or SD3 transformer")
    state = read_state_dict(path)
    if any(k.startswith("model.diffusion_model.") for k in state):
        state = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    try:
        converted = diffusers_state_dict(state, family)
    except ConfigError as exc:
        raise AdapterFileError(f"{path}: not a {family} checkpoint in its original layout ({exc})") from None
    _check_weights(str(path), converted, model.state_dict())
    try:
        model.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as exc:
        raise AdapterFileError(f"{path}: does not fit {folder}/transformer ({exc})") from None
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise AdapterFileError(f"{path}: holds nothing for {left[:5]}")
    return model.eval()
