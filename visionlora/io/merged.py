"""Merged checkpoints: the adapted model's weights under the original architecture's keys.

The result loads into the un-adapted architecture with no visionlora code:

- any ``nn.Module`` (torchvision, timm, ...): one safetensors file, loadable with
  ``model.load_state_dict(safetensors.torch.load_file(path))`` (strict), or with timm's
  ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=N),
  num_classes=N)``; without ``num_classes`` in the overlay timm drops a changed head silently;
- a diffusers model (UNet): a model folder (``config.json`` and
  ``diffusion_pytorch_model.safetensors``) that ``from_pretrained`` loads;
- given the pipeline folder the UNet came from, a copy of that pipeline with its ``unet/``
  replaced, which ``DiffusionPipeline.from_pretrained`` loads;
- given that pipeline (folder or loaded) and a ``.safetensors`` path, the whole Stable Diffusion
  1.x pipeline as one original-layout checkpoint, which A1111, ComfyUI and diffusers'
  ``from_single_file`` load.

Files are written atomically, and folders are assembled under a temporary name and swapped in
whole. An existing output is replaced only with ``overwrite=True``, and a folder only when it is an
earlier output of the same kind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from visionlora._deps import require
from visionlora._tree import from_diffusers, require_module
from visionlora.errors import ConfigError, MergeError
from visionlora.io.dit import dit_family
from visionlora.io.dit import original_state_dict as dit_original_state
from visionlora.io.files import atomic_folder, refuse_existing, write_safetensors
from visionlora.io.formats import file_components
from visionlora.io.ldm import ldm_state_dict, sdxl_state_dict
from visionlora.io.load import load_adapter
from visionlora.models.loading import load_component
from visionlora.quantize import float_state_dict, quantized_state_dict
from visionlora.state import lora_layers, original_state_dict

__all__ = ["export_merged", "merge_pipeline", "merged_state_dict"]

_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def merged_state_dict(
    model: nn.Module, *, dtype: torch.dtype | None = None, quantize: Literal["int8"] | None = None
) -> dict[str, torch.Tensor]:
    """The un-adapted architecture's state dict with the active adapters merged in; the model is not changed.

    Merge math runs in float32; each weight is then cast to ``dtype`` (default: its own dtype), as
    is every other floating-point tensor. Integer buffers keep their dtype. With ``quantize="int8"``
    every Linear/Conv weight that :func:`~visionlora.quantize_base` would hold in int8 is re-quantized
    from the merged float32 weight: ``<layer>.weight_int8`` and a float32 ``<layer>.weight_scale``,
    the state dict of ``vl.quantize_base`` applied to the architecture (the same ``skip``).

    Raises:
        MergeError: if a tensor would hold NaN/Inf after the cast (fp16 overflow included),
            naming the keys.
    """
    require_module(model)
    out = float_state_dict(model, original_state_dict(model))  # unmerged weights even while merged; int8 in float
    with torch.no_grad():
        for name, layer in lora_layers(model):
            if layer.active and not layer.disabled:
                weight = out[f"{name}.weight"]
                merged = weight.float() + layer.delta_weight(torch.float32)  # quantized from float32, or cast
                out[f"{name}.weight"] = merged if quantize else merged.to(dtype or weight.dtype)
    if quantize is not None:
        if quantize != "int8":
            raise ConfigError(f"quantize={quantize!r}; a merged checkpoint is re-quantized to 'int8' (or None)")
        out = quantized_state_dict(model, out)
    if dtype is not None:  # the int8 scales stay float32
        out = {
            k: v.to(dtype) if v.is_floating_point() and not k.endswith("weight_scale") else v for k, v in out.items()
        }
    bad = [k for k, v in out.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise MergeError(f"the merged checkpoint would hold NaN/Inf in {', '.join(bad[:10])}; nothing was written")
    return out


def export_merged(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    pipeline: str | os.PathLike[str] | Any = None,
    component: str = "unet",
    others: Mapping[str, nn.Module] | None = None,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    quantize: Literal["int8"] | None = None,
) -> Path:
    """Write the adapted model as a plain checkpoint of its original architecture (see the module docstring).

    For a diffusers model ``path`` is a model folder, or with ``pipeline`` (the pipeline folder the
    model was loaded from) a whole pipeline folder whose ``component`` subfolder holds the merged
    model; ``others`` merges more components the same way (e.g. ``{"text_encoder": text_encoder}``
    for a text encoder with LoRA). A ``path`` ending in ``.safetensors`` with ``pipeline`` (its
    folder, or the loaded pipeline, e.g. from a single-file checkpoint) gets one original-layout
    SD 1.x/SDXL checkpoint of the whole pipeline instead, or for a Flux/SD3 ``transformer`` the
    transformer alone in BFL's/SAI's layout. Otherwise ``path`` is a ``.safetensors`` file, whose
    header also gets ``metadata`` (e.g. a classifier's class names); with ``quantize="int8"`` its
    Linear/Conv weights are re-quantized (see :func:`merged_state_dict`): about 4× smaller, loaded by
    ``vl.quantize_base(model).load_state_dict(...)`` or read back in float by the recipes. Files are written
    atomically and a folder appears complete or not at all. The models are not changed. Returns ``path``.

    Raises:
        MergeError: a merged weight would hold NaN/Inf (nothing is written).
        AdapterFileError: ``path`` exists and ``overwrite`` is off (a folder: also unless it is an
            earlier export of the same kind), or the write failed; the old output is then intact.
        ConfigError: a component name is not a plain folder name, or the pipeline folder is unusable.

    Example:
        >>> vl.export_merged(model, "merged.safetensors", dtype=torch.float16)
        >>> torchvision.models.resnet50().load_state_dict(safetensors.torch.load_file("merged.safetensors"))
        >>> vl.export_merged(unet, "styled-pipeline", pipeline="sd15-pipeline")
        >>> vl.export_merged(pipe.unet, "styled.safetensors", pipeline=pipe, others={"text_encoder": pipe.text_encoder})
    """
    path = Path(path)
    if not _is_library_model(model):
        if pipeline is not None or others:
            raise ConfigError(f"pipeline= and others= are for diffusers models; {type(model).__name__} is one file")
        refuse_existing(path, overwrite)
        header = {**(metadata or {}), "format": "pt", **({"quantized": quantize} if quantize else {})}
        state = merged_state_dict(model, dtype=dtype, quantize=quantize)
        return write_safetensors(path, state, header, overwrite=overwrite)
    if quantize is not None:
        raise ConfigError("quantize= is for a single .safetensors checkpoint of a plain model; diffusers save float")
    if metadata:
        raise ConfigError("metadata= is for a single .safetensors checkpoint; a diffusers model is written as a folder")
    if pipeline is None:
        if others:
            raise ConfigError("others= needs pipeline= (the pipeline folder the components came from)")
        with atomic_folder(path, "config.json", overwrite=overwrite) as staging:
            _write_model_folder(staging, model, dtype)
        return path
    if path.suffix == ".safetensors":
        return _write_single_file(path, model, pipeline, component, others or {}, dtype, overwrite)
    if not isinstance(pipeline, str | os.PathLike):
        raise ConfigError("pipeline=: a merged pipeline folder is copied from the pipeline's folder; give its path")
    source = Path(pipeline)
    parts = {component: model, **(others or {})}
    for name in parts:
        _check_component(name)
    missing = [name for name in parts if not (source / name).is_dir()]
    if not (source / "model_index.json").is_file() or missing:
        raise ConfigError(f"pipeline={source}: not a diffusers pipeline folder with subfolders {sorted(parts)}")
    here, there = path.resolve(), source.resolve()
    if here == there or here.is_relative_to(there) or there.is_relative_to(here):
        raise ConfigError(f"{path}: write the merged pipeline to a folder outside {source} (and not containing it)")
    with atomic_folder(path, "model_index.json", overwrite=overwrite) as staging:
        # Copies, not links: diffusers rewrites configs in place, which would reach through a hard link.
        shutil.copytree(source, staging, dirs_exist_ok=True, ignore=_skip({source / name for name in parts}))
        for name, part in parts.items():
            _write_model_folder(staging / name, part, dtype)
    return path


def _write_single_file(
    path: Path,
    model: nn.Module,
    pipeline: Any,
    component: str,
    others: Mapping[str, nn.Module],
    dtype: torch.dtype | None,
    overwrite: bool,
) -> Path:
    """The whole SD 1.x or SDXL pipeline, merged, as one original-layout checkpoint (see :mod:`visionlora.io.ldm`);
    a Flux or SD3 transformer alone in BFL's or SAI's layout (as ``flux1-dev.safetensors`` holds it)."""
    if component == "transformer":
        family = dit_family(original_state_dict(model))
        if others or family is None:
            raise ConfigError(
                "single-file export of a transformer: a Flux or SD3 transformer alone (its text encoders' LoRA "
                "stays in the adapter files)"
            )
        refuse_existing(path, overwrite)
        tensors = dit_original_state(merged_state_dict(model, dtype=dtype), family)
        return write_safetensors(
            path, {k: v.contiguous() for k, v in tensors.items()}, {"format": "pt"}, overwrite=overwrite
        )
    parts = {component: model, **others}
    names = ["unet", "vae", "text_encoder", "text_encoder_2"]
    unknown = sorted(set(parts) - set(names))
    if component != "unet" or unknown:
        raise ConfigError(
            f"single-file export: components {sorted(parts)}; a Stable Diffusion checkpoint holds 'unet', 'vae', "
            "'text_encoder' (and SDXL's 'text_encoder_2')"
        )
    refuse_existing(path, overwrite)
    if isinstance(pipeline, str | os.PathLike):
        diffusers = require("diffusers")
        if not (Path(pipeline) / "model_index.json").is_file():
            raise ConfigError(f"pipeline={pipeline}: not a diffusers pipeline folder (no model_index.json)")
        pipeline = diffusers.DiffusionPipeline.from_pretrained(str(pipeline))
    xl = isinstance(parts.get("text_encoder_2", getattr(pipeline, "text_encoder_2", None)), nn.Module)
    modules: dict[str, Any] = {
        n: parts[n] if n in parts else getattr(pipeline, n, None) for n in names[: 4 if xl else 3]
    }
    missing = [n for n, module in modules.items() if not isinstance(module, nn.Module)]
    if missing:
        raise ConfigError(f"pipeline=: {type(pipeline).__name__} has no {missing}; give a Stable Diffusion pipeline")
    states = {n: merged_state_dict(module, dtype=dtype) for n, module in modules.items()}
    configs = (model.config, modules["vae"].config)
    if xl:
        tensors = sdxl_state_dict(
            states["unet"], states["vae"], states["text_encoder"], states["text_encoder_2"], *configs
        )
    else:
        tensors = ldm_state_dict(states["unet"], states["vae"], states["text_encoder"], *configs)
    return write_safetensors(
        path, {k: v.contiguous() for k, v in tensors.items()}, {"format": "pt"}, overwrite=overwrite
    )


def _check_component(name: str) -> None:
    """A pipeline component is one plain folder name, so nothing is written outside the output folder."""
    if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name)):
        raise ConfigError(
            f"component {name!r}: a pipeline component is a plain folder name of letters, digits, '_', '-' "
            "and '.', such as 'unet' or 'text_encoder' (no '/', '..' or absolute paths)"
        )


def _is_library_model(model: nn.Module) -> bool:
    """A diffusers model, or a transformers one (a pipeline's text encoder): saved as a model folder."""
    if from_diffusers(model) and callable(getattr(model, "save_config", None)):
        return True
    return callable(getattr(getattr(model, "config", None), "save_pretrained", None))


def _write_model_folder(folder: Path, model: nn.Module, dtype: torch.dtype | None) -> None:
    """``model`` merged, as the folder its library's ``from_pretrained`` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    state = merged_state_dict(model, dtype=dtype)
    if from_diffusers(model):
        write_safetensors(folder / _DIFFUSERS_WEIGHTS, state, {"format": "pt"})
        model.save_config(str(folder))  # type: ignore[operator]
    else:
        write_safetensors(folder / "model.safetensors", state, {"format": "pt"})
        model.config.save_pretrained(str(folder))  # type: ignore[union-attr,operator]
    config = json.loads((folder / "config.json").read_text())
    if config.pop("quantization_config", None) is not None:  # loaded with a BitsAndBytesConfig: now float weights
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _skip(components: set[Path]) -> Callable[[str, list[str]], set[str]]:
    """copytree's ``ignore``: leave out the components being replaced."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if Path(folder) / n in components}

    return ignore


def merge_pipeline(
    folder: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> tuple[Path, list[str]]:
    """Merge an adapter file into the pipeline folder ``folder``: every part the file holds (the
    UNet or transformer, text encoders) onto its component, written as a pipeline folder at
    ``path``; returns it and the parts merged.

    Raises:
        AdapterFileError, ConfigError, MergeError: as :func:`load_adapter` and :func:`export_merged`.
    """
    held = file_components(adapter)
    parts = {name: load_component(folder, name) for name in held}
    for name, part in parts.items():
        load_adapter(part, adapter, component=name if len(held) > 1 else None)
    first, *rest = held
    others = {name: parts[name] for name in rest}
    out = export_merged(
        parts[first], path, dtype=dtype, pipeline=folder, component=first, others=others, overwrite=overwrite
    )
    return out, held
