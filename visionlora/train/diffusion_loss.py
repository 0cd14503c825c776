"""The diffusion loss: noise, the prediction target, min-SNR weights, and the held-out validation loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from visionlora.errors import ConfigError

__all__ = ["draw_noise", "held_out_loss", "min_snr_weights", "noise_target"]


def min_snr_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, v_prediction: bool
) -> torch.Tensor:
    """Per-sample loss weights min(SNR, gamma) / SNR (epsilon) or min(SNR, gamma) / (SNR + 1) (v-prediction)."""
    alpha = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha / (1 - alpha)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if v_prediction else clipped / snr


def noise_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon), or v = sqrt(a)·noise - sqrt(1 - a)·latents."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ConfigError(f"scheduler prediction_type {kind!r}: the style recipe trains 'epsilon' or 'v_prediction'")


def draw_noise(shape: tuple[int, ...], part: slice, offset: float, device: Any = None) -> torch.Tensor:
    """Gaussian noise for a global batch of ``shape`` (rows ``part`` of it), plus ``offset`` times one
    Gaussian per (image, channel) when ``offset`` is not 0 (noise offset)."""
    noise = torch.randn(shape, device=device)[part]
    if offset:
        noise = noise + offset * torch.randn(shape[0], shape[1], 1, 1, device=device)[part]
    return noise


@torch.no_grad()
def held_out_loss(
    predict: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    latents: Sequence[tuple[torch.Tensor, torch.Tensor]],
    denoising: Any,
    levels: int,
    seed: int,
    device: Any = None,
) -> float:
    """The mean loss over held-out images at ``levels`` evenly spaced noise levels (timesteps, or
    flow-matching σ), with latents and noise drawn from ``seed`` alone (the same at every call).

    ``latents`` holds each image's latent distribution (mean, std); ``denoising`` is the run's
    :class:`~visionlora.train.denoising.Denoising`; ``predict(noisy, level, image)`` runs the model
    on image ``image``'s conditioning, repeated for each level.
    """
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for image, (mean, std) in enumerate(latents):
        sample = denoising.scale(mean + std * torch.randn(mean.shape, generator=generator))
        noise = torch.randn((levels, *mean.shape), generator=generator).to(device)
        level = denoising.grid(levels, mean.shape[-2] * mean.shape[-1] // 4, device)
        noisy, target, weights = denoising.noised(sample.to(device).expand_as(noise), noise, level)
        prediction = predict(noisy, level, image)
        mse = ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))
        losses.append(float((mse * weights).mean()))
    return sum(losses) / len(losses)
