"""Buckets, crops and caption controls of the diffusion recipes, on their own."""

from __future__ import annotations

import math

import pytest
import torch

import visionlora as vl
from visionlora.train.diffusion_data import (
    Item,
    assign_buckets,
    bucket_sizes,
    bucket_table,
    caption_for,
    crop_for,
    crop_ids,
    flip_for,
    load_pixels,
)


def test_buckets_have_sides_on_the_grid_the_area_and_both_orientations():
    buckets = bucket_sizes(1024 * 1024, 64, 512, 2048)
    assert (1024, 1024) in buckets and (896, 1152) in buckets and (1152, 896) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and min(w, h) >= 512 and max(w, h) <= 2048
        assert w * h <= 1024 * 1024 and (h, w) in buckets
        # It, or its transpose, is the tallest bucket of its width.
        assert any(x * (y + 64) > 1024 * 1024 or y + 64 > 2048 for x, y in ((w, h), (h, w)))
    with pytest.raises(vl.ConfigError, match=r"data.buckets: no bucket .* lower data.bucket_min_side"):
        bucket_sizes(64 * 64, 64, 128, 256)


def test_each_image_goes_to_the_bucket_of_nearest_aspect_ratio_and_is_cropped_minimally():
    buckets = bucket_sizes(1024 * 1024, 64, 512, 2048)
    sizes = [(1080, 1920), (1920, 1080), (1000, 1000), (3000, 4000)]  # (height, width): 16:9, 9:16, 1:1, 3:4
    chosen = [buckets[b] for b in assign_buckets(sizes, buckets)]
    assert chosen == [(1344, 768), (768, 1344), (1024, 1024), (1152, 896)]  # (width, height)
    for (h, w), (bw, bh) in zip(sizes, chosen, strict=True):
        best = min(abs(math.log(w / h) - math.log(x / y)) for x, y in buckets)
        assert abs(math.log(w / h) - math.log(bw / bh)) == best
        crop = crop_for((h, w), (bh, bw), center=True, seed=0)
        rh, rw = crop.resized
        assert (rh == bh and rw >= bw) or (rw == bw and rh >= bh)  # one side exact: the least cropped away
        assert abs(rh / rw - h / w) < 2 / min(rh, rw)  # the aspect ratio kept
        top, left = crop.top_left
        assert top == (rh - bh) // 2 and left == (rw - bw) // 2
    table = bucket_table(buckets, assign_buckets(sizes, buckets))
    assert table.splitlines()[0] == "aspect-ratio buckets (4 used, width x height):"
    assert "  1344x768: 1 image(s)" in table


def test_a_random_crop_is_fixed_by_its_seed_and_the_time_ids_report_it(tmp_path):
    from PIL import Image

    path = tmp_path / "x.png"
    pixels = torch.arange(40 * 60 * 3, dtype=torch.uint8).reshape(40, 60, 3)
    Image.fromarray(pixels.numpy()).save(path)
    crops = {crop_for((40, 60), (16, 16), center=False, seed=s).top_left for s in range(20)}
    assert len(crops) > 3 and crop_for((40, 60), (16, 16), False, 5) == crop_for((40, 60), (16, 16), False, 5)
    crop = crop_for((40, 60), (16, 16), center=False, seed=5)
    assert crop.resized == (16, 24)
    item = Item(path, "x", (40, 60))
    top, left = crop.top_left
    assert crop_ids(item, crop, flip=False).tolist() == [40, 60, top, left, 16, 16]
    assert crop_ids(item, crop, flip=True).tolist() == [40, 60, top, 24 - left - 16, 16, 16]  # mirrored
    image = load_pixels(path, crop, flip=False)
    flipped = load_pixels(path, crop, flip=True)
    assert image.shape == (3, 16, 16) and torch.equal(flipped, image.flip(-1))


def test_caption_dropout_tag_shuffling_and_flips_are_fixed_per_epoch_and_image():
    caption = "zz style, red, a cat, grass, sky"
    runs = [caption_for(caption, 0, epoch, i, dropout=0.25) for epoch in range(40) for i in range(50)]
    assert abs(runs.count("") / len(runs) - 0.25) < 0.03 and set(runs) == {"", caption}
    assert runs == [caption_for(caption, 0, epoch, i, dropout=0.25) for epoch in range(40) for i in range(50)]
    shuffled = [caption_for(caption, 0, epoch, 3, shuffle_tags=True, keep=1) for epoch in range(30)]
    assert all(s.startswith("zz style, ") for s in shuffled) and len(set(shuffled)) > 5
    assert all(sorted(s.split(", ")) == sorted(caption.split(", ")) for s in shuffled)
    assert caption_for(caption, 0, 0, 3) == caption
    flips = [flip_for(0, epoch, i, True) for epoch in range(20) for i in range(20)]
    assert 0.4 < sum(flips) / len(flips) < 0.6 and not any(flip_for(0, 1, i, False) for i in range(20))


def test_noise_offset_adds_one_gaussian_per_image_and_channel():
    from visionlora.train.diffusion_loss import draw_noise

    torch.manual_seed(0)
    plain = draw_noise((400, 4, 8, 8), slice(None), 0.0)
    torch.manual_seed(0)
    offset = draw_noise((400, 4, 8, 8), slice(None), 0.1)
    torch.manual_seed(0)
    part = draw_noise((400, 4, 8, 8), slice(100, 200), 0.1)
    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)  # constant over the image
    assert abs(float(shift[:, :, 0, 0].std()) - 0.1) < 0.01
    assert torch.equal(part, offset[100:200])  # a process's share is its rows of the whole draw
