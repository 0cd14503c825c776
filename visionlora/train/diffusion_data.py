"""What a diffusion recipe trains on: captioned images (and those held out), their aspect-ratio buckets
and crops, caption controls, and their latents from the frozen VAE.

Everything random here (crops, flips, caption dropout, tag order) is fixed by (seed, epoch, image),
never by the global RNG, so a resumed run and a run over several processes see exactly what one
uninterrupted process sees.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from visionlora._deps import require
from visionlora.errors import ConfigError
from visionlora.train.data import mix_seed

__all__ = [
    "IMAGE_SUFFIXES",
    "Crop",
    "Item",
    "Latents",
    "assign_buckets",
    "bucket_sizes",
    "bucket_table",
    "caption_for",
    "crop_for",
    "flip_for",
    "hold_out",
    "load_pixels",
    "style_items",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Item:
    """One training image: its file, caption and original size, and whether it is a DreamBooth class image."""

    path: Path
    caption: str
    size: tuple[int, int]
    """(height, width) of the image as stored."""
    prior: bool = False


def _image_size(path: Path) -> tuple[int, int]:
    Image = require("PIL.Image")
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except OSError as exc:
        raise ConfigError(f"data: {path} is not an image PIL can read ({exc})") from None


def style_items(
    root: str | Path,
    caption: str | None,
    extension: str | None = ".txt",
    *,
    key: str = "data.root",
    prior: bool = False,
) -> list[Item]:
    """The images under ``root`` (recursively, sorted), each with the caption file beside it
    (``<name><extension>``), else ``caption`` (always ``caption`` when ``extension`` is None).

    Raises:
        ConfigError: ``root`` is not a folder, holds no images, or an image has neither a caption
            file nor a ``caption`` to fall back on (``key`` names the recipe key at fault).
    """
    folder = Path(root)
    if not folder.is_dir():
        raise ConfigError(f"{key}: {folder} is not a folder of images")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ConfigError(f"{key}: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    items = []
    for image in images:
        text_file = image.with_suffix(extension or ".txt")
        text = text_file.read_text(encoding="utf-8").strip() if extension and text_file.is_file() else caption
        if text is None:
            raise ConfigError(f"data.caption: {image.name} has no {text_file.name}; add one or set data.caption")
        items.append(Item(image, text, _image_size(image), prior))
    return items


def bucket_sizes(area: int, step: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """(width, height) buckets: sides multiples of ``step`` within [min_side, max_side], each the
    largest of that width whose area is at most ``area``; both orientations, sorted."""
    sizes = set()
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            sizes |= {(width, height), (height, width)}
    if not sizes:
        raise ConfigError(
            f"data.buckets: no bucket of sides {min_side}..{max_side} (multiples of {step}) has an area up to "
            f"{area} (data.resolution squared); lower data.bucket_min_side or raise data.resolution"
        )
    return sorted(sizes)


def assign_buckets(sizes: Sequence[tuple[int, int]], buckets: Sequence[tuple[int, int]]) -> list[int]:
    """Per image (height, width): the bucket whose aspect ratio is nearest (in log ratio; the larger
    bucket on a tie)."""

    def distance(image: tuple[int, int], bucket: tuple[int, int]) -> tuple[float, int]:
        (h, w), (bw, bh) = image, bucket
        return abs(math.log(w / h) - math.log(bw / bh)), -bw * bh

    return [min(range(len(buckets)), key=lambda b: distance(size, buckets[b])) for size in sizes]


def bucket_table(buckets: Sequence[tuple[int, int]], assigned: Sequence[int]) -> str:
    """The buckets in use and their image counts, one per line (what a run prints before training)."""
    counts = Counter(assigned)
    lines = [f"  {buckets[b][0]}x{buckets[b][1]}: {counts[b]} image(s)" for b in sorted(counts)]
    return "\n".join([f"aspect-ratio buckets ({len(counts)} used, width x height):", *lines])


@dataclass(frozen=True)
class Crop:
    """How an image becomes a training target: resized to ``resized`` (height, width), then the
    ``target`` (height, width) window at ``top_left`` taken (SDXL's crop coordinates)."""

    resized: tuple[int, int]
    top_left: tuple[int, int]
    target: tuple[int, int]


def crop_for(size: tuple[int, int], target: tuple[int, int], center: bool, seed: int) -> Crop:
    """The smallest resize of an image of ``size`` that covers ``target``, and the crop of it: in the
    middle, or at a place fixed by ``seed``."""
    (h, w), (th, tw) = size, target
    # The side that fits exactly stays whole; the other is cropped.
    resized = (th, max(tw, int(w * th / h))) if th / h >= tw / w else (max(th, int(h * tw / w)), tw)
    spare = (resized[0] - th, resized[1] - tw)
    if center:
        top, left = spare[0] // 2, spare[1] // 2
    else:
        g = torch.Generator().manual_seed(seed)
        top = int(torch.randint(0, spare[0] + 1, (1,), generator=g))
        left = int(torch.randint(0, spare[1] + 1, (1,), generator=g))
    return Crop(resized, (top, left), target)


def load_pixels(path: Path, crop: Crop, flip: bool) -> torch.Tensor:
    """The image resized and cropped by ``crop`` (then flipped if asked), as (3, h, w) in [-1, 1]."""
    Image = require("PIL.Image")
    TF = require("torchvision.transforms.functional")
    with Image.open(path) as im:
        image = im.convert("RGB")
    image = TF.resize(image, list(crop.resized), antialias=True)
    image = TF.crop(image, *crop.top_left, *crop.target)
    if flip:
        image = TF.hflip(image)
    return TF.to_tensor(image) * 2 - 1


def crop_ids(item: Item, crop: Crop, flip: bool) -> torch.Tensor:
    """SDXL's micro-conditioning for one image: original (h, w), crop top-left, target (h, w).

    A flipped image reports its crop as seen in the flipped image (the left edge mirrored).
    """
    top, left = crop.top_left
    if flip:
        left = crop.resized[1] - left - crop.target[1]
    return torch.tensor([*item.size, top, left, *crop.target], dtype=torch.float32)


def _coin(seed: int, probability: float) -> bool:
    return bool(torch.rand((), generator=torch.Generator().manual_seed(seed)) < probability)


def flip_for(seed: int, epoch: int, index: int, random_flip: bool) -> bool:
    """Whether image ``index`` is flipped in ``epoch``."""
    return random_flip and _coin(mix_seed(seed, epoch, index), 0.5)


def caption_for(
    caption: str, seed: int, epoch: int, index: int, dropout: float = 0.0, shuffle_tags: bool = False, keep: int = 0
) -> str:
    """Image ``index``'s caption in ``epoch``: the empty prompt with probability ``dropout``, else with
    its comma-separated tags shuffled after the first ``keep``."""
    if dropout > 0 and _coin(mix_seed(seed, epoch, index, 1), dropout):
        return ""
    if not shuffle_tags:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep], tags[keep:]
    order = torch.randperm(len(tail), generator=torch.Generator().manual_seed(mix_seed(seed, epoch, index, 2)))
    return ", ".join(head + [tail[i] for i in order.tolist()])


def hold_out(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """(training, held-out) images: ``fraction`` of them (at least one) chosen by ``seed``, none if 0."""
    if not fraction:
        return items, []
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(mix_seed(seed, 3))).tolist()
    count = max(1, round(len(items) * fraction))
    if count >= len(items):
        raise ConfigError(f"data.val_fraction: {fraction} of {len(items)} images leaves none to train on")
    held = set(order[:count])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


class Latents:
    """Latent distributions (mean, std) per (image, flipped), encoded by the frozen VAE when first asked
    for (with ``data.cache``, everything is asked for once, at the start)."""

    def __init__(self, pipe: Any, items: list[Item], crops: list[Crop], keep: bool) -> None:
        self.vae, self.items, self.crops, self.keep = pipe.vae, items, crops, keep
        self.stored: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def get(self, index: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if (index, flip) in self.stored:
            return self.stored[index, flip]
        pixels = load_pixels(self.items[index].path, self.crops[index], flip)
        dist = self.vae.encode(pixels[None].to(self.vae.device, self.vae.dtype)).latent_dist
        got = dist.mean.float().cpu()[0], dist.std.float().cpu()[0]
        if self.keep:
            self.stored[index, flip] = got
        return got
