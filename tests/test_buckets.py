"""Buckets keep the picture: the crop bound over a spread of sizes, square buckets for
near-square images, and the kohya reference the docs' crop table is measured against."""

from __future__ import annotations

import math
import random

import pytest

from trainer.config.load import DataConfig
from trainer.data import buckets, images
from trainer.data import dataset as data

# The configs/lora.toml defaults: 512 px, buckets on, 64 px grid, sides 256..1024, no upscaling.
LORA_TOML = DataConfig(resolution=512, buckets=True, bucket_step=64, max_upscale=1.0)


def cover_crop(image: tuple[int, int], bucket: tuple[int, int]) -> float:
    """Share of the picture lost, from the geometry: scale to cover the bucket, cut the rest."""
    (w, h), (bw, bh) = image, bucket
    scale = max(bw / w, bh / h)
    return 1.0 - (bw * bh) / (w * scale * h * scale)


def loader_crop(image: tuple[int, int], bucket: tuple[int, int]) -> float:
    """The share the image loader really cuts (its resize rounds to whole pixels)."""
    (rw, rh), (left, top, right, bottom) = images.crop_box(image, bucket, True, random.Random(0))
    return 1.0 - (right - left) * (bottom - top) / (rw * rh)


def size_spread(seed: int, count: int, low: int, high: int) -> list[tuple[int, int]]:
    """Sizes with sides in [low, high]: common photo ratios and random ones, both ways round."""
    rng = random.Random(seed)
    common = [1, 4 / 3, 3 / 2, 16 / 9, 5 / 4, 16 / 10, 21 / 9, 1.02, 1.05, 1.1]
    sizes = []
    for i in range(count):
        ratio = common[i % len(common)] if i % 2 else math.exp(rng.uniform(-1.2, 1.2))
        ratio = ratio if rng.random() < 0.5 else 1 / ratio
        short = rng.uniform(low, high / max(ratio, 1 / ratio))
        long = short * max(ratio, 1 / ratio)
        w, h = (long, short) if ratio >= 1 else (short, long)
        sizes.append((round(w), round(h)))
    return sizes


SETTINGS = [
    # resolution, step, min side, max side, max_upscale
    pytest.param(512, 64, 256, 1024, 1.0, id="lora.toml"),
    pytest.param(768, 64, 384, 1536, 1.0, id="768"),
    pytest.param(1024, 64, 512, 2048, 1.5, id="1024-upscale"),
    pytest.param(64, 8, 32, 128, 1.0, id="tiny"),
]


@pytest.mark.parametrize(("res", "step", "low", "high", "upscale"), SETTINGS)
def test_crop_bound_holds_over_a_spread_of_sizes(res, step, low, high, upscale):
    grid = buckets.bucket_sizes(res, step, low, high)
    bound = buckets.MAX_CROP
    scale = res / 512
    sizes = size_spread(seed=res, count=600, low=round(300 * scale), high=round(2000 * scale))
    for image in sizes:
        chosen = buckets.assign(image, grid, upscale)
        fitting = [b for b in grid if b[0] <= image[0] * upscale and b[1] <= image[1] * upscale]
        if not fitting:
            assert chosen is None, image
            continue
        assert chosen in fitting, (image, chosen)
        crop = cover_crop(image, chosen)
        close = [b for b in fitting if cover_crop(image, b) <= bound + 1e-12]
        if close:
            # Within the bound, and no bucket within the bound trains more pixels.
            assert crop <= bound + 1e-12, (image, chosen, crop)
            assert chosen[0] * chosen[1] == max(b[0] * b[1] for b in close), (image, chosen)
        else:
            # Nothing is that close in shape: the least crop any fitting bucket gives.
            assert crop <= min(cover_crop(image, b) for b in fitting) + 1e-12, (image, chosen)
        # The loader cuts what the geometry says, give or take one pixel of rounding.
        assert abs(loader_crop(image, chosen) - crop) <= 1 / min(chosen), (image, chosen)


def test_common_photos_keep_the_picture_and_most_of_the_resolution():
    grid = data._bucket_grid(LORA_TOML)
    expected = {  # ratio -> bucket for a large photo (long side 1920)
        (1, 1): (512, 512),
        (5, 4): (576, 448),
        (4, 3): (576, 448),
        (3, 2): (576, 384),
        (16, 10): (640, 384),
        (16, 9): (576, 320),
    }
    for (a, b), bucket in expected.items():
        for image, want in (
            ((1920, round(1920 * b / a)), bucket),
            ((round(1920 * b / a), 1920), bucket[::-1]),
        ):
            chosen = buckets.assign(image, grid, 1.0)
            assert chosen == want, (image, chosen)
            assert cover_crop(image, chosen) <= buckets.MAX_CROP
            assert chosen[0] * chosen[1] >= 0.7 * 512 * 512


def test_a_511_px_square_gets_a_square_bucket():
    grid = data._bucket_grid(LORA_TOML)
    assert buckets.assign((511, 511), grid, 1.0) == (448, 448)  # was 384×448: 14 % cut
    assert cover_crop((511, 511), (448, 448)) == 0.0


@pytest.mark.parametrize("ratio", [1.0, 1.01, 1.03, 1.05, 1 / 1.03, 1 / 1.06])
def test_near_square_images_get_square_buckets(ratio):
    grid = data._bucket_grid(LORA_TOML)
    for height in (300, 400, 480, 511, 512, 600, 777, 1024, 1500, 1900):
        image = (round(height * ratio), height)
        w, h = buckets.assign(image, grid, 1.0)
        assert w == h, (image, (w, h))


def test_the_choice_does_not_depend_on_the_order_of_the_buckets():
    grid = buckets.bucket_sizes(512, 64, 256, 1024)
    shuffled = grid[:]
    random.Random(0).shuffle(shuffled)
    for image in size_spread(seed=1, count=200, low=300, high=2000):
        assert buckets.assign(image, grid, 1.0) == buckets.assign(image, shuffled, 1.0)


def test_without_buckets_every_image_takes_the_one_square():
    grid = data._bucket_grid(DataConfig(resolution=512, buckets=False))
    assert grid == [(512, 512)]
    assert buckets.assign((1920, 1080), grid, 1.0) == (512, 512)  # cropped: no other shape
    assert buckets.assign((500, 800), grid, 1.0) is None  # would need upscaling


# ---------------------------------------------------------------- the docs' reference


def test_kohya_reference_matches_its_bucket_list_worked_by_hand():
    from bucket_crop_table import kohya_grid

    # kohya-ss sd-scripts' SD 1.x buckets at 512 (min 256, max 1024, steps 64), worked out by
    # hand from its rule: per width, the tallest grid height with area ≤ 512², and transposes.
    landscape = [(512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256)]
    landscape += [(896, 256), (960, 256), (1024, 256)]
    expected = sorted(set(landscape) | {(h, w) for w, h in landscape})
    assert kohya_grid(512) == expected


def test_kohya_reference_placements_worked_by_hand():
    from bucket_crop_table import crop_of, kohya, kohya_no_upscale

    # Default mode: a 16:9 photo goes to the closest ratio, 640×384, scaled to cover: 6 % cut.
    bucket, resized = kohya(512)((1920, 1080))
    assert bucket == (640, 384) and resized == (683, 384)
    # no_upscale: scaled to 512² area at 16:9 with the height on the grid (683×384), then the
    # width floored to 640; a 300 px square is not scaled, only cut to 256 px: 27 % lost.
    assert kohya_no_upscale(512)((1920, 1080)) == ((640, 384), (683, 384))
    bucket, resized = kohya_no_upscale(512)((300, 300))
    assert bucket == (256, 256) and resized == (300, 300)
    assert crop_of(bucket, resized) == pytest.approx(1 - (256 / 300) ** 2)


def test_crop_table_puts_ours_within_the_bound_where_kohya_crops_more():
    from bucket_crop_table import kohya_no_upscale, measure, sdlora, spread

    sizes = spread(per_ratio=20, random_count=180, seed=3)
    ours, theirs = measure(sdlora(512), sizes, 512), measure(kohya_no_upscale(512), sizes, 512)
    assert ours["refused"] == 0 and ours["upscaled"] == 0
    assert ours["p95"] <= buckets.MAX_CROP + 1e-9 < theirs["p95"]
    assert ours["mean"] < theirs["mean"]
