"""Masked loss: the loss against independent computations, the mask against its image's pixels
through crop and flip, mask discovery, caches, and exact resume."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from trainer.config.load import DataConfig
from trainer.data import dataset as data
from trainer.data import images, masks
from trainer.lora.files import WEIGHTS_NAME
from trainer.report.tracking import read_metrics
from trainer.run import checkpoint as ckpt
from trainer.run import loop
from trainer.run.loss import LossOptions, batch_loss


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prediction, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    return prediction, target, torch.tensor([10, 500, 990])


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize(
    "options",
    [LossOptions(), LossOptions(loss="huber", snr_gamma=5.0, debiased_estimation=True)],
    ids=["mse", "huber-snr-debiased"],
)
def test_an_all_ones_mask_gives_exactly_the_unmasked_loss(options):
    prediction, target, t = batch()
    weights = torch.tensor([1.0, 0.5, 2.0])
    plain = batch_loss(prediction, target, t, noise_scheduler(), options, weights)
    ones = torch.ones(3, 1, 8, 8)
    assert torch.equal(
        batch_loss(prediction, target, t, noise_scheduler(), options, weights, ones), plain
    )


def test_a_half_mask_gives_the_loss_over_the_kept_half():
    prediction, target, t = batch(1)
    mask = torch.zeros(3, 1, 8, 8)
    mask[..., :, :3] = 1.0  # the left 3 of 8 latent columns
    got = batch_loss(prediction, target, t, noise_scheduler(), LossOptions(), mask=mask)
    kept = (prediction[..., :3] - target[..., :3]) ** 2  # computed on the kept part alone
    assert got.item() == pytest.approx(kept.mean(dim=(1, 2, 3)).mean().item(), rel=1e-6)


def test_an_example_masked_out_entirely_adds_nothing():
    prediction, target, t = batch(2)
    mask = torch.ones(3, 1, 8, 8)
    mask[1] = 0
    got = batch_loss(prediction, target, t, noise_scheduler(), LossOptions(), mask=mask)
    per_example = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    assert got.item() == pytest.approx((per_example[0] + per_example[2]).item() / 3, rel=1e-6)


def test_the_latent_mask_is_kohyas_area_interpolation():
    pixels = torch.rand(1, 1, 48, 64, generator=torch.Generator().manual_seed(3))
    expected = F.interpolate(pixels, size=(6, 8), mode="area")  # kohya's apply_masked_loss
    torch.testing.assert_close(masks.to_latent(pixels), expected)


# ---------------------------------------------------------------- the mask follows its image

RED, BLUE, BOX = (220, 20, 20), (20, 20, 220), (8, 12, 48, 52)  # box: left, top, right, bottom


def picture(folder: Path, alpha: bool = False) -> Path:
    """A 100×64 picture: a red box on blue (or on transparent), its mask file white there."""
    folder.mkdir(parents=True, exist_ok=True)
    if alpha:
        image = Image.new("RGBA", (100, 64), (*BLUE, 0))
        image.paste(Image.new("RGBA", (40, 40), (*RED, 255)), BOX[:2])
        path = folder / "boxa.png"
    else:
        image = Image.new("RGB", (100, 64), BLUE)
        image.paste(Image.new("RGB", (40, 40), RED), BOX[:2])
        mask = Image.new("L", (100, 64), 0)
        mask.paste(Image.new("L", (40, 40), 255), BOX[:2])
        mask.save(folder / "box_mask.png")
        path = folder / "box.png"
    image.save(path)
    return path


@pytest.mark.parametrize("alpha", [False, True], ids=["mask-file", "alpha"])
@pytest.mark.parametrize("flip", [False, True])
def test_the_mask_follows_its_image_through_a_bucket_crop_and_a_flip(tmp_path, alpha, flip):
    path = picture(tmp_path, alpha)
    mask_path = path if alpha else masks.mask_file(path, "_mask")
    for seed in range(4):  # random crops at several places
        pixels, geometry = images.load_example(path, (64, 48), False, flip, random.Random(seed))
        mask = masks.pixel_mask(mask_path, path, geometry)[0]
        rgb = ((pixels.permute(1, 2, 0) + 1) * 127.5).round()
        red = (rgb[..., 0] > 150) & (rgb[..., 2] < 90)
        # Away from the edge, where resampling blends the two: mask white exactly on red.
        assert (mask > 0.99).any() and (mask < 0.01).any()
        assert red[mask > 0.99].all()
        assert not red[mask < 0.01].any()


def test_mask_files_are_found_beside_their_images_and_are_no_images(tmp_path):
    folder = tmp_path / "ds"
    picture(folder)
    picture(folder, alpha=True)
    Image.new("RGB", (64, 64), RED).save(folder / "plain.png")
    for stem in ("box", "boxa", "plain"):
        (folder / f"{stem}.txt").write_text(f"a {stem}")
    config = DataConfig(path=str(folder), resolution=64, alpha_mask=True)
    records = data.find_records(config, mask_suffix="_mask")
    assert sorted(r.path.name for r in records) == ["box.png", "boxa.png", "plain.png"]
    prepared = data.prepare(records, config, show_progress=False, masked=True)
    found = {e.path.name: e.mask for e in prepared.examples}
    assert found == {"box.png": folder / "box_mask.png", "boxa.png": folder / "boxa.png",
                     "plain.png": None}  # fmt: skip
    without_alpha = DataConfig(path=str(folder), resolution=64)
    prepared = data.prepare(records, without_alpha, show_progress=False, masked=True)
    assert {e.path.name: e.mask for e in prepared.examples}["boxa.png"] is None


def test_a_mask_of_another_size_is_a_bad_file(tmp_path):
    path = picture(tmp_path / "ds")
    (path.parent / "box.txt").write_text("a box")
    Image.new("L", (50, 32), 255).save(path.parent / "box_mask.png")
    config = DataConfig(path=str(path.parent), resolution=64)
    records = data.find_records(config, mask_suffix="_mask")
    for decode in (True, False):  # a preview (lr-plot, a sweep's count) reads the header only
        with pytest.raises(data.DataError, match=r"box_mask\.png: the mask is 50×32, its image"):
            data.prepare(records, config, False, decode, masked=True)


# ---------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def masked_data(tiny_data, tmp_path_factory) -> Path:
    """The tiny dataset, half of its images with a mask file (a random box each)."""
    folder = tmp_path_factory.mktemp("masked") / "shapes"
    shutil.copytree(tiny_data, folder)
    rng = random.Random(0)
    for path in sorted(folder.glob("*.png"))[::2]:
        mask = np.zeros((64, 64), np.uint8)
        x, y = rng.randrange(0, 32), rng.randrange(0, 32)
        mask[y : y + 32, x : x + 32] = 255
        Image.fromarray(mask).save(path.with_name(f"{path.stem}_mask.png"))
    return folder


MASKED_RUN = ("train.masked_loss=true", "train.batch_size=2", "train.gradient_accumulation_steps=1")


def test_cached_masks_train_as_masks_read_from_the_files(masked_data, make_config, tmp_path):
    losses = {}
    for mode in ("off", "memory", "disk"):
        out = tmp_path / mode
        cfg = make_config(
            *MASKED_RUN, "train.max_steps=3", "data.random_flip=true",
            f'data.path="{masked_data}"', f'data.cache_latents="{mode}"', output=out,
        )  # fmt: skip
        loop.run(cfg)
        losses[mode] = [r["loss"] for r in read_metrics(out)]
    assert losses["off"] == pytest.approx(losses["memory"], rel=1e-4)
    assert losses["memory"] == losses["disk"]
    cached = load_file(next((tmp_path / "disk" / "cache").glob("*-mask*.safetensors")))
    assert cached["mask"].shape == (1, 8, 8) and cached["mask"].min() == 0


def test_a_masked_run_resumes_bitwise(masked_data, make_config, tmp_path):
    settings = (
        *MASKED_RUN, "train.max_steps=4", "data.center_crop=false", "data.random_flip=true",
        f'data.path="{masked_data}"', 'lora.save_dtype="fp32"', "checkpoint.every_n_steps=2",
    )  # fmt: skip
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    loop.run(make_config(*settings, output=whole))
    start = f'checkpoint.resume="{ckpt.step_dir(whole, 2)}"'
    loop.run(make_config(*settings, start, output=resumed))
    a, b = load_file(whole / WEIGHTS_NAME), load_file(resumed / WEIGHTS_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_a_sweeps_shared_cache_serves_the_masks_a_runs_own_cache_holds(
    masked_data, make_config, tmp_path, monkeypatch, mode
):
    """A trial reading the sweep-wide cache (trainer/data/shared_cache.py) trains the masked
    run bit for bit as one that encoded its own cache, masks included."""
    from trainer.data import shared_cache
    from trainer.run.trial import CACHE_ENV

    settings = (
        *MASKED_RUN, "train.max_steps=2", "data.random_flip=true", 'output.save_dtype="fp32"',
        f'data.path="{masked_data}"', f'data.cache_latents="{mode}"',
    )  # fmt: skip
    monkeypatch.delenv(CACHE_ENV, raising=False)
    loop.run(make_config(*settings, output=tmp_path / "own"))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "shared"))
    for run in ("filler", "reader"):  # the first fills the shared cache, the second reads it
        shared_cache._memo.clear()  # what a fresh trial process starts with
        loop.run(make_config(*settings, output=tmp_path / run))
    (folder,) = [p for p in (tmp_path / "shared").glob("latents-*") if p.is_dir()]
    stored = load_file(folder / shared_cache.TENSORS_NAME)
    assert any(name.endswith("/mask") for name in stored)
    own = load_file(tmp_path / "own" / WEIGHTS_NAME)
    for run in ("filler", "reader"):
        theirs = load_file(tmp_path / run / WEIGHTS_NAME)
        assert own.keys() == theirs.keys() and all(torch.equal(own[k], theirs[k]) for k in own)
        assert [r["loss"] for r in read_metrics(tmp_path / run)] == [
            r["loss"] for r in read_metrics(tmp_path / "own")
        ]
