"""``visionlora quickstart diffusion``: style a small diffusion model with LoRA, on images that ship with scikit-learn.

1. A small pixel-space UNet (diffusers ``UNet2DModel``, built locally) learns 16x16 patches of
   ``china.jpg`` (scikit-learn's ``load_sample_images``): the "pretrained" base.
2. LoRA on its convs and attention learns patches of ``flower.jpg``, a visibly different palette.
3. Base and styled samples from the same seeds go one above the other in ``samples.png``; the
   style's pull is measured as the share of samples whose nearest patch by colour statistics
   (per-channel mean and std) is a flower patch rather than a china one, before and after.

A few minutes on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionlora._deps import require
from visionlora.config import LoraConfig
from visionlora.inject import apply_lora
from visionlora.io import export_adapter, export_merged, save_adapter

__all__ = ["patches", "run_quickstart_diffusion", "style_share"]

SIZE = 16


def patches(name: str, count: int, seed: int) -> Tensor:
    """``count`` random 16x16 patches in [-1, 1] of scikit-learn's sample image ``name`` at a quarter size."""
    image = (
        torch.tensor(require("sklearn.datasets").load_sample_image(name), dtype=torch.float32).permute(2, 0, 1)[None]
        / 127.5
        - 1
    )
    image = F.interpolate(image, scale_factor=0.25, mode="area")[0]
    g = torch.Generator().manual_seed(seed)
    top = torch.randint(0, image.shape[1] - SIZE + 1, (count,), generator=g)
    left = torch.randint(0, image.shape[2] - SIZE + 1, (count,), generator=g)
    return torch.stack([image[:, y : y + SIZE, x : x + SIZE] for y, x in zip(top.tolist(), left.tolist(), strict=True)])


def _colour_stats(images: Tensor) -> Tensor:
    """Per image: the mean and std of each colour channel (N, 6)."""
    return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


def style_share(samples: Tensor, base: Tensor, style: Tensor) -> float:
    """Share of ``samples`` whose nearest image by colour statistics is a style image rather than a base one.

    A sample that is itself one of ``style`` counts as styled; the style images score about 1, the base ~0.
    """
    stats = _colour_stats(samples)
    to_style = torch.cdist(stats, _colour_stats(style)).min(dim=1).values
    to_base = torch.cdist(stats, _colour_stats(base)).min(dim=1).values
    return float((to_style < to_base).float().mean())


def _unet() -> Any:
    unet: Any = require("diffusers").UNet2DModel(
        sample_size=SIZE,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    return unet


def _fit(unet: nn.Module, data: Tensor, steps: int, lr: float, seed: int) -> list[float]:
    scheduler: Any = require("diffusers").DDPMScheduler(num_train_timesteps=1000)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    unet.train()
    for _ in range(steps):
        x = data[torch.randint(0, len(data), (32,), generator=g)]
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x, x.flip(-1))
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(0, 1000, (len(x),), generator=g)
        loss = F.mse_loss(unet(scheduler.add_noise(x, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    unet.eval()
    return losses


@torch.no_grad()
def _sample(unet: nn.Module, count: int, seed: int, steps: int = 25) -> Tensor:
    scheduler: Any = require("diffusers").DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    x = torch.randn(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return x.clamp(-1, 1)


def _grid(base: Tensor, styled: Tensor, path: Path, scale: int = 4) -> Path:
    """Two rows of samples (base above, styled below) from the same seeds, enlarged, as a PNG."""
    Image = require("PIL.Image")
    rows = [torch.cat(list(x), dim=2) for x in (base, styled)]
    grid = torch.cat(rows, dim=1)
    pixels = ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.Resampling.NEAREST)
    image.save(path)
    return path


def run_quickstart_diffusion(
    out: str | Path, *, pretrain_steps: int = 1500, style_steps: int = 400, samples: int = 24, echo: bool = True
) -> dict[str, Any]:
    """Run the styling demo (see the module docstring); write its files to ``out`` and return the numbers."""
    for needed in ("diffusers", "sklearn", "PIL"):  # before any work: a missing one is named at once
        require(needed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = print if echo else (lambda *a, **k: None)
    torch.manual_seed(0)
    base_data, style_data = patches("china.jpg", 2048, seed=0), patches("flower.jpg", 512, seed=1)
    unet = _unet()
    say(f"1. pre-training a {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M-parameter UNet on china.jpg ...")
    started = time.perf_counter()
    _fit(unet, base_data, pretrain_steps, 1e-3, seed=0)
    pretrain_seconds = time.perf_counter() - started
    base_samples = _sample(unet, samples, seed=123)
    cfg = LoraConfig(targets=[r"re:.*(to_q|to_k|to_v|to_out\.0|conv1|conv2)"], rank=4, alpha=4)
    apply_lora(unet, cfg)
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    total = sum(p.numel() for p in unet.parameters())
    say(f"2. styling toward flower.jpg with LoRA ({100 * trainable / total:.1f}% of the parameters) ...")
    started = time.perf_counter()
    losses = _fit(unet, style_data, style_steps, 2e-3, seed=1)
    style_seconds = time.perf_counter() - started
    styled_samples = _sample(unet, samples, seed=123)
    save_adapter(unet, out / "adapter.safetensors", overwrite=True)  # the demo's own folder
    export_adapter(unet, out / "adapter-kohya.safetensors", format="kohya", overwrite=True)
    export_merged(unet, out / "merged-unet", overwrite=True)
    _grid(base_samples, styled_samples, out / "samples.png")
    result: dict[str, Any] = {
        "style_share_base": style_share(base_samples, base_data, style_data),
        "style_share_styled": style_share(styled_samples, base_data, style_data),
        "style_share_of_new_style_patches": style_share(patches("flower.jpg", 256, seed=2), base_data, style_data),
        "trainable_percent": 100 * trainable / total,
        "pretrain_seconds": pretrain_seconds,
        "style_seconds": style_seconds,
        "style_loss_first_last": [sum(losses[:20]) / 20, sum(losses[-20:]) / 20] if len(losses) >= 20 else losses,
        "files": sorted(p.name for p in out.iterdir()),
    }
    (out / "quickstart-diffusion.json").write_text(json.dumps(result, indent=1))
    if echo:
        print(f"\nsamples from the same {samples} seeds, base (top) and styled (bottom): {out / 'samples.png'}")
        print("share of samples whose nearest patch by colour statistics is from flower.jpg, not china.jpg:")
        print(f"  base samples:   {result['style_share_base']:.0%}")
        print(f"  styled samples: {result['style_share_styled']:.0%}")
        print(f"  (unseen flower.jpg patches: {result['style_share_of_new_style_patches']:.0%})")
        print(f"time: pre-training {pretrain_seconds:.0f} s, styling {style_seconds:.0f} s")
        print(f"files in {out}: {', '.join(result['files'])}")
    return result
