"""A frozen base held in int8: weight-only, one scale per output channel, dequantized inside forward.

``quantize_base(model)`` stores every nn.Linear and nn.Conv1d/2d/3d weight (LoRA layers' bases
included, before or after ``apply_lora``) as int8 ``q`` with a float32 scale ``s`` per output
channel, ``W ≈ q · s`` with ``s = max|W_row| / 127`` (symmetric, round to nearest). The layer
keeps its class (a subclass of it, ``Int8Linear``...) and computes ``weight`` from ``q`` and ``s``
when it runs, so LoRA and the other families train on top exactly as on a float base; no gradient
reaches ``q``. About 4× less memory than fp32 for the frozen weights (biases stay float).

Layers whose own forward transforms the weight (timm's StdConv2d) stay float. A merged checkpoint
(:func:`visionlora.export_merged`) is written in float from the dequantized weights, or re-quantized
(``quantize="int8"``: :func:`quantized_state_dict`); :func:`dequantize_base` turns the layers back
into float ones (e.g. before ``merge``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from visionlora._deps import require
from visionlora._tree import is_under, replace_module
from visionlora.bnb import QuantType, bnb_bits, from_bnb, held_weight, to_bnb
from visionlora.config import pattern_matches
from visionlora.errors import ConfigError, UnsupportedModuleError
from visionlora.layers import LoraLayer, transforms_weight_or_input
from visionlora.state import adapter_state

__all__ = [
    "Int8Weight",
    "check_not_dynamic",
    "dequantize",
    "dequantize_base",
    "float_state_dict",
    "int8_layers",
    "quantize_base",
    "quantize_weight",
    "quantized_state_dict",
    "release_trained",
]

_QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(q, s): int8 ``q`` and a float32 scale per output channel (shaped ``(out, 1, …)``) with W ≈ q · s."""
    w = weight.detach().float()
    scale = w.reshape(w.shape[0], -1).abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    scale = scale.reshape(-1, *([1] * (w.dim() - 1)))
    return torch.round(w / scale).clamp_(-127, 127).to(torch.int8), scale


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """q · s in ``dtype``."""
    return (q.to(torch.float32) * scale).to(dtype)


class Int8Weight:
    """Mixed into a Linear/Conv class: ``weight`` is ``weight_int8 · weight_scale`` in ``weight_dtype``."""

    quantized_bits = 8
    weight_int8: Tensor
    weight_scale: Tensor
    weight_dtype: torch.dtype

    @property
    def weight(self) -> Tensor:
        return dequantize(self.weight_int8, self.weight_scale, self.weight_dtype)

    @weight.setter
    def weight(self, value: Tensor) -> None:
        raise UnsupportedModuleError(
            f"{type(self).__name__}'s weight is held in int8; it cannot be replaced (vl.dequantize_base first)"
        )


_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _int8_class(cls: type[nn.Module]) -> type[nn.Module]:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Int8{cls.__name__}", (Int8Weight, cls), {"__module__": __name__})
    return _CLASSES[cls]


def _original(name: str, wrapped: set[str]) -> str:
    """A module's name in the un-adapted model: a LoRA layer's base (in ``wrapped``) goes by the layer's."""
    stem = name.removesuffix(".base")
    return stem if stem != name and stem in wrapped else name


def _targets(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The layers to hold in int8: not under a ``skip`` pattern or an adapter's ``trainable`` modules."""
    trained = [p for cfg in adapter_state(model).configs.values() for p in cfg.trainable]
    kept = {n for n, _ in model.named_modules() if any(pattern_matches(p, n) for p in [*skip, *trained])}
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer | Int8Weight) or bnb_bits(module) or is_under(_original(name, wrapped), kept):
            continue
        if isinstance(module, _QUANTIZABLE) and not transforms_weight_or_input(module):
            found.append((name, module))
    return found


def int8_layers(model: nn.Module) -> list[str]:
    """The un-adapted model's names of the layers held in int8 or by bitsandbytes, and of those
    :func:`quantize_base` would hold (a LoRA layer's base under the LoRA layer's own name)."""
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    held = [n for n, m in model.named_modules() if isinstance(m, Int8Weight) or bnb_bits(m)]
    names = held + [n for n, _ in _targets(model, ())]
    return [_original(n, wrapped) for n in names]


def quantized_state_dict(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` (the un-adapted architecture's float state dict of ``model``: a merged checkpoint's) with
    the weight of every layer in :func:`int8_layers` held as ``weight_int8`` / ``weight_scale``: the state
    dict of the model built afresh and passed through :func:`quantize_base` (with the same ``skip``)."""
    out = dict(state)
    for name in int8_layers(model):
        key = f"{name}.weight" if name else "weight"
        q, scale = quantize_weight(out.pop(key))
        out[f"{key}_int8"], out[f"{key}_scale"] = q, scale
    return out


def check_not_dynamic(model: nn.Module) -> None:
    """Refuse, naming the layer and what to do instead, a model with torch.ao's dynamically quantized layers."""
    dynamic = [n for n, m in model.named_modules() if type(m).__module__.startswith("torch.ao.nn.quantized")]
    if dynamic:
        raise UnsupportedModuleError(
            f"{dynamic[0]!r} ({type(model.get_submodule(dynamic[0])).__name__}) was quantized by torch.ao "
            "(quantize_dynamic), whose packed weights LoRA cannot wrap or train on; quantize the float model with "
            "vl.quantize_base(model) instead"
        )


Backend = Literal["auto", "visionlora", "bitsandbytes"]


def _backend(model: nn.Module, bits: int, backend: Backend, quant_type: QuantType) -> str:
    if quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"quant_type={quant_type!r}; bitsandbytes' 4-bit types are 'nf4' and 'fp4'")
    if backend not in ("auto", "visionlora", "bitsandbytes"):
        raise ConfigError(f"quantize_base: backend={backend!r}; valid: 'auto', 'visionlora', 'bitsandbytes'")
    if bits not in (8, 4):
        raise ConfigError(f"quantize_base: bits={bits!r}; valid: 8, or 4 (bitsandbytes' NF4/FP4)")
    if backend == "auto":
        backend = "bitsandbytes" if bits == 4 else "visionlora"
    if backend == "visionlora" and bits != 8:
        raise ConfigError("quantize_base: visionlora holds bases in 8 bits; bits=4 needs backend='bitsandbytes'")
    if backend == "bitsandbytes":
        require("bitsandbytes")  # before any layer changes
    return backend


def quantize_base(
    model: nn.Module,
    bits: int = 8,
    *,
    skip: Sequence[str] = (),
    backend: Backend = "auto",
    quant_type: QuantType = "nf4",
) -> nn.Module:
    """Hold every Linear and Conv1d/2d/3d weight of ``model`` (LoRA layers' bases included) in 8 or
    4 bits, in place; returns ``model``. Biases, norms and LoRA adapters stay as they are, and so do the
    modules matching ``skip`` (target patterns, e.g. a new head) and every adapter's ``trainable`` modules.

    ``backend``: ``"visionlora"`` holds weights in int8 with a scale per output channel (any device);
    ``"bitsandbytes"`` replaces the Linear layers by bitsandbytes' ``Linear8bitLt`` (``bits=8``) or
    ``Linear4bit`` (``bits=4``, ``quant_type`` NF4 or FP4), quantized on the model's device, and
    holds the convs in visionlora's int8 (bitsandbytes has no conv). ``"auto"``: bitsandbytes for
    ``bits=4``, visionlora for ``bits=8`` (the same layers and state-dict keys on every device).
    bitsandbytes quantizes where the model is: move it to its device first.

    Raises:
        ConfigError: ``bits`` other than 8 or 4, 4 bits with the visionlora backend, an unknown backend.
        MissingDependencyError: the bitsandbytes backend without bitsandbytes (``visionlora[bnb]``).
        UnsupportedModuleError: a model quantized by ``torch.ao.quantization.quantize_dynamic``.
    """
    chosen = _backend(model, bits, backend, quant_type)
    check_not_dynamic(model)
    if chosen == "bitsandbytes" and type(model) is nn.Linear:
        raise UnsupportedModuleError(
            "quantize_base: the model is itself an nn.Linear, which bitsandbytes would replace rather than "
            "change in place; pass the module that holds it (e.g. nn.Sequential(linear))"
        )
    for name, module in _targets(model, skip):
        if chosen == "bitsandbytes" and type(module) is nn.Linear:
            replace_module(model, name, to_bnb(module, bits, quant_type))
            continue
        weight: Tensor = module.weight  # type: ignore[assignment]  # a Linear's / Conv's
        q, scale = quantize_weight(weight)
        del module._parameters["weight"]
        module.__class__ = _int8_class(type(module))
        module.register_buffer("weight_int8", q.to(weight.device))
        module.register_buffer("weight_scale", scale.to(weight.device))
        module.weight_dtype = weight.dtype  # type: ignore[assignment]
    return model


def dequantize_base(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Turn :func:`quantize_base`'s layers, and bitsandbytes' Linear layers, back into float ones
    (weights dequantized, in ``dtype`` or their original dtype), in place; returns ``model``."""
    for name, module in list(model.named_modules()):
        if bnb_bits(module):
            replace_module(model, name, from_bnb(module, dtype))
        elif isinstance(module, Int8Weight):
            held: Any = module
            weight = dequantize(held.weight_int8, held.weight_scale, dtype or held.weight_dtype)
            original = next(c for c in type(held).__mro__[1:] if issubclass(c, nn.Module) and c is not Int8Weight)
            for buffer in ("weight_int8", "weight_scale"):
                del held._buffers[buffer]
            held.__class__ = original
            held.register_parameter("weight", nn.Parameter(weight, requires_grad=False))
    return model


def release_trained(model: nn.Module, patterns: Sequence[str]) -> None:
    """Turn the int8 and bitsandbytes layers in modules matching ``patterns`` (an adapter's ``trainable``
    modules, about to train in full) back into float ones."""
    kept = {n for n, _ in model.named_modules() if any(pattern_matches(p, n) for p in patterns)}
    for name, module in list(model.named_modules()):
        if isinstance(module, Int8Weight) and is_under(name, kept):
            dequantize_base(cast(nn.Module, module))
        elif bnb_bits(module) and is_under(name, kept):
            replace_module(model, name, from_bnb(module))


def float_state_dict(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` (a state dict of ``model`` under any naming that ends in the layers' own keys) with each
    int8 layer's ``weight_int8`` / ``weight_scale`` replaced by its dequantized float32 ``weight``, and
    each bitsandbytes layer's tensors (under the un-adapted model's names) by its dequantized weight."""
    out = dict(state)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    for name, module in model.named_modules():  # bitsandbytes' packed weight and quantization state
        stem = _original(name, wrapped)
        if bnb_bits(module) and f"{stem}.weight" in out:
            extra = (f"{stem}.SCB", f"{stem}.weight_format")
            for key in [k for k in out if k.startswith(f"{stem}.weight.") or k in extra]:
                del out[key]
            out[f"{stem}.weight"] = held_weight(module)
    for key in [k for k in state if k.endswith(".weight_int8") or k == "weight_int8"]:
        stem = key[: -len("weight_int8")]
        scale = out.pop(f"{stem}weight_scale")
        out[f"{stem}weight"] = dequantize(out.pop(key), scale)
    return out
