"""bitsandbytes bases: recognise its 8-bit and 4-bit Linear layers, read their weights in float, build them.

bitsandbytes' ``Linear8bitLt`` (LLM.int8) and ``Linear4bit`` (QLoRA's NF4/FP4, and the ``LinearNF4`` /
``LinearFP4`` subclasses) are what diffusers and transformers put in a model loaded with a
``BitsAndBytesConfig``, and what :func:`visionlora.quantize_base` builds for ``bits=4`` or
``backend="bitsandbytes"``. Their forward runs bitsandbytes' own kernels on the packed weight, so a
LoRA layer on one adds its branches to that output and never runs the base on another weight;
:func:`held_weight` is the float weight such a layer computes with (for ΔW's shape, DoRA's norm,
a float merged export). Nothing here imports bitsandbytes until a layer is built or read.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from visionlora._deps import require
from visionlora.errors import ConfigError, UnsupportedModuleError

__all__ = ["QuantType", "bnb_bits", "float_weight", "from_bnb", "held_numel", "held_weight", "to_bnb"]

QuantType = Literal["nf4", "fp4"]

_CLASSES = {"Linear8bitLt": 8, "Linear4bit": 4}


def bnb_bits(module: nn.Module) -> int | None:
    """8 or 4 for a bitsandbytes ``Linear8bitLt`` / ``Linear4bit`` (or a subclass), else None."""
    layer_type = type(module)
    if layer_type not in _BITS:  # asked on every forward of a LoRA layer's fast path: once per class
        found = (c for c in layer_type.__mro__ if c.__name__ in _CLASSES and c.__module__.startswith("bitsandbytes"))
        _BITS[layer_type] = next((_CLASSES[c.__name__] for c in found), None)
    return _BITS[layer_type]


_BITS: dict[type, int | None] = {}


def held_weight(module: nn.Module) -> Tensor:
    """The float weight ``(out, in)`` a bitsandbytes layer computes with, detached: 4-bit weights
    dequantized to their original dtype, 8-bit ones as int8 · SCB / 127 in the dtype :func:`to_bnb`
    recorded (else the bias's, else float32); a weight not yet quantized (before the layer's first
    ``.to(device)``) as it is. The layer is not changed.

    Raises:
        UnsupportedModuleError: a packed 4-bit weight without its quantization state.
    """
    weight: Any = module.weight
    layer: Any = module
    if bnb_bits(module) == 4:
        state = weight.quant_state if weight.quant_state is not None else getattr(layer, "quant_state", None)
        if state is None:
            if weight.is_floating_point():
                return weight.detach()
            raise UnsupportedModuleError(
                f"{type(module).__name__}: its packed 4-bit weight has no quantization state (weight.quant_state)"
            )
        functional = require("bitsandbytes.functional")
        data = weight.data
        if getattr(state, "packing_format_for_cpu", False):  # repacked by bitsandbytes' CPU inference kernel
            data, state = functional._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return functional.dequantize_4bit(data, state)
    if weight.dtype != torch.int8:
        return weight.detach()
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB  # forward moves it there
    bias = module.bias
    dtype = getattr(module, "held_dtype", None) or (torch.float32 if bias is None else bias.dtype)
    return (weight.data.float() * (scb.to(weight.device).float().reshape(-1, 1) / 127)).to(dtype)


def held_numel(param: Tensor) -> int:
    """How many numbers ``param`` holds: a packed 4-bit weight counts its unpacked shape."""
    state = getattr(param, "quant_state", None)
    return math.prod(state.shape) if state is not None else param.numel()


def to_bnb(linear: nn.Linear, bits: int, quant_type: QuantType = "nf4") -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weight in ``bits`` (8: LLM.int8 with diffusers' and
    transformers' default outlier threshold 6.0; 4: ``quant_type``, computing in the weight's dtype),
    quantized on ``linear``'s device, with ``linear``'s bias (training if it did)."""
    if bits not in _CLASSES.values():
        raise ConfigError(f"bits={bits!r}; bitsandbytes holds Linear weights in 8 or 4 bits")
    if quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"quant_type={quant_type!r}; bitsandbytes' 4-bit types are 'nf4' and 'fp4'")
    modules = require("bitsandbytes.nn")
    weight = linear.weight.detach()
    device, has_bias = weight.device, linear.bias is not None
    layer: Any
    if bits == 8:
        layer = modules.Linear8bitLt(
            linear.in_features, linear.out_features, has_bias, has_fp16_weights=False, threshold=6.0
        )
        layer.weight = modules.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
        layer.held_dtype = weight.dtype  # int8 keeps no trace of it
    else:
        layer = modules.Linear4bit(
            linear.in_features, linear.out_features, has_bias, compute_dtype=weight.dtype, quant_type=quant_type
        )
        layer.weight = modules.Params4bit(weight.cpu(), requires_grad=False, quant_type=quant_type, module=layer)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().cpu(), requires_grad=linear.bias.requires_grad)
    layer.train(linear.training)
    return layer.to(device)  # bitsandbytes quantizes here; LLM.int8's scales stay with the weight when it moves


def from_bnb(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A float ``nn.Linear`` with a bitsandbytes layer's (dequantized) weight and its bias, frozen,
    in ``dtype`` (or the dequantized weight's)."""
    weight = held_weight(module)
    dtype = dtype or weight.dtype
    bias: Tensor | None = module.bias  # type: ignore[assignment]
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, device=weight.device, dtype=dtype)
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=bias.requires_grad)
    linear.train(module.training)
    return linear


def float_weight(base: nn.Module) -> Tensor:
    """``base.weight``, or for a bitsandbytes layer its :func:`held_weight`: W as float values in the layer's shape."""
    return held_weight(base) if bnb_bits(base) is not None else base.weight  # type: ignore[return-value]
