"""One named adapter of one layer, per family: LoRA's A and B, DoRA's magnitude, LoHa's and LoKr's
factors; each gives its ΔW in the base kernel's shape.

The math is in :mod:`visionlora.lora_math` and :mod:`visionlora.family_math`; a layer
(:mod:`visionlora.layers`) runs its adapters. Every adapter names its tensors the way files do
(:meth:`Adapter.tensors`): ``lora_A.weight`` / ``lora_B.weight`` (LoRA, DoRA), ``magnitude``
(DoRA's m, any family), ``hada_w1_a …`` (LoHa) and ``lokr_w1 …`` (LoKr), LyCORIS' names.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from visionlora.bnb import float_weight
from visionlora.config import LoraConfig
from visionlora.errors import ConfigError
from visionlora.family_math import (
    Family,
    KronLayout,
    NormAxis,
    along,
    channel_norm,
    decompose,
    hadamard_delta,
    kron_layout,
    kronecker_delta,
    loha_shapes,
    lokr_shapes,
    tucker_rebuild,
)
from visionlora.lora_math import AdaptableLayer, InitFn, is_transposed, lora_scale, lora_shapes, rank_slice

__all__ = [
    "FAMILY_KEYS",
    "REQUIRED_KEYS",
    "Adapter",
    "LohaAdapter",
    "LokrAdapter",
    "LoraAdapter",
    "LoraDelta",
    "adapter_shapes",
    "adapter_tensors",
    "check_family",
    "magnitude_axis",
    "new_adapter",
    "param_count",
    "split_adapter_key",
]

FAMILY_KEYS: dict[Family, tuple[str, ...]] = {
    "lora": ("lora_A.weight", "lora_B.weight"),
    "dora": ("lora_A.weight", "lora_B.weight", "magnitude"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "magnitude"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "magnitude"),
}
"""The tensors (names in files, after ``<layer>.``) an adapter of each family may have."""
REQUIRED_KEYS: dict[Family, tuple[str, ...]] = {
    "lora": FAMILY_KEYS["lora"],
    "dora": FAMILY_KEYS["dora"],
    "loha": FAMILY_KEYS["loha"][:4],
    "lokr": (),
}
"""The tensors every adapter of a family has (LoKr's depend on its layout)."""

T = TypeVar("T")

_ADAPTER_SUFFIXES = tuple(sorted({f".{k}" for keys in FAMILY_KEYS.values() for k in keys}, key=len, reverse=True))


def split_adapter_key(key: str) -> tuple[str, str] | None:
    """(layer, record name) of an adapter tensor key (``fc.lora_A.weight`` -> ``("fc", "lora_A.weight")``),
    or None for any other key."""
    for suffix in _ADAPTER_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix[1:]
    return None


def adapter_tensors(tensors: Mapping[str, T]) -> dict[str, dict[str, T]]:
    """The adapter tensors of a record grouped by layer: layer -> record name -> tensor."""
    grouped: dict[str, dict[str, T]] = {}
    for key, tensor in tensors.items():
        split = split_adapter_key(key)
        if split is not None:
            grouped.setdefault(split[0], {})[split[1]] = tensor
    return grouped


LoraDelta = Callable[[Tensor, Tensor, float], Tensor]
"""The layer's ΔW = scale · B·A for its geometry: ``delta(a, b, scale)``."""


class Adapter(nn.Module, abc.ABC):
    """One named adapter of one layer: its tensors and the scalars that define its ΔW.

    Attributes:
        rank, alpha, scale, dropout: as configured; scale = alpha / r (or / sqrt(r)).
        magnitude: DoRA's m (one value per ``norm_axis`` channel), or None without weight decomposition.
        resolution: the feature-map size the rank was chosen for, when measured.
    """

    family: Family
    magnitude: nn.Parameter | None

    def __init__(self, *, rank: int, alpha: float, rslora: bool, dropout: float) -> None:
        super().__init__()
        self.rank = rank
        self.alpha = float(alpha)
        self.rslora = rslora
        self.scale = lora_scale(alpha, rank, rslora)
        self.dropout = dropout
        self.resolution: int | None = None
        self.magnitude = None
        self.norm_axis: NormAxis = "out"

    def decompose_weight(self, weight: Tensor, axis: NormAxis = "out") -> None:
        """Add DoRA's magnitude, initialised to ‖W‖ per ``axis`` channel (a fresh adapter's ΔW is 0),
        shaped ``(out, 1, …)`` or ``(1, in, 1, …)``."""
        norm = channel_norm(weight.detach().float(), axis)
        self.magnitude = nn.Parameter(along(norm, weight.dim(), axis).to(weight.dtype))
        self.norm_axis = axis

    @property
    def plain(self) -> bool:
        """Whether this is plain LoRA: a branch B(A(x)) added to the base output."""
        return False

    @abc.abstractmethod
    def factors(self) -> dict[str, nn.Parameter]:
        """The family's own tensors (not the magnitude), by their names in files."""

    def tensors(self) -> dict[str, nn.Parameter]:
        """Every tensor of the adapter by its name in files (``lora_A.weight``, ``magnitude``, ``hada_w1_a``, …)."""
        found = self.factors()
        if self.magnitude is not None:
            found["magnitude"] = self.magnitude
        return found

    def num_params(self) -> int:
        """The number of trained values."""
        return sum(t.numel() for t in self.tensors().values())

    @abc.abstractmethod
    def factor_delta(self, shape: torch.Size, lora_delta: LoraDelta, dtype: torch.dtype) -> Tensor:
        """The family's ΔW (before any weight decomposition), in ``shape``, computed in ``dtype``."""

    def delta(self, weight: Tensor, lora_delta: LoraDelta, dtype: torch.dtype = torch.float32) -> Tensor:
        """The change this adapter makes to ``weight``: ΔW, or ``m·(W + ΔW)/‖W + ΔW‖ − W`` with DoRA."""
        delta = self.factor_delta(weight.shape, lora_delta, dtype)
        if self.magnitude is None:
            return delta
        base = weight.to(dtype)
        return decompose(base, delta, self.magnitude.to(dtype), self.norm_axis) - base

    def extra_repr(self) -> str:
        dora = f", dora={self.norm_axis}" if self.magnitude is not None else ""
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.dropout:g}{dora}"


class LoraAdapter(Adapter):
    """LoRA: A and B (``(r, in)`` and ``(out, r)`` for Linear; conv layouts in :mod:`visionlora.layers`).
    With a magnitude it is DoRA."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def __init__(
        self, a: Tensor, b: Tensor, *, rank: int, alpha: float, rslora: bool, dropout: float, transposed: bool = False
    ) -> None:
        super().__init__(rank=rank, alpha=alpha, rslora=rslora, dropout=dropout)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(b)
        self.transposed = transposed
        """Whether A is laid out for a transposed conv, ``(in, r, *k)``: where rank slices are cut."""
        self.schedule: dict[float, int] = {}
        """A rank schedule (``LoraConfig.rank_schedule``) this adapter grows by, or {}."""
        self.held_rank: int | None = None
        """While a schedule holds the adapter below ``rank``, the rank in use: A's first rows and B's
        first columns; the rest get no gradient and B's stay zero, so ΔW is that of the smaller rank."""

    @property
    def current_rank(self) -> int:
        """The rank in use: ``held_rank`` while a schedule holds the adapter lower, else ``rank``."""
        return self.rank if self.held_rank is None else self.held_rank

    def live_factors(self) -> tuple[Tensor, Tensor]:
        """A and B cut to :attr:`current_rank` (the parameters themselves when nothing is held)."""
        if self.held_rank is None:
            return self.lora_A, self.lora_B
        return rank_slice(self.lora_A, self.lora_B, self.rank, self.held_rank, self.transposed)

    @property
    def family(self) -> Family:  # type: ignore[override]
        return "lora" if self.magnitude is None else "dora"

    @property
    def plain(self) -> bool:
        return self.magnitude is None

    def factors(self) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def factor_delta(self, shape: torch.Size, lora_delta: LoraDelta, dtype: torch.dtype) -> Tensor:
        a, b = self.live_factors()
        return lora_delta(a.to(dtype), b.to(dtype), self.scale)


class _FactorAdapter(Adapter):
    """An adapter whose tensors are a dict of named factors (LoHa, LoKr)."""

    def __init__(self, factors: Mapping[str, Tensor], **scalars: Any) -> None:
        super().__init__(**scalars)
        self._names = list(factors)
        for name, value in factors.items():
            setattr(self, name, nn.Parameter(value))

    def factors(self) -> dict[str, nn.Parameter]:
        return {n: getattr(self, n) for n in self._names}

    def _get(self, name: str, dtype: torch.dtype) -> Tensor | None:
        """Factor ``name`` in ``dtype``, or None where this adapter's layout has no such factor."""
        return self.factors()[name].to(dtype) if name in self._names else None


class LohaAdapter(_FactorAdapter):
    """LoHa: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (and Tucker cores ``hada_t1``, ``hada_t2``)."""

    family: Family = "loha"

    def factor_delta(self, shape: torch.Size, lora_delta: LoraDelta, dtype: torch.dtype) -> Tensor:
        w = {n: getattr(self, n).to(dtype) for n in self._names}
        return hadamard_delta(
            w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"], self.scale, shape,
            w.get("hada_t1"), w.get("hada_t2"),
        )  # fmt: skip


class LokrAdapter(_FactorAdapter):
    """LoKr: ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``; ``lokr_w2``, ``lokr_w2_a``/``lokr_w2_b``, or those
    with the Tucker core ``lokr_t2``."""

    family: Family = "lokr"

    def factor_delta(self, shape: torch.Size, lora_delta: LoraDelta, dtype: torch.dtype) -> Tensor:
        w1 = self._get("lokr_w1", dtype)
        if w1 is None:
            w1 = self.factors()["lokr_w1_a"].to(dtype) @ self.factors()["lokr_w1_b"].to(dtype)
        w2 = self._get("lokr_w2", dtype)
        if w2 is None:
            w2a, w2b, core = (self._get(n, dtype) for n in ("lokr_w2_a", "lokr_w2_b", "lokr_t2"))
            assert w2a is not None and w2b is not None
            w2 = w2a @ w2b if core is None else tucker_rebuild(core, w2a, w2b)
        return kronecker_delta(w1, w2, self.scale, shape)


def _loha_init(tensors: dict[str, Tensor], generator: torch.Generator | None) -> None:
    """LyCORIS' LoHa init: the b factors N(0, 1), w1_a and the cores N(0, 0.1), w2_a zero (ΔW = 0)."""
    for name, t in tensors.items():
        if name == "hada_w2_a":
            nn.init.zeros_(t)
        else:
            nn.init.normal_(t, std=1.0 if name.endswith("_b") else 0.1, generator=generator)


def _lokr_init(tensors: dict[str, Tensor], generator: torch.Generator | None) -> None:
    """LyCORIS' LoKr init: the W2 half that ends the product (``lokr_w2`` or ``lokr_w2_b``) zero, the rest
    kaiming-uniform (ΔW = 0)."""
    for name, t in tensors.items():
        if name in ("lokr_w2", "lokr_w2_b"):
            nn.init.zeros_(t)
        else:
            nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)


def magnitude_axis(magnitude_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> NormAxis | None:
    """Which channels a DoRA magnitude of ``magnitude_shape`` is per, on a weight of ``weight_shape``:
    ``"out"`` for ``(out, 1, …)``, ``"in"`` for ``(1, in, 1, …)``, None for any other shape."""
    dims = len(weight_shape)
    if tuple(magnitude_shape) == (weight_shape[0], *([1] * (dims - 1))):
        return "out"
    if tuple(magnitude_shape) == (1, weight_shape[1], *([1] * (dims - 2))):
        return "in"
    return None


def check_family(base: AdaptableLayer, family: Family) -> None:
    if family != "lora" and is_transposed(base):
        raise ConfigError(
            f"family {family!r}: a {type(base).__name__} takes family 'lora' only (no peer defines DoRA, LoHa or "
            "LoKr for transposed convolutions, so there is no convention to follow); use family_pattern to give "
            "it 'lora'"
        )


def adapter_shapes(
    base: AdaptableLayer,
    family: Family,
    rank: int,
    cfg: LoraConfig,
    given: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, tuple[int, ...]]:
    """The tensors (file names -> shapes) an adapter of ``family`` and ``rank`` has on ``base``.

    ``given`` (a file's shapes) picks among the layouts a file may hold: LoKr's halves and
    factorisation, LoHa's Tucker cores, a DoRA magnitude per output or per input channel, and a
    magnitude on LoHa or LoKr (LyCORIS' ``dora_scale``).
    """
    check_family(base, family)
    weight_shape = tuple(float_weight(base).shape)
    if family in ("lora", "dora"):
        a_shape, b_shape = lora_shapes(base, rank, cfg.conv_groups)
        shapes = {"lora_A.weight": a_shape, "lora_B.weight": b_shape}
    elif family == "loha":
        shapes = loha_shapes(weight_shape, rank, cfg.tucker if given is None else "hada_t1" in given)
    else:
        layout = kron_layout(weight_shape, rank, cfg.lokr_factor, cfg.decompose_both, cfg.tucker)
        shapes = lokr_shapes(weight_shape, rank, layout if given is None else _layout_of(given, weight_shape))
    magnitude = None if given is None else given.get("magnitude")
    if family == "dora" or magnitude is not None:
        out_shape = (weight_shape[0], *([1] * (len(weight_shape) - 1)))
        fits = magnitude is not None and magnitude_axis(magnitude, weight_shape) is not None
        shapes["magnitude"] = tuple(magnitude) if magnitude is not None and fits else out_shape
    return shapes


def new_adapter(
    base: AdaptableLayer,
    family: Family,
    rank: int,
    alpha: float,
    cfg: LoraConfig,
    init: InitFn | None,
    generator: torch.Generator | None = None,
    given: Mapping[str, tuple[int, ...]] | None = None,
) -> Adapter:
    """A new adapter of ``family`` for ``base``, in the base weight's dtype and device, not yet attached.

    With ``init``, ΔW = 0: LoRA's A drawn by ``init`` (from ``generator``) and B zero, LoHa's and
    LoKr's factors as LyCORIS initialises them, DoRA's magnitude ‖W‖. With ``init=None`` the
    tensors are left for values to be copied in, in the layout of ``given`` (see :func:`adapter_shapes`).
    """
    weight = float_weight(base)
    shapes = adapter_shapes(base, family, rank, cfg, given)
    scalars: dict[str, Any] = {"rank": rank, "alpha": alpha, "rslora": cfg.rslora, "dropout": cfg.dropout}
    empty = {n: torch.empty(s, dtype=weight.dtype, device=weight.device) for n, s in shapes.items() if n != "magnitude"}
    adapter: Adapter
    if family in ("lora", "dora"):
        a, b = empty["lora_A.weight"], empty["lora_B.weight"].zero_()
        if init is not None:
            init(a, rank, generator)
        adapter = LoraAdapter(a, b, **scalars, transposed=is_transposed(base))
    elif family == "loha":
        if init is not None:
            _loha_init(empty, generator)
        adapter = LohaAdapter(empty, **scalars)
    else:
        if init is not None:
            _lokr_init(empty, generator)
        if "lokr_w1" in empty and "lokr_w2" in empty:  # LyCORIS: two full halves take scale 1, whatever alpha
            scalars["alpha"] = math.sqrt(rank) if cfg.rslora else float(rank)
        adapter = LokrAdapter(empty, **scalars)
    if "magnitude" in shapes:
        adapter.decompose_weight(weight, magnitude_axis(shapes["magnitude"], tuple(weight.shape)) or "out")
    return adapter


def _layout_of(shapes: Mapping[str, tuple[int, ...]], weight_shape: tuple[int, ...]) -> KronLayout:
    """The LoKr layout a file's tensor shapes describe (sizes that do not divide give shapes that will not match)."""
    w1 = shapes.get("lokr_w1")
    if w1 is not None and len(w1) == 2:
        a, c = w1
    else:
        a, c = shapes.get("lokr_w1_a", (1,))[0], shapes.get("lokr_w1_b", (1, 1))[-1]
    if a < 1 or c < 1 or weight_shape[0] % a or weight_shape[1] % c:
        raise ConfigError(
            f"LoKr factor of shape {(a, c)} does not split a kernel of shape {tuple(weight_shape)}: its sizes must "
            "divide the output and input channels (per group)"
        )
    b, d = weight_shape[0] // a, weight_shape[1] // c
    w2: Literal["full", "lora", "tucker"] = (
        "full" if "lokr_w2" in shapes else "tucker" if "lokr_t2" in shapes else "lora"
    )
    return KronLayout((a, b), (c, d), "full" if w1 is not None else "lora", w2)


def param_count(base: AdaptableLayer, family: Family, rank: int, cfg: LoraConfig) -> int:
    """The number of values an adapter of ``family`` and ``rank`` trains on ``base`` (what ``rank_budget`` counts)."""
    return sum(math.prod(s) for s in adapter_shapes(base, family, rank, cfg).values())
