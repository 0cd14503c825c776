"""Shared helpers: textbook reference formulas and tiny models. Nothing here calls visionlora."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

GPU_TESTS_DEVICE = (
    "cuda" if torch.cuda.is_available() else "cpu" if os.environ.get("VISIONLORA_GPU_TESTS") == "cpu" else None
)
"""Where the tests marked ``gpu`` run: CUDA when present; the CPU when ``VISIONLORA_GPU_TESTS=cpu``
(``scripts/gpu_check.sh --smoke``); else nowhere (skipped)."""
needs_gpu = pytest.mark.skipif(
    GPU_TESTS_DEVICE is None, reason="needs CUDA (scripts/gpu_check.sh --smoke runs it on the CPU)"
)


def reference_conv_delta(a: Tensor, b: Tensor, scale: float, groups: int) -> Tensor:
    """ΔW written out group by group: block j = scale · B_j @ A_j, reshaped to the kernel.

    A_j is A's rows j·r .. (j+1)·r (per-group layout), or all of A when A has r rows (shared layout).
    """
    rank = b.shape[1]
    out_per_group = b.shape[0] // groups
    shared = a.shape[0] == rank
    blocks = []
    for j in range(groups):
        a_j = (a if shared else a[j * rank : (j + 1) * rank]).reshape(rank, -1)
        b_j = b[j * out_per_group : (j + 1) * out_per_group].reshape(out_per_group, rank)
        blocks.append((scale * (b_j @ a_j)).reshape(out_per_group, *a.shape[1:]))
    return torch.cat(blocks, dim=0)


def reference_conv(conv: nn.Module, x: Tensor, weight: Tensor, with_bias: bool = True) -> Tensor:
    """The base conv's geometry applied with another weight, written with F.pad + F.convNd."""
    fn = _CONV_FN[weight.dim() - 2]
    bias = conv.bias if with_bias else None
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        return fn(x, weight, bias, conv.stride, 0, conv.dilation, conv.groups)
    return fn(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def assert_rel_close(actual: Tensor, expected: Tensor, tol: float = 1e-5, magnitude: float = 0.0) -> None:
    """max|actual - expected| <= tol · max(max|expected|, magnitude).

    ``magnitude`` is the size of the terms summed into the output (Σ|w|·|x|), the scale float
    rounding is relative to; it matters where those terms cancel to a tiny output.
    """
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), magnitude, 1e-12)
    assert err <= tol * scale, f"relative error {err / scale:.3e} > {tol:.0e}"


def conv_magnitude(conv: nn.Module, x: Tensor, weight_magnitude: Tensor) -> float:
    """max over outputs of Σ|w|·|x| (plus |bias|) for the base conv's geometry."""
    terms = reference_conv(conv, x.abs(), weight_magnitude.abs(), with_bias=False).max().item()
    return terms + (0.0 if conv.bias is None else conv.bias.abs().max().item())


def randomize_lora(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every LoRA A and B (and LoHa's and LoKr's factors) random non-zero values, as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(part in name for part in (".lora_A", ".lora_B", ".hada_", ".lokr_")):
                p.copy_(torch.randn(p.shape, generator=g) * std)


class TinyNet(nn.Module):
    """Conv stem, grouped and depthwise convs, BatchNorm, a Linear head."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, padding_mode="reflect"),
            nn.ReLU(),
            nn.Conv2d(8, 32, 3, padding="same", groups=8, padding_mode="circular"),  # depthwise, multiplier 4
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block(torch.relu(self.bn(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def tiny_net(seed: int = 0, num_classes: int = 5) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(num_classes).eval()


def tiny_unet(**overrides):
    """A small SD-like UNet2DConditionModel (attention at 16×16 and 8×8); keyword arguments override its config."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    config = {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 24,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }
    return diffusers.UNet2DConditionModel(**(config | overrides)).eval()


def unet_input(batch: int = 2, seed: int = 1) -> dict[str, Tensor]:
    """Keyword arguments for a forward pass of :func:`tiny_unet`."""
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, 16, 16, generator=g),
        "timestep": torch.tensor([10] * batch),
        "encoder_hidden_states": torch.randn(batch, 7, 24, generator=g),
    }


def unet_from(state: dict[str, Tensor]) -> nn.Module:
    """A :func:`tiny_unet` holding ``state``."""
    unet = tiny_unet()
    unet.load_state_dict(state)
    return unet


def unet_output(unet: nn.Module) -> Tensor:
    """``unet``'s output on :func:`unet_input`, without gradients."""
    with torch.no_grad():
        return unet(**unet_input()).sample


def _tiny_tokenizer(folder: Path):
    """A CLIP tokenizer over a made-up vocabulary (letters), saved beside ``folder``."""
    transformers = pytest.importorskip("transformers")
    tok_dir = folder.parent / f"{folder.name}-vocab"
    tok_dir.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=8)


def _tiny_text_config(hidden: int, projection: int, vocab: int, layers: int = 2):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=8,
        projection_dim=projection,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _tiny_vae(**overrides):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        **overrides,
    )


def tiny_pipeline(folder: Path, unet: nn.Module) -> Path:
    """Save a small StableDiffusionPipeline around ``unet`` to ``folder`` (tokenizer vocabulary made up here)."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    tokenizer = _tiny_tokenizer(folder)
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=transformers.CLIPTextModel(_tiny_text_config(24, 24, len(tokenizer), layers=1)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder))
    return folder


def tiny_sdxl_unet(**overrides):
    """A small SDXL-like UNet: no attention at the top level, 2 transformer layers below it, text_time
    micro-conditioning; cross-attention 40 wide (16 + 24 from the two tiny text encoders), pooled 20."""
    sdxl = {
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2),
        "cross_attention_dim": 40,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 20 + 6 * 8,
        "use_linear_projection": True,
    }
    return tiny_unet(**(sdxl | overrides))


def sdxl_input(batch: int = 2, seed: int = 1) -> dict[str, Any]:
    """Keyword arguments for a forward pass of :func:`tiny_sdxl_unet`."""
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, 16, 16, generator=g),
        "timestep": torch.tensor([10] * batch),
        "encoder_hidden_states": torch.randn(batch, 8, 40, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 20, generator=g),
            "time_ids": torch.tensor([[24.0, 32, 0, 4, 16, 16]] * batch),
        },
    }


def tiny_sdxl_pipeline(folder: Path, unet: nn.Module | None = None) -> Path:
    """Save a small StableDiffusionXLPipeline to ``folder``: two tiny CLIP text encoders (16 wide, and
    24 wide with a 20-wide projection), their made-up tokenizers, a tiny VAE and ``unet``."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    tokenizer = _tiny_tokenizer(folder)
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=transformers.CLIPTextModel(_tiny_text_config(16, 16, len(tokenizer))),
        text_encoder_2=transformers.CLIPTextModelWithProjection(_tiny_text_config(24, 20, len(tokenizer))),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet if unet is not None else tiny_sdxl_unet(),
        scheduler=diffusers.EulerDiscreteScheduler(steps_offset=1),
    )
    pipe.save_pretrained(str(folder))
    return folder


def tiny_flux_transformer(**overrides):
    """A small FluxTransformer2DModel: 1 double- and 1 single-stream block, 16 wide, T5 width 16,
    pooled CLIP width 24, guidance-distilled (as FLUX.1-dev), 2x2-packed latents of 4 channels."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    config = {
        "patch_size": 1,
        "in_channels": 16,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 16,
        "pooled_projection_dim": 24,
        "guidance_embeds": True,
        "axes_dims_rope": [2, 2, 4],
    }
    return diffusers.FluxTransformer2DModel(**(config | overrides))


def tiny_sd3_transformer(**overrides):
    """A small SD3Transformer2DModel (MMDiT): 2 joint blocks, the first with SD3.5's second attention,
    RMS q/k norms, 16 wide, text width 16, pooled width 16, 4 latent channels."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    config = {
        "sample_size": 16,
        "patch_size": 1,
        "in_channels": 4,
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 16,
        "caption_projection_dim": 16,
        "pooled_projection_dim": 16,
        "out_channels": 4,
        "qk_norm": "rms_norm",
        "dual_attention_layers": (0,),
    }
    return diffusers.SD3Transformer2DModel(**(config | overrides))


def _tiny_t5(vocab: int):
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=1, eos_token_id=1
    )
    return transformers.T5EncoderModel(config)


def _tiny_flow_vae():
    """The tiny VAE as Flux's and SD3's are configured: a latent shift and scale, no quant convs."""
    return _tiny_vae(shift_factor=0.1, scaling_factor=0.5, use_quant_conv=False, use_post_quant_conv=False)


def tiny_flux_pipeline(folder: Path, transformer: nn.Module | None = None) -> Path:
    """Save a small FluxPipeline to ``folder``: a tiny CLIP (24 wide, pooled), a tiny T5 (16 wide),
    made-up tokenizers, a tiny VAE (scale factor 1) and ``transformer``."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    tokenizer = _tiny_tokenizer(folder)
    transformer = transformer if transformer is not None else tiny_flux_transformer()
    torch.manual_seed(0)
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's: shifted by token count
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
        ),
        vae=_tiny_flow_vae(),
        text_encoder=transformers.CLIPTextModel(_tiny_text_config(24, 24, len(tokenizer), layers=1)),
        tokenizer=tokenizer,
        text_encoder_2=_tiny_t5(len(tokenizer)),
        tokenizer_2=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(str(folder))
    return folder


def tiny_sd3_pipeline(folder: Path, transformer: nn.Module | None = None) -> Path:
    """Save a small StableDiffusion3Pipeline to ``folder``: two tiny CLIPs with projections (8 wide
    each), a tiny T5 (16 wide), made-up tokenizers, a tiny VAE and ``transformer``."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    tokenizer = _tiny_tokenizer(folder)
    transformer = transformer if transformer is not None else tiny_sd3_transformer()
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusion3Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_flow_vae(),
        text_encoder=transformers.CLIPTextModelWithProjection(_tiny_text_config(8, 8, len(tokenizer), layers=1)),
        tokenizer=tokenizer,
        text_encoder_2=transformers.CLIPTextModelWithProjection(_tiny_text_config(8, 8, len(tokenizer), layers=1)),
        tokenizer_2=tokenizer,
        text_encoder_3=_tiny_t5(len(tokenizer)),
        tokenizer_3=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(str(folder))
    return folder


def transformer_output(model: nn.Module, seed: int = 1) -> Tensor:
    """A Flux or SD3 transformer's output on fixed random inputs, without gradients."""
    from visionlora.models.loading import example_input_for

    torch.manual_seed(seed)
    inputs = example_input_for(model, 8)
    with torch.no_grad():
        return model(**inputs).sample


@pytest.fixture
def net() -> TinyNet:
    return tiny_net()


@pytest.fixture
def one_bnb_cpu_kernel(monkeypatch):
    """bitsandbytes repacks 4-bit weights for another kernel in eval mode on CPUs with AVX512-BF16; keep
    every machine on the same kernel (tests/test_bnb.py tests the repacked layout on its own)."""
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False, raising=False)
