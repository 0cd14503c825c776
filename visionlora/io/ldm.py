"""Write a diffusers StableDiffusionPipeline as one original-layout (LDM) ``.safetensors`` checkpoint.

Tests use it to make the single-file checkpoints that users download (SD 1.x layout: ``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*``) from tiny pipelines built here. The
renames invert diffusers' own single-file converters, and :func:`to_ldm` checks itself by running
those converters on its output.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
_VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _renamed(rest: str, pairs: list[tuple[str, str]]) -> str:
    head, _, leaf = rest.rpartition(".")
    for new, old in pairs:
        if head == new:
            head = old
    return f"{head}.{leaf}"


def unet_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict in the original layout (without its prefix)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    per = config["layers_per_block"] + 1
    with_attention = {int(k.split(".")[1]) for k in state if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
            block = 1 + b * per + i
            new = f"input_blocks.{block}.0.{_renamed(rest, _RESNET)}" if kind == "resnets" else None
            out[new or f"input_blocks.{block}.1.{rest}"] = value
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            out[f"input_blocks.{1 + int(m[1]) * per + per - 1}.0.op.{m[2]}"] = value
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            out[f"middle_block.{2 * int(m[1])}.{_renamed(m[2], _RESNET)}"] = value
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            out[f"middle_block.1.{m[1]}"] = value
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
            block = b * per + i
            new = f"output_blocks.{block}.0.{_renamed(rest, _RESNET)}" if kind == "resnets" else None
            out[new or f"output_blocks.{block}.1.{rest}"] = value
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            b = int(m[1])
            out[f"output_blocks.{b * per + per - 1}.{2 if b in with_attention else 1}.conv.{m[2]}"] = value
        else:
            raise KeyError(f"no original-layout name for UNet key {key}")
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the original layout (without its prefix)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
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
            raise KeyError(f"no original-layout name for VAE key {key}")
    return out


def to_ldm(pipe: Any) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and CLIP text encoder as one original-layout state dict.

    Raises AssertionError if diffusers' own converters do not give the pipeline's weights back.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet, vae = pipe.unet.state_dict(), pipe.vae.state_dict()
    out = {f"model.diffusion_model.{k}": v for k, v in unet_to_ldm(unet, pipe.unet.config).items()}
    out |= {f"first_stage_model.{k}": v for k, v in vae_to_ldm(vae, pipe.vae.config).items()}
    for k, v in pipe.text_encoder.state_dict().items():  # transformers 5 drops the text_model. prefix
        out[f"cond_stage_model.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}"] = v
    converted = (convert_ldm_unet_checkpoint(out, pipe.unet.config), convert_ldm_vae_checkpoint(out, pipe.vae.config))
    for mine, theirs in zip((unet, vae), converted, strict=True):
        assert mine.keys() == theirs.keys(), sorted(mine.keys() ^ theirs.keys())[:5]
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    return out


def save_single_file(pipe: Any, path: Path) -> Path:
    """Write :func:`to_ldm` of ``pipe`` to ``path``."""
    save_file({k: v.contiguous() for k, v in to_ldm(pipe).items()}, str(path))
    return path
