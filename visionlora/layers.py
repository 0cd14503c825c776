"""LoRA math as pure functions, and the thin modules that apply it to Linear and Conv layers.

::

    x ──► base (W) ─────────────────────────────────► (+) ──► y
    └───► dropout ──► A (r × in) ──► B (out × r) ──► × s ─┘

    y = base(x) + s · B(A(dropout(x)))      s = alpha / r   (alpha / sqrt(r) with rsLoRA)

A starts random and B at zero, so a fresh adapter leaves every output unchanged (Hu et al.
2021, "LoRA", §4.1). For a convolution, A is a conv with the base's own kernel and geometry
(stride, padding, dilation, padding_mode, groups) and B a 1×1 conv. ΔW always has exactly the
base kernel's shape ``(out, in / g, *k)``. A grouped conv (``groups = g``) takes one of two layouts:

- ``per_group`` (default): each group gets its own rank-r pair; A has g·r output channels and
  B is a grouped 1×1 conv; rank <= r within each group; r · (in · prod(k) + out) parameters.
- ``shared``: one rank-r factorisation of the kernel viewed as an (out × in/g · prod(k))
  matrix; r · (out + in/g · prod(k)) parameters, the only form smaller than a depthwise conv.

For groups = 1 both are the usual layout (kohya's lora_down / lora_up, PEFT's lora_A / lora_B).

Conv and Linear subclasses whose ``forward`` transforms the weight or the input (timm's
StdConv2d, ScaledStdConv2d, Conv2dSame) are adapted in weight space: their own forward runs on
W + ΔW, so merging (W <- W + ΔW) gives the same outputs by construction. bitsandbytes' 8-/4-bit
Linears (:mod:`visionlora.bnb`) run their own kernels on the packed weight, and every family adds
its branch to that output (ΔW of the dequantized W for DoRA's norm, LoHa, LoKr).

The formulas (ΔW, shapes, scale, init) are pure functions in :mod:`visionlora.lora_math`.
This module is the reference (:meth:`LoraLayer.forward` is the formula above); forms measured to
be faster live in :mod:`visionlora.fastpaths`, and a layer wrapped by ``apply_lora`` tries its
one with one call per forward, running the reference wherever it declines.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from visionlora.bnb import bnb_bits, float_weight
from visionlora.branches import Adapter, LoraAdapter
from visionlora.errors import AdapterError, ConfigError
from visionlora.family_math import channel_norm
from visionlora.lora_math import AdaptableLayer, conv_delta, conv_transpose_delta, linear_delta

__all__ = [
    "AdaptableLayer",
    "Adapter",
    "FastPath",
    "LoraAdapter",
    "LoraConv",
    "LoraConvTranspose",
    "LoraLayer",
    "LoraLinear",
    "base_layer",
    "conv_apply",
    "layer_kind",
    "transforms_weight_or_input",
]

_CONV_TYPES: dict[type[nn.Module], str] = {nn.Conv1d: "Conv1d", nn.Conv2d: "Conv2d", nn.Conv3d: "Conv3d"}
_CONVT_TYPES: dict[type[nn.Module], str] = {
    nn.ConvTranspose1d: "ConvTranspose1d",
    nn.ConvTranspose2d: "ConvTranspose2d",
    nn.ConvTranspose3d: "ConvTranspose3d",
}
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

# ---------------------------------------------------------------------------------------------
# Pure math


def layer_kind(module: nn.Module) -> str | None:
    """``"Linear"``, ``"Conv1d/2d/3d"`` or ``"ConvTranspose1d/2d/3d"`` for adaptable layers, else None."""
    if isinstance(module, LoraLayer):
        return layer_kind(module.base)
    if isinstance(module, nn.Linear):
        return "Linear"
    for conv_type, kind in (_CONV_TYPES | _CONVT_TYPES).items():
        if isinstance(module, conv_type):
            return kind
    return None


def transforms_weight_or_input(base: nn.Module) -> bool:
    """True when ``type(base)`` overrides how torch's own class runs its weight on the input (not a
    bitsandbytes Linear, which runs the same Linear on its packed weight)."""
    if bnb_bits(base) is not None:
        return False
    references: list[type[nn.Module]] = [nn.Linear, *_CONV_TYPES, *_CONVT_TYPES]
    reference = next(t for t in references if isinstance(base, t))
    methods = ("forward", "_conv_forward") if reference in _CONV_TYPES else ("forward",)
    return any(getattr(type(base), m) is not getattr(reference, m) for m in methods)


def conv_apply(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: Tensor, weight: Tensor) -> Tensor:
    """``conv``'s own geometry (stride, padding incl. ``'same'``/``'valid'``, dilation, ``padding_mode``,
    groups) run with another ``weight`` and no bias: the one call of torch's private ``_conv_forward``,
    so none of those fields is ever copied by hand."""
    return conv._conv_forward(x, weight, None)


# ---------------------------------------------------------------------------------------------
# Modules


class LoraLayer(nn.Module, abc.ABC):
    """A base layer plus named adapters; ``forward`` is the base output plus the active branches.

    Adapters live in ``self.adapters`` (an ``nn.ModuleDict`` of :class:`~visionlora.branches.Adapter`). The active
    ones and their weights are ``self.active`` (name -> weight); the output adds
    ``weight · scale · B(A(x))`` for each. While merged, the base weight holds W + ΔW and the
    original W is kept to restore it exactly on :meth:`unmerge`. ``fast`` (from
    :mod:`visionlora.fastpaths`) computes the same output faster where it applies, else returns None.
    """

    base: AdaptableLayer
    _original_weight: Tensor | None
    fast: FastPath | None = None

    def __init__(self, base: AdaptableLayer, fast: FastPath | None = None) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: dict[str, float] = {}
        self.disabled = False
        self.weight_space = transforms_weight_or_input(base)
        self.fast = fast
        self.register_buffer("_original_weight", None, persistent=False)
        # torch's long-standing (private) state_dict hook; a plain function, so no reference cycle.
        self._register_state_dict_hook(_state_dict_unmerged)

    # The base's tensors, readable by code that inspects ``module.weight`` (explicit, no __getattr__).
    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    @property
    def merged(self) -> bool:
        return self._original_weight is not None

    def adapter(self, name: str) -> Adapter:
        """Adapter ``name`` of this layer (``self.adapters[name]``, typed)."""
        return cast(Adapter, self.adapters[name])

    def plain(self) -> bool:
        """Whether every active adapter is plain LoRA (a branch added to the base output)."""
        return all(self.adapter(n).plain for n in self.active)

    def check_dropout(self, dropout: float) -> None:
        """Raise :class:`ConfigError` if this layer cannot apply input dropout ``dropout``."""
        if self.weight_space and dropout > 0:
            raise ConfigError(
                f"dropout: {type(self.base).__name__} transforms its weight or input in forward, so "
                "visionlora adapts it in weight space where input dropout has no meaning; use dropout=0"
            )

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (and from the active set)."""
        self._require_unmerged("delete an adapter")
        del self.adapters[name]
        self.active.pop(name, None)

    def set_active(self, weights: Mapping[str, float]) -> None:
        """Make exactly these adapters active, with these weights (names this layer lacks are skipped)."""
        self._require_unmerged("change the active adapters")
        self.active = {n: float(w) for n, w in weights.items() if n in self.adapters}

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Σ weight · ΔW over the active adapters, in the base weight's shape, computed in ``dtype``."""
        weight = self._original_weight if self._original_weight is not None else float_weight(self.base)  # W, not W'
        delta = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        for name, w in self.active.items():
            delta = delta + w * self.adapter(name).delta(weight, self.delta, dtype)
        return delta

    def write_merged(self, new_weight: Tensor) -> None:
        """Put ``new_weight`` (W + ΔW, see :func:`visionlora.merge.merged_weight`) in the base, keeping W
        for :meth:`unmerge`; a no-op when already merged."""
        if self.merged:
            return
        weight = self.base.weight
        self._original_weight = weight.detach().clone()
        with torch.no_grad():
            weight.copy_(new_weight)

    def unmerge(self) -> None:
        """Restore the base weight exactly, bit for bit (no-op when not merged)."""
        original = self._original_weight
        if original is None:
            return
        with torch.no_grad():
            self.base.weight.copy_(original)
        self._original_weight = None

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Tensor], prefix: str, *args: object, **kwargs: object
    ) -> None:
        self.unmerge()  # the incoming base.weight is an unmerged W (see _state_dict_unmerged)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _require_unmerged(self, action: str) -> None:
        if self.merged:
            raise AdapterError(f"cannot {action} while adapters are merged; call unmerge first")

    def forward(self, x: Tensor) -> Tensor:
        """base(x) + Σ weight · scale · B(A(dropout(x))) over the active adapters."""
        return self.run(x)

    def run(self, x: Tensor, **kwargs: Any) -> Tensor:
        """:meth:`forward` with the base's extra arguments (a transposed conv's ``output_size``)."""
        if self.merged or self.disabled or not self.active:
            return self.base(x, *kwargs.values())
        if self.in_weight_space(x):  # the base's own forward, on W + ΔW
            weight = self.base.weight
            return self.run_with(x, weight + self.delta_weight(weight.dtype), **kwargs)
        if not kwargs and self.fast is not None and self.plain() and (fast := self.fast(self, x)) is not None:
            return fast
        return self.add_branches(self.base(x, *kwargs.values()), x, **kwargs)

    def run_with(self, x: Tensor, weight: Tensor, **kwargs: Any) -> Tensor:
        """The base's forward with ``weight`` in place of its own (an int8 base: its operation plus bias)."""
        if getattr(self.base, "quantized_bits", None) is None:
            return functional_call(self.base, {"weight": weight}, (x, *kwargs.values()))
        bias = self.base.bias
        y = self.apply_weight(x, weight, **kwargs)
        return y if bias is None else y + self.per_channel(bias)

    def in_weight_space(self, x: Tensor) -> bool:
        """Whether forward runs the base once on W + ΔW: always for a layer whose forward transforms its
        weight or input; for LoHa and LoKr adapters wherever no input dropout is active (one convolution
        instead of the base's plus one per adapter); for DoRA too, except where gradients are taken and
        the weight is larger than the input ``x`` (a low-resolution conv, say): there PEFT's form, which
        needs no weight-sized gradient, keeps less for backward (measured in scripts/families_bench.py)."""
        if self.weight_space:
            return True
        adapters = [self.adapter(n) for n in self.active]
        if all(a.plain for a in adapters) or bnb_bits(self.base) is not None:  # bitsandbytes: its kernel only
            return False
        large = self.base.weight.numel() > x.numel()
        if large and torch.is_grad_enabled() and all(a.plain or _dora_branch(a) for a in adapters):
            return False
        return not self.training or all(a.dropout == 0 for a in adapters)

    def add_branches(self, y: Tensor, x: Tensor, **kwargs: Any) -> Tensor:
        """``y`` (the base output for ``x``) + Σ weight · scale · B(A(dropout(x))) over the active adapters
        (for the other families, weight · ΔW applied to dropout(x) through the base's geometry)."""
        base = y
        for name, w in self.active.items():
            adapter = self.adapter(name)
            if isinstance(adapter, LoraAdapter) and adapter.plain:
                a, b = adapter.live_factors()
                h = F.dropout(x, adapter.dropout, self.training).to(a.dtype)
                # The scale multiplies B (r·out numbers) rather than the whole output.
                y = y + self.branch(h, a, b * (w * adapter.scale), **kwargs).to(y.dtype)
            elif isinstance(adapter, LoraAdapter) and _dora_branch(adapter):
                y = y + self._dora(adapter, w, base, x, **kwargs).to(y.dtype)
            else:
                weight = float_weight(self.base)
                h = F.dropout(x, adapter.dropout, self.training).to(weight.dtype)
                y = y + self.apply_weight(h, w * adapter.delta(weight, self.delta, weight.dtype), **kwargs).to(y.dtype)
        return y

    def _dora(self, adapter: LoraAdapter, w: float, base: Tensor, x: Tensor, **kwargs: Any) -> Tensor:
        """One DoRA adapter's change to the output in PEFT's form, ``(m/n − 1) · W x + (m/n) · s · B(A(x))``
        with n = ‖W + s·B·A‖ per output channel, a constant for backward: no weight-sized gradient, and
        ``base`` (= W x + bias) reused where no input dropout is active."""
        weight, (a, b) = float_weight(self.base), adapter.live_factors()
        with torch.no_grad():
            norm = channel_norm(weight.float() + self.delta(a.float(), b.float(), adapter.scale))
        assert adapter.magnitude is not None
        ratio = self.per_channel(adapter.magnitude.reshape(-1).float() / norm).to(base.dtype)
        if adapter.dropout and self.training:
            h = F.dropout(x, adapter.dropout, True)
            plain = self.apply_weight(h.to(weight.dtype), weight, **kwargs)
        else:
            h = x
            bias = self.base.bias
            plain = base if bias is None else base - self.per_channel(bias)
        lora = self.branch(h.to(a.dtype), a, b * adapter.scale, **kwargs).to(base.dtype)
        return w * ((ratio - 1) * plain + ratio * lora)

    def per_channel(self, values: Tensor) -> Tensor:
        """A per-output-channel vector shaped to broadcast over the output, batched or not: ``(out, 1, …)``
        with one 1 per spatial dimension of the kernel."""
        return values.reshape(-1, *([1] * (self.base.weight.dim() - 2)))

    @abc.abstractmethod
    def delta(self, a: Tensor, b: Tensor, scale: float) -> Tensor:
        """ΔW = scale · B·A of one adapter, in the base weight's shape."""

    def add_delta(self, weight: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
        """``weight`` + ΔW of one adapter, as a new tensor (the merge's sum)."""
        return weight + self.delta(a, b, scale)

    @abc.abstractmethod
    def branch(self, x: Tensor, a: Tensor, b: Tensor, **kwargs: Any) -> Tensor:
        """B(A(x)) of one adapter, in the base output's shape."""

    @abc.abstractmethod
    def apply_weight(self, x: Tensor, weight: Tensor, **kwargs: Any) -> Tensor:
        """The base's operation on ``x`` with ``weight`` in place of its own and no bias."""

    def extra_repr(self) -> str:
        active = ", ".join(f"{n}:{w:g}" for n, w in self.active.items()) or "-"
        return f"active={active}, merged={self.merged}, disabled={self.disabled}, weight_space={self.weight_space}"


FastPath = Callable[[LoraLayer, Tensor], "Tensor | None"]
"""``fast(layer, x)``: the layer's output computed another way, or None where it does not apply."""


class LoraLinear(LoraLayer):
    """LoRA on an ``nn.Linear``: y = base(x) + s · (x Aᵀ) Bᵀ."""

    def delta(self, a: Tensor, b: Tensor, scale: float) -> Tensor:
        return linear_delta(a, b, scale)

    def add_delta(self, weight: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
        return torch.addmm(weight, b, a, alpha=scale)  # one kernel, the sum the Linear fast path forms too

    def branch(self, x: Tensor, a: Tensor, b: Tensor, **kwargs: Any) -> Tensor:
        return F.linear(F.linear(x, a), b)

    def apply_weight(self, x: Tensor, weight: Tensor, **kwargs: Any) -> Tensor:
        return F.linear(x, weight)

    def per_channel(self, values: Tensor) -> Tensor:
        return values  # a Linear's channels are its output's last dimension


class LoraConv(LoraLayer):
    """LoRA on an ``nn.Conv1d/2d/3d``: A through the base's own geometry, then B as a grouped 1×1 conv
    (the shared layout runs the small ΔW = B·A through the base's geometry instead)."""

    base: nn.Conv1d | nn.Conv2d | nn.Conv3d

    def delta(self, a: Tensor, b: Tensor, scale: float) -> Tensor:
        return conv_delta(a, b, scale, self.base.groups)

    def branch(self, x: Tensor, a: Tensor, b: Tensor, **kwargs: Any) -> Tensor:
        groups = self.base.groups
        if a.shape[0] != groups * b.shape[1]:  # shared layout: run the (small) ΔW itself
            return conv_apply(self.base, x, conv_delta(a, b, 1.0, groups))
        return _CONV_FN[b.dim() - 2](conv_apply(self.base, x, a), b, groups=groups)

    def apply_weight(self, x: Tensor, weight: Tensor, **kwargs: Any) -> Tensor:
        return conv_apply(self.base, x, weight)


class LoraConvTranspose(LoraLayer):
    """LoRA on an ``nn.ConvTranspose1d/2d/3d``: A as a transposed conv with the base's own stride,
    padding, output padding, dilation and groups (its inputs to r channels per group), then B as a
    grouped 1×1 conv; ΔW = :func:`~visionlora.lora_math.conv_transpose_delta`. ``output_size``
    works as for the base."""

    base: nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d

    def delta(self, a: Tensor, b: Tensor, scale: float) -> Tensor:
        return conv_transpose_delta(a, b, scale, self.base.groups)

    def branch(self, x: Tensor, a: Tensor, b: Tensor, **kwargs: Any) -> Tensor:
        return _CONV_FN[b.dim() - 2](self.apply_weight(x, a, **kwargs), b, groups=self.base.groups)

    def apply_weight(self, x: Tensor, weight: Tensor, **kwargs: Any) -> Tensor:
        base: Any = self.base  # ConvTranspose's padding is a tuple of ints (no 'same')
        dims, stride, padding, dilation = weight.dim() - 2, base.stride, base.padding, base.dilation
        extra = base._output_padding(x, kwargs.get("output_size"), stride, padding, base.kernel_size, dims, dilation)
        return _CONVT_FN[dims](x, weight, None, stride, padding, extra, base.groups, dilation)

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        """base(x, output_size) + Σ weight · scale · B(A(dropout(x))) over the active adapters."""
        return self.run(x) if output_size is None else self.run(x, output_size=output_size)


def _dora_branch(adapter: Adapter) -> bool:
    """Whether ``adapter`` is DoRA with its magnitude per output channel (PEFT's form applies)."""
    return isinstance(adapter, LoraAdapter) and adapter.magnitude is not None and adapter.norm_axis == "out"


def base_layer(module: nn.Module) -> AdaptableLayer:
    """The layer a LoRA layer wraps, or ``module`` itself when it is not wrapped."""
    return module.base if isinstance(module, LoraLayer) else cast(AdaptableLayer, module)


def _state_dict_unmerged(module: LoraLayer, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    # While merged, base.weight holds W + ΔW; a state_dict always holds W, so it means the same
    # model whether it was taken merged or not (loading one unmerges first: _load_from_state_dict).
    if module._original_weight is not None:
        state_dict[prefix + "base.weight"] = module._original_weight.detach().clone()
