"""Presets: named target selections for model families, expanded to exact module names of a model.

A target ``"preset:<name>"`` or ``"preset:<name>:<n>"`` stands for the module names listed here.
Families are recognised by class (module path and name along the MRO), so neither timm nor
diffusers is imported.

=====================  ==============================================================================
preset                 selects
=====================  ==============================================================================
resnet-last-blocks[:n] the convs of the last n residual blocks (default: the whole last stage), main
                       path and shortcut (downsample) convs, not SE gates; torchvision ResNet /
                       ResNeXt / Wide ResNet, timm ResNet (resnet*, resnext*, seresnet*, resnet*d, ...)
                       and timm ResNetV2 (BiT)
resnet-blocks          the same convs in every residual block of every stage (the stem conv excluded)
last-convs:n           the last n conv layers in module order, any model
unet-attention         to_q, to_k, to_v, to_out.0 of every attention module (self and cross) of a
                       diffusers UNet2DConditionModel, or of a UNet2DModel that has attention
unet-attention-ff      the above plus the feed-forward Linears of the transformer blocks
unet-locon             the above plus the ResNet blocks' conv1, conv2 and conv_shortcut ("LoCon")
flux-attention         FluxTransformer2DModel: to_q/k/v, to_out.0 and the context stream's add_q/k/v_proj,
                       to_add_out in double-stream blocks; to_q/k/v in single-stream blocks
flux-all               the above plus ff, ff_context (double) and proj_mlp, proj_out (single)
flux-double            flux-all's layers in the double-stream blocks (``transformer_blocks``)
flux-single            flux-all's layers in the single-stream blocks (``single_transformer_blocks``)
flux-context           flux-all's layers of the text (context) stream: add_*_proj, to_add_out, ff_context
flux-modulation        the blocks' AdaLN modulation Linears (norm1.linear, norm1_context.linear, norm.linear)
sd3-attention          SD3Transformer2DModel (SD3/3.5 MMDiT): to_q/k/v, to_out.0, add_q/k/v_proj,
                       to_add_out, and SD3.5's second attention (attn2)
sd3-all                the above plus ff and ff_context
sd3-context            sd3-all's layers of the text (context) stream
=====================  ==============================================================================

The block-kind presets (``flux-double``, ``flux-context``, ...) are meant for ``rank_pattern``
and ``alpha_pattern`` keys as well as targets: ``rank_pattern={"preset:flux-single": 4}``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from visionlora._tree import from_diffusers, iter_modules
from visionlora.config import LoraConfig
from visionlora.errors import TargetError
from visionlora.layers import layer_kind

__all__ = ["PRESETS", "RESNET_FAMILIES", "ResNetFamily", "expand_preset", "fitting_presets", "presets_in_patterns"]


@dataclass(frozen=True)
class ResNetFamily:
    """Where a ResNet-style architecture keeps its stages, its blocks' convs and its classifier."""

    classes: tuple[str, ...]
    """Qualified class names (``module.QualName``) that identify the family."""
    stages: tuple[str, ...]
    """Module names of the stages, first to last; each holds the residual blocks in order."""
    block_convs: tuple[str, ...]
    """Glob patterns, relative to a block, of its main-path and shortcut convs (not attention gates)."""
    classifier: str
    """Module name of the classification head."""


_LAYERS = ("layer1", "layer2", "layer3", "layer4")
# convN itself, or the convs inside a composite convN: SelectiveKernel's paths (SK-ResNet) and
# SplitAttn's inner conv (ResNeSt); their attention gates (attn.fc_*, fc1/fc2) are left out.
_BLOCK_CONVS = ("conv[0-9]", "conv[0-9].conv", "conv[0-9].paths.*", "downsample.*")
RESNET_FAMILIES: tuple[ResNetFamily, ...] = (
    ResNetFamily(("torchvision.models.resnet.ResNet",), _LAYERS, _BLOCK_CONVS, "fc"),
    ResNetFamily(("timm.models.resnet.ResNet",), _LAYERS, _BLOCK_CONVS, "fc"),
    ResNetFamily(
        ("timm.models.resnetv2.ResNetV2",), tuple(f"stages.{i}.blocks" for i in range(4)), _BLOCK_CONVS, "head.fc"
    ),
)


def _class_names(model: nn.Module) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(model).__mro__}


def resnet_family(model: nn.Module) -> ResNetFamily | None:
    """The ResNet family ``model`` belongs to, if any."""
    names = _class_names(model)
    return next((f for f in RESNET_FAMILIES if names & set(f.classes)), None)


def _is_diffusers(module: nn.Module, class_name: str) -> bool:
    return type(module).__name__ == class_name and from_diffusers(module)


def _is_unet(model: nn.Module) -> bool:
    return any(_is_diffusers(model, c) for c in ("UNet2DConditionModel", "UNet2DModel"))


def _convs(modules: list[tuple[str, nn.Module]]) -> list[str]:
    return [n for n, m in modules if (layer_kind(m) or "") in ("Conv1d", "Conv2d", "Conv3d")]


def _resnet_blocks(model: nn.Module, arg: int | None) -> list[str]:
    return _resnet_last_blocks(model, arg, every=True)


def _resnet_last_blocks(model: nn.Module, arg: int | None, every: bool = False) -> list[str]:
    family = resnet_family(model)
    if family is None:
        return []
    blocks = [f"{stage}.{child}" for stage in family.stages for child, _ in model.get_submodule(stage).named_children()]
    count = len(list(model.get_submodule(family.stages[-1]).children())) if arg is None else arg
    count = len(blocks) if every else count
    chosen = blocks[-count:] if count else []
    modules = list(iter_modules(model))
    return [
        n
        for n, m in modules
        if layer_kind(m) and any(fnmatch.fnmatchcase(n, f"{b}.{p}") for b in chosen for p in family.block_convs)
    ]


def _last_convs(model: nn.Module, arg: int | None) -> list[str]:
    convs = _convs(list(iter_modules(model)))
    return convs[-arg:] if arg else []


_ATTENTION_CHILDREN = ("to_q", "to_k", "to_v", "to_out.0")
_RESNET_CONVS = ("conv1", "conv2", "conv_shortcut")


def _unet(model: nn.Module, *, ff: bool, convs: bool) -> list[str]:
    if not _is_unet(model):
        return []
    modules = list(iter_modules(model))
    attention = [n for n, m in modules if _is_diffusers(m, "Attention")]
    if not attention:
        return []
    wanted = {f"{a}.{c}" for a in attention for c in _ATTENTION_CHILDREN}
    if ff:
        blocks = [n for n, m in modules if _is_diffusers(m, "FeedForward")]
        wanted |= {n for n, m in modules if layer_kind(m) == "Linear" and any(n.startswith(b + ".") for b in blocks)}
    if convs:
        resnets = [n for n, m in modules if _is_diffusers(m, "ResnetBlock2D")]
        wanted |= {f"{r}.{c}" for r in resnets for c in _RESNET_CONVS}
    return [n for n, m in modules if n in wanted and layer_kind(m)]


def _unet_attention(model: nn.Module, arg: int | None) -> list[str]:
    return _unet(model, ff=False, convs=False)


def _unet_attention_ff(model: nn.Module, arg: int | None) -> list[str]:
    return _unet(model, ff=True, convs=False)


def _unet_locon(model: nn.Module, arg: int | None) -> list[str]:
    return _unet(model, ff=True, convs=True)


_DIT_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_CONTEXT = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context")
_DIT_CLASSES = {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel"}


def _dit_group(name: str) -> str | None:
    """What a Linear of a DiT block is (``attention``, ``ff``, ``modulation``) by its name in the block."""
    parts = name.split(".")
    if parts[0] in ("attn", "attn2"):
        return "attention" if ".".join(parts[1:]) in _DIT_ATTENTION else None
    if parts[0] in ("ff", "ff_context") or name in ("proj_mlp", "proj_out"):
        return "ff"
    if parts[0] in ("norm", "norm1", "norm1_context") and parts[-1] == "linear":
        return "modulation"
    return None


def _dit(model: nn.Module, family: str, groups: tuple[str, ...] = ("attention", "ff"), where: str = "") -> list[str]:
    """The Linears of a diffusion transformer's blocks in ``groups``; ``where`` (``double``,
    ``single``, ``context``) narrows them to one kind of block or stream."""
    if not _is_diffusers(model, _DIT_CLASSES[family]):
        return []
    chosen = []
    for name, module in iter_modules(model):
        stack, _, rest = name.partition(".")
        index, _, layer = rest.partition(".")
        if stack not in ("transformer_blocks", "single_transformer_blocks") or not index.isdecimal():
            continue
        if layer_kind(module) != "Linear" or _dit_group(layer) not in groups:
            continue
        single = stack == "single_transformer_blocks"
        context = any(part in _CONTEXT for part in layer.split(".")) or layer.startswith("norm1_context")
        if {"double": not single, "single": single, "context": context}.get(where, True):
            chosen.append(name)
    return chosen


Expand = Callable[[nn.Module, "int | None"], list[str]]

PRESETS: dict[str, tuple[Expand, bool]] = {
    "resnet-last-blocks": (_resnet_last_blocks, False),
    "resnet-blocks": (_resnet_blocks, False),
    "last-convs": (_last_convs, True),
    "unet-attention": (_unet_attention, False),
    "unet-attention-ff": (_unet_attention_ff, False),
    "unet-locon": (_unet_locon, False),
    "flux-attention": (lambda m, n: _dit(m, "flux", ("attention",)), False),
    "flux-all": (lambda m, n: _dit(m, "flux"), False),
    "flux-double": (lambda m, n: _dit(m, "flux", where="double"), False),
    "flux-single": (lambda m, n: _dit(m, "flux", where="single"), False),
    "flux-context": (lambda m, n: _dit(m, "flux", where="context"), False),
    "flux-modulation": (lambda m, n: _dit(m, "flux", ("modulation",)), False),
    "sd3-attention": (lambda m, n: _dit(m, "sd3", ("attention",)), False),
    "sd3-all": (lambda m, n: _dit(m, "sd3"), False),
    "sd3-context": (lambda m, n: _dit(m, "sd3", where="context"), False),
}
"""Preset name -> (expansion, whether it needs the ``:n`` argument)."""

COUNTED = frozenset({"resnet-last-blocks", "last-convs"})
"""The presets that take a ``:n`` count (the others select a fixed set)."""


def fitting_presets(model: nn.Module) -> list[str]:
    """Names of the presets that select at least one layer of ``model``."""
    return [name for name, (expand, needs_n) in PRESETS.items() if expand(model, 1 if needs_n else None)]


def expand_preset(model: nn.Module, target: str) -> list[str]:
    """The exact module names a ``preset:<name>[:<n>]`` target selects in ``model``, in model order.

    Raises:
        TargetError: for an unknown preset, a bad ``n``, or a preset that selects nothing in this
            model (naming the model class and the presets that fit it).

    Example:
        >>> expand_preset(torchvision.models.resnet18(), "preset:resnet-last-blocks:1")
        ['layer4.1.conv1', 'layer4.1.conv2']
    """
    _, _, spec = target.partition(":")
    name, _, raw = spec.partition(":")
    if name not in PRESETS:
        raise TargetError(f"{target!r}: unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    expand, needs_n = PRESETS[name]
    if raw and not (raw.isdecimal() and int(raw) >= 1):
        raise TargetError(f"{target!r}: the count after the preset name must be an integer >= 1, got {raw!r}")
    if needs_n and not raw:
        raise TargetError(f"{target!r}: {name} needs a count, e.g. 'preset:{name}:4'")
    if raw and name not in COUNTED:
        raise TargetError(f"{target!r}: {name} takes no count; write 'preset:{name}'")
    names = expand(model, int(raw) if raw else None)
    if not names:
        fits = fitting_presets(model)
        raise TargetError(
            f"{target!r} does not fit {type(model).__name__}; presets that fit it: {', '.join(fits) or 'none'}"
        )
    return names


def presets_in_patterns(model: nn.Module, cfg: LoraConfig) -> LoraConfig:
    """``cfg`` with ``preset:<name>`` keys of ``rank_pattern`` / ``alpha_pattern`` / ``family_pattern`` spelled
    out as the exact names the preset selects in ``model`` (one regex per key, the keys' order kept).

    Raises:
        TargetError: as :func:`expand_preset`, for a preset key that does not fit ``model``.
    """

    def spelled(patterns: dict[str, Any]) -> dict[str, Any]:
        return {
            ("re:" + "|".join(map(re.escape, expand_preset(model, k))) if k.startswith("preset:") else k): v
            for k, v in patterns.items()
        }

    if not any(k.startswith("preset:") for k in (*cfg.rank_pattern, *cfg.alpha_pattern, *cfg.family_pattern)):
        return cfg
    return dataclasses.replace(
        cfg,
        rank_pattern=spelled(cfg.rank_pattern),
        alpha_pattern=spelled(cfg.alpha_pattern),
        family_pattern=spelled(cfg.family_pattern),
    )
