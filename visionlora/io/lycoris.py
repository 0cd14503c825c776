"""DoRA, LoHa and LoKr in the kohya layout, as LyCORIS writes them and sd-scripts, ComfyUI and A1111 read them.

Per module (``lora_unet_<name>``, ``lora_te_<name>``, or ``lycoris_<name>`` from LyCORIS' own
wrapper):

- LoHa: ``.hada_w1_a``, ``.hada_w1_b``, ``.hada_w2_a``, ``.hada_w2_b`` (and Tucker cores
  ``.hada_t1``, ``.hada_t2``), ``.alpha``; ΔW = alpha / r · (w1_a w1_b) ⊙ (w2_a w2_b);
- LoKr: ``.lokr_w1`` or ``.lokr_w1_a``/``.lokr_w1_b``, ``.lokr_w2`` or ``.lokr_w2_a``/``.lokr_w2_b``
  (and a Tucker core ``.lokr_t2``), ``.alpha``; ΔW = alpha / r · w1 ⊗ w2, with scale 1 when both
  halves are full matrices (the alpha is then ignored);
- DoRA: ``.dora_scale`` beside any of them (LoRA's ``lora_down``/``lora_up`` included): the
  magnitude, shaped ``(out, 1, …)`` (per output channel, LyCORIS' default and PEFT's axis) or
  ``(1, in, 1, …)`` (per input channel, ``wd_on_out=False``, older LyCORIS files); the shape says
  which convention a file uses.

In visionlora's records these tensors keep LyCORIS' names after ``<module>.`` (``magnitude`` for
``dora_scale``); see :mod:`visionlora.branches`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from visionlora.branches import FAMILY_KEYS, REQUIRED_KEYS
from visionlora.config import Family
from visionlora.io.adapter import file_error

__all__ = [
    "FAMILY_PARTS",
    "family_of",
    "family_rank",
    "file_parts",
    "full_kron",
    "missing_parts",
    "record_parts",
    "scale_key",
]

FAMILY_PARTS: dict[str, str] = {
    **{f".{name}": name for family in ("loha", "lokr") for name in FAMILY_KEYS[family] if name != "magnitude"},
    ".dora_scale": "magnitude",
}
"""Key endings of LyCORIS' tensors in a kohya-layout file -> their names in a visionlora record."""


def family_of(names: set[str] | Mapping[str, object]) -> Family | None:
    """The family of a module whose record tensors are ``names`` (``lora_A.weight``, ``hada_w1_a``, ...)."""
    if "lora_A.weight" in names or "lora_B.weight" in names:
        return "dora" if "magnitude" in names else "lora"
    if any(n.startswith("hada_") for n in names):
        return "loha"
    if any(n.startswith("lokr_") for n in names):
        return "lokr"
    return None


def family_rank(family: Family, tensors: Mapping[str, torch.Tensor]) -> int | None:
    """The rank the tensors of one module show (by record name), or None where their shapes give none.

    A LoKr with two full halves has no rank; it is given rank 1 (its scale is 1 whatever the rank).
    """
    try:
        if family in ("lora", "dora"):
            return int(tensors["lora_A.weight"].shape[0])
        if family == "loha":
            return int(tensors["hada_w1_b"].shape[0])
        if "lokr_w1_a" in tensors:
            return int(tensors["lokr_w1_a"].shape[1])
        if "lokr_t2" in tensors:
            return int(tensors["lokr_t2"].shape[0])
        if "lokr_w2_a" in tensors:
            return int(tensors["lokr_w2_a"].shape[1])
        return 1
    except (KeyError, IndexError):
        return None


def full_kron(tensors: Mapping[str, object]) -> bool:
    """Whether a LoKr module's two halves are both full matrices (scale 1)."""
    return "lokr_w1" in tensors and "lokr_w2" in tensors


def scale_key(family: Family, names: Mapping[str, object] | set[str]) -> str:
    """The record name of the tensor that carries a module's scale linearly (B, w1_a, w1)."""
    if family in ("lora", "dora"):
        return "lora_B.weight"
    if family == "loha":
        return "hada_w1_a"
    return "lokr_w1" if "lokr_w1" in names else "lokr_w1_a"


def record_parts(path: Path, stem: str, parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One module's LyCORIS tensors (by key ending, ``.hada_w1_a``) under their record names, checked
    to be of one family."""
    tensors = {FAMILY_PARTS[p]: t for p, t in parts.items() if p in FAMILY_PARTS}
    kinds = {n.split("_")[0] for n in tensors if n != "magnitude"}
    if len(kinds) > 1:
        raise file_error(path, f"{stem}: holds tensors of two families ({sorted(tensors)}); expected one")
    return tensors


def file_parts(family: Family, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One module's record tensors (``hada_w1_a``, ``magnitude``) under their key endings in a kohya file."""
    ending = {v: k for k, v in FAMILY_PARTS.items()}
    if family in ("lora", "dora"):
        ending |= {"lora_A.weight": ".lora_down.weight", "lora_B.weight": ".lora_up.weight"}
    return {ending[n]: t for n, t in tensors.items()}


def missing_parts(family: str, group: Mapping[str, torch.Tensor]) -> str | None:
    """What a LoHa or LoKr module lacks (e.g. ``hada_w2_b``, or ``lokr_w2 or lokr_w2_a + lokr_w2_b``), or None."""
    if family == "loha":
        needed = [n for n in REQUIRED_KEYS["loha"] if n not in group]
        if ("hada_t1" in group) != ("hada_t2" in group):
            needed.append("both Tucker cores hada_t1 and hada_t2")
        return ", ".join(needed) or None
    for half in ("w1", "w2"):
        if f"lokr_{half}" not in group and not {f"lokr_{half}_a", f"lokr_{half}_b"} <= set(group):
            return f"lokr_{half} or lokr_{half}_a + lokr_{half}_b"
    return None
