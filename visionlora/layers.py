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
W + ΔW, so merging (W <- W + ΔW) gives the same outputs by construction.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from visionlora.errors import AdapterError, ConfigError, MergeError, UnsupportedModuleError

__all__ = [
    "AdaptableLayer",
    "ConvGroups",
    "InitFn",
    "LoraAdapter",
    "LoraConv",
    "LoraLayer",
    "LoraLinear",
    "base_layer",
    "conv_delta",
    "gaussian_init",
    "kaiming_init",
    "layer_kind",
    "linear_delta",
    "lora_scale",
    "lora_shapes",
    "max_useful_rank",
    "transforms_weight_or_input",
    "wrap_layer",
]

_CONV_TYPES: dict[type[nn.Module], str] = {nn.Conv1d: "Conv1d", nn.Conv2d: "Conv2d", nn.Conv3d: "Conv3d"}
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

AdaptableLayer = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
"""The layer types visionlora adapts (their subclasses included)."""

InitFn = Callable[[Tensor, int, "torch.Generator | None"], None]
"""Initialises A in place: ``init(a, rank, generator)``."""


# ---------------------------------------------------------------------------------------------
# Pure math


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The branch multiplier: alpha / r, or alpha / sqrt(r) for rsLoRA (Kalajdzievski 2023).

    Example:
        >>> lora_scale(8, 4), lora_scale(8, 4, rslora=True)
        (2.0, 4.0)
    """
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def linear_delta(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """ΔW = scale · B @ A for a Linear layer.

    Args:
        a: A, shape ``(r, in)``.
        b: B, shape ``(out, r)``.
        scale: The branch multiplier.

    Returns:
        ΔW, shape ``(out, in)``, the shape of ``nn.Linear.weight``.
    """
    return (b @ a) * scale


def conv_delta(a: Tensor, b: Tensor, scale: float, groups: int) -> Tensor:
    """ΔW for a convolution, in the base kernel's exact shape, for either grouped-conv layout.

    Args:
        a: A as a conv weight: ``(groups · r, in / groups, *k)`` for the per-group layout (one A_j
            per group), or ``(r, in / groups, *k)`` for the shared layout (one A for all groups).
            With groups = 1 the two are the same.
        b: B as a 1×1 conv weight, shape ``(out, r, 1, …)``.
        scale: The branch multiplier.
        groups: The base conv's ``groups``.

    Returns:
        ΔW, shape ``(out, in / groups, *k)``: group j's block is scale · B_j @ A_j with A and the
        kernel flattened to ``(r, in / groups · prod(k))`` and B_j = B's rows of group j. Dilation
        does not enter ΔW; it enters when ΔW is applied through the base conv.
    """
    rank = b.shape[1]
    out = b.shape[0]
    a_groups = a.reshape(a.shape[0] // rank, rank, -1)  # (g or 1, r, in/g · prod(k))
    b_groups = b.reshape(groups, out // groups, rank)  # (g, out/g, r)
    return (torch.matmul(b_groups, a_groups) * scale).reshape(out, *a.shape[1:])


def all_finite(t: Tensor) -> bool:
    """Whether every element of ``t`` is finite.

    One reduction: a NaN or Inf anywhere makes the float32 sum non-finite. Only a sum that
    overflows although every element is finite needs the element-wise check.
    """
    if not t.is_floating_point():
        return True
    return math.isfinite(t.sum(dtype=torch.float32).item()) or bool(torch.isfinite(t).all())


ConvGroups = Literal["per_group", "shared"]
"""Layout of a grouped conv's adapter: one rank-r pair per group, or one shared factorisation."""


def lora_shapes(
    base: AdaptableLayer, rank: int, conv_groups: ConvGroups = "per_group"
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of A and B for a rank-``rank`` adapter on ``base`` (an nn.Linear or nn.ConvNd).

    Example:
        >>> lora_shapes(nn.Conv2d(8, 16, 3, groups=2), 4), lora_shapes(nn.Conv2d(8, 16, 3, groups=2), 4, "shared")
        (((8, 4, 3, 3), (16, 4, 1, 1)), ((4, 4, 3, 3), (16, 4, 1, 1)))
    """
    if isinstance(base, nn.Linear):
        return (rank, base.in_features), (base.out_features, rank)
    kernel = tuple(base.weight.shape[2:])
    a_rows = rank if conv_groups == "shared" else base.groups * rank
    return (
        (a_rows, base.in_channels // base.groups, *kernel),
        (base.out_channels, rank, *(1 for _ in kernel)),
    )


def max_useful_rank(base: AdaptableLayer, conv_groups: ConvGroups = "per_group") -> int:
    """The rank above which ΔW cannot grow: min(out, in) of each factorised matrix, kernel included."""
    if isinstance(base, nn.Linear):
        return min(base.in_features, base.out_features)
    per_group_in = base.weight[0].numel()  # in/g · prod(k)
    out = base.out_channels if conv_groups == "shared" else base.out_channels // base.groups
    return min(out, per_group_in)


def kaiming_init(a: Tensor, rank: int, generator: torch.Generator | None = None) -> None:
    """Kaiming-uniform with a = sqrt(5), the default init of nn.Linear / nn.Conv weights."""
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)


def gaussian_init(a: Tensor, rank: int, generator: torch.Generator | None = None) -> None:
    """Normal with std 1 / r."""
    nn.init.normal_(a, std=1.0 / rank, generator=generator)


def layer_kind(module: nn.Module) -> str | None:
    """``"Linear"``, ``"Conv1d"``, ``"Conv2d"`` or ``"Conv3d"`` for adaptable layers, else None."""
    if isinstance(module, LoraLayer):
        return layer_kind(module.base)
    if isinstance(module, nn.Linear):
        return "Linear"
    for conv_type, kind in _CONV_TYPES.items():
        if isinstance(module, conv_type):
            return kind
    return None


def transforms_weight_or_input(base: nn.Module) -> bool:
    """True when ``type(base)`` overrides how torch's own class runs its weight on the input."""
    reference = nn.Linear if isinstance(base, nn.Linear) else next(t for t in _CONV_TYPES if isinstance(base, t))
    methods = ("forward",) if reference is nn.Linear else ("forward", "_conv_forward")
    return any(getattr(type(base), m) is not getattr(reference, m) for m in methods)


# ---------------------------------------------------------------------------------------------
# Modules


class LoraAdapter(nn.Module):
    """One named adapter of one layer: A, B and the scalars that define its branch.

    Attributes:
        lora_A: A; ``(r, in)`` for Linear, ``(groups · r, in / groups, *k)`` for convs.
        lora_B: B; ``(out, r)`` for Linear, ``(out, r, 1, …)`` for convs.
        rank, alpha, scale, dropout: as configured; scale = alpha / r (or / sqrt(r)).
    """

    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def __init__(
        self,
        a: Tensor,
        b: Tensor,
        *,
        rank: int,
        alpha: float,
        rslora: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(b)
        self.rank = rank
        self.alpha = float(alpha)
        self.rslora = rslora
        self.scale = lora_scale(alpha, rank, rslora)
        self.dropout = dropout
        self.resolution: int | None = None  # feature-map size the rank was chosen for, when measured

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.dropout:g}"


class LoraLayer(nn.Module, abc.ABC):
    """A base layer plus named adapters; ``forward`` is the base output plus the active branches.

    Adapters live in ``self.adapters`` (an ``nn.ModuleDict`` of :class:`LoraAdapter`). The active
    ones and their weights are ``self.active`` (name -> weight); the output adds
    ``weight · scale · B(A(x))`` for each. While merged, the base weight holds W + ΔW and the
    original W is kept to restore it exactly on :meth:`unmerge`.
    """

    base: AdaptableLayer
    _original_weight: Tensor | None

    def __init__(self, base: AdaptableLayer) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: dict[str, float] = {}
        self.disabled = False
        self.weight_space = transforms_weight_or_input(base)
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

    def adapter(self, name: str) -> LoraAdapter:
        """Adapter ``name`` of this layer (``self.adapters[name]``, typed)."""
        return cast(LoraAdapter, self.adapters[name])

    def new_adapter(
        self,
        rank: int,
        alpha: float,
        *,
        rslora: bool = False,
        dropout: float = 0.0,
        init: InitFn = kaiming_init,
        generator: torch.Generator | None = None,
        conv_groups: ConvGroups = "per_group",
    ) -> LoraAdapter:
        """A new adapter for this layer (A initialised, B = 0), not yet attached to it."""
        self.check_dropout(dropout)
        weight = self.base.weight
        a_shape, b_shape = lora_shapes(self.base, rank, conv_groups)
        a = torch.empty(a_shape, dtype=weight.dtype, device=weight.device)
        init(a, rank, generator)
        b = torch.zeros(b_shape, dtype=weight.dtype, device=weight.device)
        return LoraAdapter(a, b, rank=rank, alpha=alpha, rslora=rslora, dropout=dropout)

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
        delta = torch.zeros(self.base.weight.shape, dtype=dtype, device=self.base.weight.device)
        for name, w in self.active.items():
            adapter = self.adapter(name)
            delta = delta + w * self._delta(adapter.lora_A.to(dtype), adapter.lora_B.to(dtype), adapter.scale)
        return delta

    def merged_weight(self) -> Tensor:
        """W + ΔW computed in float32 and cast to W's dtype.

        Raises:
            MergeError: if the result holds NaN or Inf (fp16 overflow included).
        """
        weight = self.base.weight
        new = weight.detach().float()
        for name, w in self.active.items():
            adapter = self.adapter(name)
            new = self._add_delta(new, adapter.lora_A.float(), adapter.lora_B.float(), w * adapter.scale)
        new = new.to(weight.dtype)
        if not all_finite(new):
            raise MergeError(
                f"merging into {type(self.base).__name__} weight {tuple(weight.shape)} ({weight.dtype}) "
                "gives NaN/Inf; the weights were left untouched"
            )
        return new

    def _add_delta(self, weight: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
        """weight + ΔW of one adapter, as a new tensor (``weight`` is left as it is)."""
        return weight + self._delta(a, b, scale)

    def commit_merge(self, new_weight: Tensor) -> None:
        """Write a weight from :meth:`merged_weight`, keeping the original for :meth:`unmerge`."""
        if self.merged:
            return
        weight = self.base.weight
        self._original_weight = weight.detach().clone()
        with torch.no_grad():
            weight.copy_(new_weight)

    def merge(self) -> None:
        """Fold the active adapters into the base weight (no-op when already merged)."""
        if not self.merged:
            self.commit_merge(self.merged_weight())

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
        if self.merged or self.disabled or not self.active:
            return self.base(x)
        if self.weight_space:
            weight = self.base.weight
            new = weight + self.delta_weight(weight.dtype)
            return functional_call(self.base, {"weight": new}, (x,))
        y = self.base(x)
        for name, w in self.active.items():
            adapter = self.adapter(name)
            h = x if not (adapter.dropout and self.training) else F.dropout(x, adapter.dropout, True)
            y = self._add_branch(y, h.to(adapter.lora_A.dtype), adapter.lora_A, adapter.lora_B, w * adapter.scale)
        return y

    def _add_branch(self, y: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
        """y + scale · B(A(x)). The scale goes into B (r·out numbers) rather than into the output,
        so neither pass spends a kernel over the whole output on it."""
        return y + self._branch(x, a, b * scale if scale != 1.0 else b).to(y.dtype)

    @abc.abstractmethod
    def _delta(self, a: Tensor, b: Tensor, scale: float) -> Tensor:
        """ΔW of one adapter in the base weight's shape."""

    @abc.abstractmethod
    def _branch(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """B(A(x)) of one adapter, unscaled, in the base output's shape."""

    def extra_repr(self) -> str:
        active = ", ".join(f"{n}:{w:g}" for n, w in self.active.items()) or "-"
        return f"active={active}, merged={self.merged}, disabled={self.disabled}, weight_space={self.weight_space}"


class _LinearLora(torch.autograd.Function):
    """y = x (W + Σ sᵢ Bᵢ Aᵢ)ᵀ + bias, with the gradients of the unmerged LoRA formula.

    The forward runs one GEMM on the effective weight (forming it costs out·r·in, far less than
    the two thin GEMMs over every token that x Aᵀ Bᵀ needs). The backward needs no weight
    gradient of the base: with g the output gradient and u = x Aᵀ, v = g B,

        ∂x = g (W + Σ sBA),   ∂A = s vᵀ x,   ∂B = s gᵀ u,   ∂W = gᵀ x (only if W trains),

    each thin product in the layout BLAS runs fastest (the small matrix on the right,
    transposed). The backward is itself made of differentiable ops, so double backward works.
    The combined forward(ctx, ...) form is used because torch binds the arguments of a
    ``setup_context`` Function through ``inspect.signature`` on every call (about 13 µs, as much
    as the GEMMs of a small layer); under torch.func transforms the layer takes the branch form.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, scales: tuple[float, ...], *ab: Tensor
    ) -> Tensor:
        ctx.save_for_backward(x, weight, *ab)
        ctx.scales = scales
        ctx.has_bias = bias is not None
        return F.linear(x, _effective_weight(weight, scales, ab), bias)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, *ab = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = (g2 @ _effective_weight(weight, ctx.scales, ab)).view(x.shape) if needs[0] else None
        grad_w = (g2.t() @ x2) if needs[1] else None
        grad_bias = g2.sum(0) if ctx.has_bias and needs[2] else None
        grads: list[Tensor | None] = []
        for i, scale in enumerate(ctx.scales):
            a, b = ab[2 * i], ab[2 * i + 1]
            grad_a = grad_b = None
            if needs[4 + 2 * i]:
                bs_t = b.t().contiguous()  # (r, out): g (s B) runs with a transposed B on the right
                bs_t = bs_t * scale if scale != 1.0 else bs_t
                grad_a = _tall_t_mm(g2 @ bs_t.t(), x2)  # s (g B)ᵀ x
            if needs[5 + 2 * i]:
                grad_b = _tall_t_mm(x2 @ a.t(), g2).t()  # (uᵀ g)ᵀ
                grad_b = grad_b * scale if scale != 1.0 else grad_b
            grads += [grad_a, grad_b]
        return (grad_x, grad_w, grad_bias, None, *grads)


def _tall_t_mm(p: Tensor, q: Tensor) -> Tensor:
    """pᵀ q for p (N, m) and q (N, n) with N, the summed dimension, long.

    In float32, CPU BLAS runs such a product (small output, long inner dimension) on one thread
    (measured: 36 µs on 1 or 2 threads for N=4096, 21 µs split); so in eager mode on CPU with
    several threads, slices of N run as one batched product and their results are summed. The
    sum's rounding then depends on the thread count (about 1e-7 relative in float32).
    """
    n, parts = p.shape[0], 1
    if p.device.type == "cpu" and not torch.compiler.is_compiling() and p.is_contiguous() and q.is_contiguous():
        parts = min(torch.get_num_threads(), n // 512)
        while parts > 1 and n % parts:
            parts -= 1
    if parts < 2:
        return p.t() @ q
    return torch.bmm(p.view(parts, n // parts, -1).transpose(1, 2), q.view(parts, n // parts, -1)).sum(0)


def _effective_weight(weight: Tensor, scales: tuple[float, ...], ab: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
    """W + Σ sᵢ Bᵢ Aᵢ (one addmm per adapter)."""
    for i, scale in enumerate(scales):
        weight = torch.addmm(weight, ab[2 * i + 1], ab[2 * i], alpha=scale)
    return weight


_EXACT_DTYPES = (torch.float32, torch.float64)


class LoraLinear(LoraLayer):
    """LoRA on an ``nn.Linear``: y = base(x) + s · (x Aᵀ) Bᵀ.

    In float32/float64 without autocast, active dropout or torch.func transforms, the output is
    computed as x (W + s B A)ᵀ with the same gradients (``_LinearLora``): fewer and cheaper
    kernels, equal to the two-GEMM form to rounding. In fp16/bf16 the branch is added to the output instead, so
    an update too small to show in a low-precision W still shows in y.
    """

    def forward(self, x: Tensor) -> Tensor:
        active = self.active
        if not active or self.disabled or self.weight_space or self._original_weight is not None:
            return super().forward(x)
        weight = self.base.weight
        dtype = weight.dtype
        if (
            dtype not in _EXACT_DTYPES
            or x.dtype != dtype
            or torch.is_autocast_enabled(x.device.type)
            or torch._C._are_functorch_transforms_active()  # vmap/grad need a setup_context Function
        ):
            return super().forward(x)
        scales, ab = [], []
        adapters = self.adapters
        for name, w in active.items():
            adapter = cast(LoraAdapter, adapters[name])
            a, b = adapter.lora_A, adapter.lora_B
            if (adapter.dropout and self.training) or a.dtype != dtype or b.dtype != dtype:
                return super().forward(x)
            scales.append(w * adapter.scale)
            ab += [a, b]
        return _LinearLora.apply(x, weight, self.base.bias, tuple(scales), *ab)

    def _delta(self, a: Tensor, b: Tensor, scale: float) -> Tensor:
        return linear_delta(a, b, scale)

    def _add_delta(self, weight: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
        return torch.addmm(weight, b, a, alpha=scale)  # W + scale · B @ A in one kernel

    def _branch(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return F.linear(F.linear(x, a), b)

    def _add_branch(self, y: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
        if y.dtype != a.dtype or y.dim() < 2:
            return super()._add_branch(y, x, a, b, scale)
        # One GEMM adds the branch into the base output: y + scale · (x Aᵀ) Bᵀ.
        h = F.linear(x, a)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=scale)
        return out.view(y.shape)


class LoraConv(LoraLayer):
    """LoRA on an ``nn.Conv1d/2d/3d``.

    Per-group layout: A runs through the base's own geometry, then B as a grouped 1×1 conv.
    Shared layout (grouped convs only): ΔW = B·A, small for depthwise convs, runs through the
    base's own geometry.
    """

    base: nn.Conv1d | nn.Conv2d | nn.Conv3d

    def _delta(self, a: Tensor, b: Tensor, scale: float) -> Tensor:
        return conv_delta(a, b, scale, self.base.groups)

    def _branch(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        # The base's own _conv_forward applies stride, padding (ints, tuples, 'same', 'valid'),
        # dilation, padding_mode and groups exactly as for W; this is the one place it is called.
        groups = self.base.groups
        if a.shape[0] != groups * b.shape[1]:  # shared layout: run the (small) ΔW itself
            return self.base._conv_forward(x, conv_delta(a, b, 1.0, groups), None)
        h = self.base._conv_forward(x, a, None)
        return _CONV_FN[b.dim() - 2](h, b, groups=groups)

    def _add_branch(self, y: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
        base = self.base
        pointwise = _pointwise(base) and x.is_contiguous()
        if not _gemm_form_pays(y, a, b, base.groups, pointwise):
            return super()._add_branch(y, x, a, b, scale)
        # Per sample, B is an (out × r) matrix on h's (r × positions), and so is A on x's
        # (in × positions) when the conv is pointwise: batched GEMMs, with B's added into the base
        # output. Other geometries run A through the base's own _conv_forward.
        n = y.shape[0]
        if pointwise:
            h = torch.bmm(_per_sample(a, n), x.view(n, x.shape[1], -1))
        else:
            h = base._conv_forward(x, a, None).reshape(n, a.shape[0], -1)
        return torch.baddbmm(y.view(n, y.shape[1], -1), _per_sample(b, n), h, alpha=scale).view(y.shape)


# Measured on CPU (2 threads, oneDNN and MKL): the convs with r channels on one side, forward and
# backward, run several times slower than GEMMs on few samples (1×1 from 1024 to 8 channels on 8×8
# maps, batch 8: 2.2 ms as a conv, 0.25 ms as GEMMs) and on pointwise convs with many positions
# per sample; with many samples of few positions each, the per-sample weight gradients that the
# GEMM form sums cost more than the convs (batch 128 on 6×6 maps: 1.65× slower).
_GEMM_MAX_BATCH = 16
_GEMM_MIN_POSITIONS = 49


def _gemm_form_pays(y: Tensor, a: Tensor, b: Tensor, groups: int, pointwise: bool) -> bool:
    """Whether a conv adapter runs as batched GEMMs rather than as convs: ungrouped (grouped GEMMs
    would copy the weights for each sample and keep the copies for backward), on a batched,
    non-empty, contiguous CPU output in the adapter's dtype, where it was measured faster."""
    if groups != 1 or y.dim() != b.dim() or y.device.type != "cpu" or y.dtype != a.dtype:
        return False
    if not y.is_contiguous() or y.numel() == 0:
        return False
    return y.shape[0] <= _GEMM_MAX_BATCH or (pointwise and math.prod(y.shape[2:]) >= _GEMM_MIN_POSITIONS)


def _pointwise(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> bool:
    """Whether the conv is a 1×…×1 kernel with stride 1 and no padding: a matrix on each position.
    (A strided one would need a strided copy of x kept for backward, where the conv keeps x.)"""
    padding = conv.padding
    unpadded = isinstance(padding, str) or not any(padding)
    return all(k == 1 for k in conv.kernel_size) and all(s == 1 for s in conv.stride) and unpadded


def _per_sample(weight: Tensor, n: int) -> Tensor:
    """A pointwise conv weight (out, in, 1, …) as n views of its (out × in) matrix (no copy)."""
    return weight.reshape(1, weight.shape[0], -1).expand(n, -1, -1)


def base_layer(module: nn.Module) -> AdaptableLayer:
    """The layer a LoRA layer wraps, or ``module`` itself when it is not wrapped."""
    return module.base if isinstance(module, LoraLayer) else cast(AdaptableLayer, module)


def _state_dict_unmerged(module: LoraLayer, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    # While merged, base.weight holds W + ΔW; a state_dict always holds W, so it means the same
    # model whether it was taken merged or not (loading one unmerges first: _load_from_state_dict).
    if module._original_weight is not None:
        state_dict[prefix + "base.weight"] = module._original_weight.detach().clone()


def wrap_layer(module: nn.Module, name: str = "") -> LoraLayer:
    """A :class:`LoraLinear` or :class:`LoraConv` around ``module``, with no adapters yet.

    Raises:
        UnsupportedModuleError: for any other type, and for uninitialised (lazy) or
            parametrized layers; the message names ``name`` and the type.
    """
    label = f"{name!r} ({type(module).__name__})" if name else type(module).__name__
    kind = layer_kind(module)
    if kind is None:
        raise UnsupportedModuleError(
            f"{label}: visionlora adapts nn.Linear and nn.Conv1d/2d/3d (and their subclasses), "
            f"not {type(module).__name__}"
        )
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        raise UnsupportedModuleError(f"{label}: lazy layer is not initialised; run one forward pass first")
    if parametrize.is_parametrized(module):
        raise UnsupportedModuleError(f"{label}: layers with torch parametrizations are not supported")
    if module._forward_pre_hooks or module._forward_hooks:
        raise UnsupportedModuleError(
            f"{label}: has forward hooks (old-style weight_norm and spectral_norm are hooks too); the LoRA branch "
            "would bypass them, so merged and unmerged outputs would differ. Remove the hooks before adapting"
        )
    layer = cast(AdaptableLayer, module)
    wrapper = LoraLinear(layer) if kind == "Linear" else LoraConv(layer)
    return wrapper.train(module.training)  # a layer in eval mode stays in eval mode (no branch dropout)
