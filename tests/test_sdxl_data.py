"""SDXL's size and crop conditioning from the data side, and its 1024 px buckets.

The time ids of an example are checked against the pixels it trains on: the test finds, by
search, where in the resized picture (or in its mirror image, for a flipped example) the
training crop came from, and compares that with the recorded crop. So the rule for a flip
("left" is measured in the mirrored picture, i.e. from the original's right edge) is checked
by what the model is actually shown, not by recomputing the trainer's own formula.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from make_tiny_sd import write_tokenizer
from PIL import Image
from transformers import CLIPTokenizer

from trainer.config.load import DataConfig
from trainer.data import buckets, cache, images
from trainer.data import dataset as data

# (width, height) of noise images, so every crop position has a unique content.
SIZES = [(96, 72), (72, 112), (128, 80), (100, 100)]


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("noisy")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"noise {i}")
    return folder


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> list[CLIPTokenizer]:
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder / "a")
    write_tokenizer(folder / "b", pad_token="!")
    return [CLIPTokenizer.from_pretrained(folder / n) for n in ("a", "b")]


def dataset(folder: Path, tokenizers, **kw) -> data.CaptionedImages:
    config = DataConfig(path=str(folder), resolution=64, buckets=True, bucket_step=8, **kw)
    prepared = data.prepare(data.find_records(config), config, show_progress=False)
    return data.CaptionedImages(prepared.examples, config, tokenizers, time_ids=True)


def found_crops(picture: np.ndarray, crop: np.ndarray) -> list[tuple[int, int]]:
    """Every (top, left) where ``crop`` sits in ``picture``, by exhaustive search."""
    (ph, pw), (ch, cw) = picture.shape[:2], crop.shape[:2]
    return [
        (top, left)
        for top in range(ph - ch + 1)
        for left in range(pw - cw + 1)
        if np.array_equal(picture[top : top + ch, left : left + cw], crop)
    ]


def test_flip_rule_on_a_known_crop():
    # A 10 px wide resized picture, the crop [2, 6): unflipped, 2 px are cut on the left;
    # mirrored, what the model sees on its left was 10 - 6 = 4 px from the right edge.
    plain = images.Geometry((20, 16), (10, 8), (2, 1, 6, 5), flip=False)
    mirrored = images.Geometry((20, 16), (10, 8), (2, 1, 6, 5), flip=True)
    assert plain.time_ids() == (16, 20, 1, 2, 4, 4)
    assert mirrored.time_ids() == (16, 20, 1, 4, 4, 4)


def test_time_ids_match_the_pixels_after_flips_and_bucketed_crops(noisy, tokenizers):
    ds = dataset(noisy, tokenizers, center_crop=False, random_flip=True)
    assert len({e.size for e in ds.examples}) > 1, "several buckets"
    seen = set()
    for index, example in enumerate(ds.examples):
        source = Image.open(example.path).convert("RGB")
        for draw_seed in range(6):
            item = ds[(index, draw_seed)]
            pixels = ((item["pixel_values"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
            orig_h, orig_w, top, left, target_h, target_w = item["time_ids"].int().tolist()
            assert (orig_w, orig_h) == source.size
            assert (target_h, target_w) == pixels.shape[:2] == example.size[::-1]
            # The picture scaled to cover the bucket (the resize is not what is under test).
            scale = max(target_w / source.width, target_h / source.height)
            resized = source.resize(
                (
                    max(target_w, round(source.width * scale)),
                    max(target_h, round(source.height * scale)),
                ),
                Image.Resampling.BICUBIC,
            )
            picture = np.asarray(resized)
            flipped = not found_crops(picture, pixels)
            if flipped:
                picture = picture[:, ::-1]  # the mirrored picture holds the crop unmirrored
            assert found_crops(picture, pixels) == [(top, left)]
            seen.add((flipped, left != picture.shape[1] - target_w - left))
    # Flipped and unflipped examples, with crops whose left and right margins differ (where
    # the flip rule changes the number).
    assert {(True, True), (False, True)} <= seen


def test_the_latent_cache_stores_each_crop_and_serves_it(noisy, tokenizers, tiny_sdxl, tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    plain = dataset(noisy, tokenizers, center_crop=True, random_flip=True)
    cached = dataset(noisy, tokenizers, center_crop=True, random_flip=True)
    store = cache.LatentCache(tmp_path / "cache")
    keys = {
        (i, flip): cache.latent_key(cache.file_digest(e.path), "vae", e.size, "center", flip)
        for i, e in enumerate(plain.examples)
        for flip in (False, True)
    }
    jobs = [
        (key, plain.examples[i].path, plain.examples[i].size, flip)
        for (i, flip), key in keys.items()
    ]
    assert cache.fill_latents(store, vae, jobs, torch.float32, show_progress=False) == len(jobs)
    cached.latents = lambda index, flip: store.get_entry(keys[(index, flip)])
    flips = set()
    for index in range(len(plain)):
        for draw_seed in range(4):
            ours, theirs = cached[(index, draw_seed)], plain[(index, draw_seed)]
            assert "pixel_values" not in ours and "latent_mean" in ours
            assert torch.equal(ours["time_ids"], theirs["time_ids"])
            flips.add(bool(plain.draw(index, draw_seed)[0]))
    assert flips == {False, True}
    # An entry written before the cache held time ids is encoded again, not served without.
    key = jobs[0][0]
    mean, std, _ = store.get_entry(key)
    from safetensors.torch import save_file

    save_file({"mean": mean, "std": std}, str(tmp_path / "cache" / f"{key}.safetensors"))
    assert cache.fill_latents(store, vae, jobs, torch.float32, show_progress=False) == 1


# The SDXL paper's training buckets (appendix): sides on a 64 px grid, about 1024² pixels.
SDXL_BUCKETS = [
    (1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216),
    (1344, 768), (768, 1344), (1536, 640), (640, 1536),
]  # fmt: skip


@pytest.mark.parametrize("step", [64, 32])
def test_buckets_for_1024_px(step):
    grid = data._bucket_grid(DataConfig(path="x", resolution=1024, buckets=True, bucket_step=step))
    assert set(SDXL_BUCKETS) <= set(grid)
    assert all(w % step == 0 and h % step == 0 and w * h <= 1024**2 for w, h in grid)
    assert min(min(b) for b in grid) == 512 and max(max(b) for b in grid) <= 2048
    # A square photo trains at 1024²; a 3:2 photo in a 3:2-ish bucket of about the same area.
    assert buckets.assign((2048, 2048), grid, 1.0, 0.05) == (1024, 1024)
    w, h = buckets.assign((3000, 2000), grid, 1.0, 0.05)
    assert abs(w / h - 1.5) < 0.05 and w * h > 0.9 * 1024**2
