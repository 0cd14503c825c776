"""Building a model from a name or folder, and an example input for its probe pass.

A model spec is ``[source:]name``:

- ``torchvision:<name>``: ``torchvision.models.get_model(name, weights=...)``;
- ``timm:<name>``: ``timm.create_model(name, pretrained=...)``;
- ``diffusers:<folder>``: a diffusers UNet or transformer folder (``config.json``), or a pipeline
  folder whose ``unet/`` or ``transformer/`` subfolder is one.

Without a source, an existing folder is read as diffusers, then torchvision's model names are
tried, then timm's. ``pretrained=False`` builds the architecture with fresh weights and downloads
nothing; ``pretrained=True`` asks torchvision / timm / diffusers for their weights.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionlora._deps import require
from visionlora._tree import from_diffusers
from visionlora.errors import ConfigError

__all__ = ["DENOISERS", "SOURCES", "build_model", "example_input_for", "load_component"]

SOURCES = ("torchvision", "timm", "diffusers")
DENOISERS = ("unet", "transformer")
"""The subfolders of a diffusers pipeline that hold the model LoRA adapts (the denoiser)."""


def _torchvision(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    return require("torchvision").models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)


def _timm(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    return require("timm").create_model(name, pretrained=pretrained, **kwargs)


def _diffusers(folder: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    diffusers = require("diffusers")
    if kwargs:
        raise ConfigError(f"diffusers:{folder}: model arguments {sorted(kwargs)} are for torchvision/timm models")

    root = Path(folder)
    for part in DENOISERS:  # a pipeline folder: its denoiser
        if not (root / "config.json").is_file() and (root / part / "config.json").is_file():
            root = root / part
    if not (root / "config.json").is_file():
        raise ConfigError(f"diffusers:{folder}: no config.json here or in its unet/ or transformer/ subfolder")
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigError(f"diffusers:{folder}: config.json is not readable JSON ({exc})") from None
    class_name = config.get("_class_name", "") if isinstance(config, dict) else ""
    cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if cls is None or not issubclass(cls, nn.Module):
        raise ConfigError(f"diffusers:{folder}: config.json names {class_name!r}, not a diffusers model class")
    return cls.from_pretrained(str(root)) if pretrained else cls.from_config(config)


def load_component(folder: str | os.PathLike[str], name: str, *, weights: bool = True) -> nn.Module:
    """Component ``name`` of the diffusers pipeline folder ``folder`` with its weights, in eval mode:
    a diffusers model (``unet``, ``transformer``) or a transformers one (``text_encoder``, ...).
    ``weights=False`` builds it from its config on the meta device: module names and shapes only,
    no memory and no weights read (what checking a file against a 12B transformer needs).

    Raises:
        ConfigError: the folder has no ``model_index.json`` entry or subfolder for ``name``, or the
            entry names no model class of its library.
    """
    root = Path(folder)
    try:
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{folder}: no readable model_index.json ({exc})") from None
    entry = index.get(name) if isinstance(index, dict) else None
    parts = [k for k, v in index.items() if isinstance(v, list) and v[0] is not None] if isinstance(index, dict) else []
    if not (isinstance(entry, list) and len(entry) == 2 and (root / name).is_dir()):
        raise ConfigError(f"{folder}: the pipeline has no component {name!r}; it has {parts}")
    library, class_name = entry
    if library == "diffusers":
        with torch.device("meta" if not weights else "cpu"):
            return _build(_diffusers, f"{folder}/{name}", str(root / name), weights, {})
    cls = getattr(require(str(library)), str(class_name), None) if library == "transformers" else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"{folder}: component {name!r} is a {library}.{class_name}, not a model visionlora adapts")
    loader: Any = cls

    def build(path: str, _: bool, __: dict[str, Any]) -> nn.Module:
        if weights:
            return loader.from_pretrained(path)
        config = loader.config_class.from_pretrained(path)
        with torch.device("meta"):
            return loader(config)

    return _build(build, f"{folder}/{name}", str(root / name), weights, {})


def _build(
    builder: Callable[[str, bool, dict[str, Any]], nn.Module],
    spec: str,
    name: str,
    pretrained: bool,
    kwargs: dict[str, Any],
) -> nn.Module:
    try:
        return builder(name, pretrained, kwargs).eval()
    except ConfigError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError, TypeError) as exc:  # the library's own refusal
        raise ConfigError(f"{spec!r}: could not build it ({type(exc).__name__}: {exc})") from exc


def _known_names() -> list[str]:
    names: list[str] = []
    try:
        import torchvision

        names += torchvision.models.list_models()
    except ImportError:
        pass
    try:
        import timm

        names += timm.list_models()
    except ImportError:
        pass
    return names


def build_model(spec: str, *, pretrained: bool = False, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The model ``spec`` names (see the module docstring), in eval mode.

    ``kwargs`` go to ``torchvision.models.get_model`` / ``timm.create_model`` (e.g. ``img_size``).

    Raises:
        ConfigError: for an unknown source or name, quoting the spec and listing what is valid
            or close.

    Example:
        >>> build_model("timm:resnet50").default_cfg["classifier"]
        'fc'
    """
    kwargs = dict(kwargs or {})
    source, sep, name = spec.partition(":")
    builders = {"torchvision": _torchvision, "timm": _timm, "diffusers": _diffusers}
    if sep and source in SOURCES:
        return _build(builders[source], spec, name, pretrained, kwargs)
    if sep and not Path(spec).exists() and len(source) > 1:
        raise ConfigError(f"{spec!r}: unknown source {source!r}; sources: {', '.join(SOURCES)}")
    if Path(spec).is_dir():
        return _build(_diffusers, spec, spec, pretrained, kwargs)
    if spec in require("torchvision").models.list_models():
        return _build(_torchvision, spec, spec, pretrained, kwargs)
    if require("timm").is_model(spec):
        return _build(_timm, spec, spec, pretrained, kwargs)
    close = difflib.get_close_matches(spec, _known_names(), n=5)
    raise ConfigError(
        f"{spec!r} is neither a folder nor a torchvision or timm model name"
        + (f"; close names: {', '.join(close)}" if close else "")
    )


def example_input_for(model: nn.Module, size: int | None = None) -> Any:
    """An input for one probe forward pass: an image batch, or a UNet's sample/timestep/text arguments.

    Args:
        model: A classifier (3-channel images) or a diffusers UNet.
        size: Image size, or for a UNet the sample (latent) size; defaults to 224 / the UNet's
            configured ``sample_size``.
    """
    config = getattr(model, "config", None)
    if from_diffusers(model) and config is not None and hasattr(config, "joint_attention_dim"):
        return _transformer_input(model, size)
    if from_diffusers(model) and config is not None:
        side = size or int(config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0])
        inputs: dict[str, Any] = {
            "sample": torch.randn(1, config.in_channels, side, side),
            "timestep": torch.tensor([1]),
        }
        cross = getattr(config, "encoder_hid_dim", None) or getattr(config, "cross_attention_dim", None)
        if cross is not None:
            width = cross if isinstance(cross, int) else cross[0]
            inputs["encoder_hidden_states"] = torch.randn(1, 77, width)
        if getattr(config, "addition_embed_type", None) == "text_time":  # SDXL: pooled text + 6 size/crop ids
            time_dim = config.addition_time_embed_dim
            text_dim = config.projection_class_embeddings_input_dim - 6 * time_dim
            inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, text_dim), "time_ids": torch.zeros(1, 6)}
        return inputs
    return torch.randn(1, 3, size or 224, size or 224)


def _transformer_input(model: nn.Module, size: int | None) -> dict[str, Any]:
    """A Flux or SD3 transformer's forward arguments: latents (packed for Flux), text, pooled text."""
    config: Any = model.config
    side = size or (int(config.sample_size) if hasattr(config, "sample_size") else 16)
    text = 8
    inputs: dict[str, Any] = {
        "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim),
        "timestep": torch.tensor([0.5]),
    }
    if type(model).__name__ == "FluxTransformer2DModel":  # packed 2x2 latent patches, with position ids
        tokens = (side // 2) ** 2
        inputs["hidden_states"] = torch.randn(1, tokens, config.in_channels)
        inputs["img_ids"] = torch.zeros(tokens, 3)
        inputs["txt_ids"] = torch.zeros(text, 3)
        if config.guidance_embeds:
            inputs["guidance"] = torch.tensor([3.5])
    else:
        inputs["hidden_states"] = torch.randn(1, config.in_channels, side, side)
    return inputs
