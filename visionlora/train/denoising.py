"""What a denoiser learns: noise prediction for Stable Diffusion UNets, flow matching for Flux.1 and
SD3 transformers, with the inputs each model family takes.

- :class:`NoisePrediction` (SD 1.x/2.x, SDXL): DDPM noising at a uniform integer timestep, the
  noise (or v) as target, optional min-SNR weights.
- :class:`FlowMatching` (Flux.1, SD3/3.5): rectified flow, x_t = (1 - σ)·x_0 + σ·ε with the
  velocity ε - x_0 as target; σ drawn logit-normal (or uniform) and shifted as the model's
  scheduler shifts it (Flux.1-dev: by the image's token count, as at inference). Flux's latents
  are packed into 2x2 patches with their position ids, and a guidance-distilled Flux gets its
  guidance embedding.

Random numbers are drawn for the whole global batch and each process takes its rows, so N
processes train on what one would.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from visionlora._deps import require
from visionlora.errors import ConfigError
from visionlora.train.conditioning import Conditioner, Text
from visionlora.train.diffusion_loss import min_snr_weights, noise_target

__all__ = ["Denoising", "FlowMatching", "NoisePrediction", "pack_latents", "unpack_latents"]


class Denoising:
    """How a model family is noised, what it predicts and how it is called (see the module docstring)."""

    def scale(self, sample: torch.Tensor) -> torch.Tensor:
        """VAE latents as the denoiser sees them."""
        raise NotImplementedError

    def draw(self, rows: int, part: slice, tokens: int, device: Any) -> torch.Tensor:
        """The noise levels of a global batch of ``rows`` (this process's ``part``) of ``tokens`` latent patches."""
        raise NotImplementedError

    def grid(self, count: int, tokens: int, device: Any) -> torch.Tensor:
        """``count`` evenly spaced noise levels (the held-out loss's)."""
        raise NotImplementedError

    def noised(
        self, clean: torch.Tensor, noise: torch.Tensor, level: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy input, target, per-sample loss weights) at noise levels ``level``."""
        raise NotImplementedError

    def predict(
        self, model: Any, noisy: torch.Tensor, level: torch.Tensor, text: Text, time_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """The model's prediction, shaped as the target."""
        raise NotImplementedError


class NoisePrediction(Denoising):
    """DDPM noise (or v) prediction with optional min-SNR weighting, for SD 1.x/2.x and SDXL UNets."""

    def __init__(self, pipe: Any, cond: Conditioner, gamma: float | None) -> None:
        self.scheduler = require("diffusers").DDPMScheduler.from_config(pipe.scheduler.config)
        self.v_prediction = self.scheduler.config.prediction_type == "v_prediction"
        self.scaling = float(getattr(pipe.vae.config, "scaling_factor", 1.0))
        self.cond, self.gamma = cond, gamma

    def scale(self, sample: torch.Tensor) -> torch.Tensor:
        return sample * self.scaling

    def draw(self, rows: int, part: slice, tokens: int, device: Any) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (rows,), device=device)[part]

    def grid(self, count: int, tokens: int, device: Any) -> torch.Tensor:
        total = self.scheduler.config.num_train_timesteps
        return torch.tensor([int((i + 0.5) * total / count) for i in range(count)], device=device)

    def noised(
        self, clean: torch.Tensor, noise: torch.Tensor, level: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        target = noise_target(self.scheduler, clean, noise, level)
        weights = torch.ones(len(level), device=level.device)
        if self.gamma is not None:
            weights = min_snr_weights(self.scheduler.alphas_cumprod, level, self.gamma, self.v_prediction)
        return self.scheduler.add_noise(clean, noise, level), target, weights

    def predict(
        self, model: Any, noisy: torch.Tensor, level: torch.Tensor, text: Text, time_ids: torch.Tensor | None
    ) -> torch.Tensor:
        return model(noisy, level, **self.cond.unet_kwargs(text, time_ids)).sample


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Flux's packing: (N, C, H, W) -> (N, H/2 · W/2, 4C), 2x2 patches in row-major order."""
    n, c, h, w = latents.shape
    patches = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of ``height`` x ``width``."""
    n, _, channels = packed.shape
    patches = packed.view(n, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(n, channels // 4, height, width)


def _image_ids(height: int, width: int, device: Any) -> torch.Tensor:
    """Flux's position ids of the packed patches: (0, row, column) per patch."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] += torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] += torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


class FlowMatching(Denoising):
    """Rectified-flow training of a Flux.1 or SD3/3.5 transformer (see the module docstring)."""

    def __init__(self, pipe: Any, cond: Conditioner, train: Any) -> None:
        self.flux = cond.kind == "flux"
        config = pipe.scheduler.config
        self.scheduler_config = config
        self.sampling, self.mean, self.std = train.timestep_sampling, train.logit_mean, train.logit_std
        self.fixed_shift = train.flow_shift
        self.scaling = float(getattr(pipe.vae.config, "scaling_factor", 1.0))
        self.offset = float(getattr(pipe.vae.config, "shift_factor", None) or 0.0)
        self.guidance = train.flux_guidance if self.flux and pipe.transformer.config.guidance_embeds else None

    def shift(self, tokens: int) -> float:
        """The σ shift: the recipe's, else the scheduler's (for dynamic shifting: exp(μ) at ``tokens``
        latent patches, the line from (base_image_seq_len, base_shift) to (max_image_seq_len, max_shift))."""
        if self.fixed_shift is not None:
            return float(self.fixed_shift)
        config = self.scheduler_config
        if not config.get("use_dynamic_shifting", False):
            return float(config.get("shift", 1.0))
        low, high = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        mu = base + (top - base) * (tokens - low) / (high - low)
        return math.exp(mu)

    def _shifted(self, sigma: torch.Tensor, tokens: int) -> torch.Tensor:
        s = self.shift(tokens)
        return s * sigma / (1 + (s - 1) * sigma)

    def scale(self, sample: torch.Tensor) -> torch.Tensor:
        return (sample - self.offset) * self.scaling

    def draw(self, rows: int, part: slice, tokens: int, device: Any) -> torch.Tensor:
        if self.sampling == "logit_normal":
            sigma = torch.sigmoid(self.mean + self.std * torch.randn(rows, device=device))
        else:
            sigma = torch.rand(rows, device=device)
        return self._shifted(sigma, tokens)[part]

    def grid(self, count: int, tokens: int, device: Any) -> torch.Tensor:
        return self._shifted(torch.tensor([(i + 0.5) / count for i in range(count)], device=device), tokens)

    def noised(
        self, clean: torch.Tensor, noise: torch.Tensor, level: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sigma = level.view(-1, *([1] * (clean.ndim - 1))).to(clean.dtype)
        return (1 - sigma) * clean + sigma * noise, noise - clean, torch.ones(len(level), device=level.device)

    def predict(
        self, model: Any, noisy: torch.Tensor, level: torch.Tensor, text: Text, time_ids: torch.Tensor | None
    ) -> torch.Tensor:
        if not self.flux:  # SD3 takes timesteps on the scheduler's 0..1000 scale
            kwargs = {"encoder_hidden_states": text.hidden, "pooled_projections": text.pooled}
            return model(hidden_states=noisy, timestep=level * 1000, **kwargs).sample
        height, width = noisy.shape[-2:]
        device = noisy.device
        guidance = None if self.guidance is None else torch.full((len(level),), self.guidance, device=device)
        out = model(
            hidden_states=pack_latents(noisy),
            timestep=level,  # Flux takes σ itself (its pipeline passes timestep / 1000)
            guidance=guidance,
            pooled_projections=text.pooled,
            encoder_hidden_states=text.hidden,
            txt_ids=torch.zeros(text.hidden.shape[1], 3, device=device),
            img_ids=_image_ids(height, width, device),
        ).sample
        return unpack_latents(out, height, width)


def denoising_for(pipe: Any, cond: Conditioner, train: Any) -> Denoising:
    """The denoising of ``pipe``'s family, refusing recipe options that belong to the other one."""
    if cond.kind in ("flux", "sd3"):  # no SNR weighting: min_snr_gamma is documented as the UNets' only
        return FlowMatching(pipe, cond, train)
    if train.timestep_sampling != "logit_normal" or train.flow_shift is not None:
        raise ConfigError(
            "train.timestep_sampling / train.flow_shift: flow-matching options for Flux and SD3; this is a "
            f"{cond.kind} UNet (uniform DDPM timesteps): remove them"
        )
    return NoisePrediction(pipe, cond, train.min_snr_gamma)
