"""Stable Diffusion 1.x and SDXL pipelines as one original-layout (LDM / SGM) checkpoint, the file
A1111 and ComfyUI load.

Keys: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE), and the text encoders:
``cond_stage_model.transformer.text_model.*`` (SD 1.x's CLIP), or for SDXL
``conditioner.embedders.0.transformer.text_model.*`` (CLIP ViT-L) and
``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG: q/k/v fused into ``in_proj``, the text
projection transposed). The renames invert diffusers' own single-file converters, and every export
is checked by running those converters on it: each part must come back tensor for tensor, or
nothing is written.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from visionlora._deps import require
from visionlora.errors import ConfigError

__all__ = ["ldm_state_dict", "sdxl_state_dict", "unet_ldm_names", "unet_to_ldm"]

_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
_VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _single_file() -> Any:
    """diffusers' single-file conversion module, whose tables and converters these functions invert."""
    return require("diffusers.loaders.single_file_utils")


def _renamed(rest: str, pairs: list[tuple[str, str]]) -> str:
    head, _, leaf = rest.rpartition(".")
    for new, old in pairs:
        if head == new:
            head = old
    return f"{head}.{leaf}"


def unet_ldm_names(keys: list[str], layers_per_block: int) -> dict[str, str]:
    """Each key of a diffusers UNet2DConditionModel state dict -> its original-layout (LDM/SGM) name.

    Raises:
        KeyError: a key with no original-layout name (another model), named.
    """
    maps = _single_file().DIFFUSERS_TO_LDM_MAPPING["unet"]
    top: dict[str, str] = {**maps["layers"], **maps["addition_embed_type"]}  # type: ignore[dict-item]
    per = layers_per_block + 1
    with_attention = {int(k.split(".")[1]) for k in keys if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    out = {}
    for key in keys:
        if key in top:
            out[key] = top[key]
        elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            down, kind, rest = m[1] == "down", m[3], m[5]
            block = int(m[2]) * per + int(m[4]) + (1 if down else 0)  # input_blocks.0 is the stem conv
            position = f"{block}.0.{_renamed(rest, _RESNET)}" if kind == "resnets" else f"{block}.1.{rest}"
            out[key] = f"{'input' if down else 'output'}_blocks.{position}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            out[key] = f"input_blocks.{1 + int(m[1]) * per + per - 1}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            out[key] = f"middle_block.{2 * int(m[1])}.{_renamed(m[2], _RESNET)}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            out[key] = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            b = int(m[1])
            out[key] = f"output_blocks.{b * per + per - 1}.{2 if b in with_attention else 1}.conv.{m[2]}"
        else:
            raise KeyError(f"no original-layout name for UNet key {key!r}")
    return out


def unet_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict in the original layout (without its prefix)."""
    names = unet_ldm_names(list(state), config["layers_per_block"])
    return {names[k]: v for k, v in state.items()}


def vae_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the original layout (without its prefix)."""
    top: dict[str, str] = _single_file().DIFFUSERS_TO_LDM_MAPPING["vae"]  # type: ignore[assignment]
    ups = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            out[f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"] = value
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            out[f"encoder.down.{m[1]}.downsample.conv.{m[2]}"] = value
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            rest = m[3].replace("conv_shortcut", "nin_shortcut")
            out[f"decoder.up.{ups - 1 - int(m[1])}.block.{m[2]}.{rest}"] = value
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            out[f"decoder.up.{ups - 1 - int(m[1])}.upsample.conv.{m[2]}"] = value
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            out[f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"] = value
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            conv = value[..., None, None] if value.dim() == 2 else value  # original: 1x1 convs
            out[f"{m[1]}.mid.attn_1.{_renamed(m[2], _VAE_ATTENTION)}"] = conv
        else:
            raise KeyError(f"no original-layout name for VAE key {key!r}")
    return out


def open_clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModelWithProjection`` state dict in OpenCLIP's layout (without its prefix)."""
    state = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in state.items()}
    maps = _single_file().DIFFUSERS_TO_LDM_MAPPING["openclip"]
    out = {}
    for key, value in state.items():
        if key in maps["layers"]:
            out[maps["layers"][key]] = value.T if key == "text_projection.weight" else value
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key)
        if m is None:
            raise KeyError(f"no OpenCLIP name for text encoder key {key!r}")
        block, rest = f"transformer.resblocks.{m[1]}", m[2]
        if q := re.fullmatch(r"self_attn\.q_proj\.(weight|bias)", rest):
            prefix = f"text_model.encoder.layers.{m[1]}.self_attn"
            fused = [state[f"{prefix}.{x}_proj.{q[1]}"] for x in "qkv"]
            out[f"{block}.attn.in_proj_{q[1]}"] = torch.cat(fused)
        elif not re.fullmatch(r"self_attn\.[kv]_proj\.(weight|bias)", rest):
            for new, old in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("fc1", "c_fc"), ("fc2", "c_proj")):
                rest = rest.replace(new, old)
            out[f"{block}.{rest.replace('self_attn.', 'attn.')}"] = value
    return out


def _clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's state dict under ``prefix`` (transformers 5 drops its ``text_model.`` level)."""
    return {f"{prefix}{k if k.startswith('text_model.') else 'text_model.' + k}": v for k, v in state.items()}


def _same(part: str, mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """Refuse an export that diffusers' converter would not read back as ``mine``."""
    mine = {k.removeprefix("text_model."): v for k, v in mine.items()}
    theirs = {k.removeprefix("text_model."): v for k, v in theirs.items()}
    if mine.keys() != theirs.keys() or not all(torch.equal(mine[k], theirs[k]) for k in mine):
        differ = sorted(mine.keys() ^ theirs.keys())[:5] or [k for k in mine if not torch.equal(mine[k], theirs[k])][:5]
        raise ConfigError(
            f"single-file export: diffusers' converter does not read the {part} back unchanged ({differ}); "
            "write the merged pipeline folder instead"
        )


def _unet_and_vae(
    unet: dict[str, torch.Tensor], vae: dict[str, torch.Tensor], unet_config: Any, vae_config: Any, kind: str
) -> dict[str, torch.Tensor]:
    """UNet and VAE in the original layout, checked by diffusers' converters reading them back."""
    convert = _single_file()
    try:
        out = {f"model.diffusion_model.{k}": v for k, v in unet_to_ldm(unet, unet_config).items()}
        out |= {f"first_stage_model.{k}": v for k, v in vae_to_ldm(vae, vae_config).items()}
    except KeyError as exc:
        raise ConfigError(f"single-file export: {exc.args[0]} (not {kind} layout)") from None
    _same("UNet", unet, convert.convert_ldm_unet_checkpoint(out, unet_config))
    _same("VAE", vae, convert.convert_ldm_vae_checkpoint(out, vae_config))
    return out


def sdxl_state_dict(
    unet: dict[str, torch.Tensor],
    vae: dict[str, torch.Tensor],
    text_encoder: dict[str, torch.Tensor],
    text_encoder_2: dict[str, torch.Tensor],
    unet_config: Any,
    vae_config: Any,
) -> dict[str, torch.Tensor]:
    """Diffusers-layout SDXL parts as one original (SGM) layout state dict, checked by diffusers' converters.

    Raises:
        ConfigError: a layout that diffusers' own single-file converters would not read back
            tensor for tensor.
    """
    convert = _single_file()
    try:
        second = open_clip_to_ldm(text_encoder_2)
    except KeyError as exc:
        raise ConfigError(f"single-file export: {exc.args[0]} (not an SDXL layout)") from None
    out = _unet_and_vae(unet, vae, unet_config, vae_config, "an SDXL")
    out |= _clip_to_ldm(text_encoder, "conditioner.embedders.0.transformer.")
    out |= {f"conditioner.embedders.1.model.{k}": v for k, v in second.items()}
    _same(
        "text encoder", text_encoder, convert.convert_ldm_clip_checkpoint(out, "conditioner.embedders.0.transformer.")
    )
    # The converter needs the model only where the file lacks the text projection, which this one has.
    theirs = convert.convert_open_clip_checkpoint(None, out, prefix="conditioner.embedders.1.model.")
    _same("second text encoder", text_encoder_2, theirs)
    return out


def ldm_state_dict(
    unet: dict[str, torch.Tensor],
    vae: dict[str, torch.Tensor],
    text_encoder: dict[str, torch.Tensor],
    unet_config: Any,
    vae_config: Any,
) -> dict[str, torch.Tensor]:
    """Diffusers-layout UNet, VAE and CLIP text-encoder state dicts as one original-layout state dict.

    Raises:
        ConfigError: an SD 2.x pipeline (OpenCLIP text encoder, another layout), or a layout that
            diffusers' own single-file converters would not read back tensor for tensor.
    """
    if unet_config["cross_attention_dim"] == 1024:
        raise ConfigError(
            "single-file export writes Stable Diffusion 1.x checkpoints; this UNet has SD 2.x's 1024-wide "
            "cross-attention (an OpenCLIP text encoder): write the merged pipeline folder instead"
        )
    out = _unet_and_vae(unet, vae, unet_config, vae_config, "a Stable Diffusion 1.x")
    return out | _clip_to_ldm(text_encoder, "cond_stage_model.transformer.")
