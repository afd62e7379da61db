"""Latent and text caches: hits are used, changes invalidate, and training is unchanged."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from trainer.config.load import ConfigError
from trainer.data import cache
from trainer.models.vae import posterior
from trainer.report.tracking import read_metrics
from trainer.run import loop


@pytest.fixture(scope="module")
def vae(tiny_model):
    return AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")


def jobs_for(folder, vae, size=(64, 64)):
    vae_id = cache.module_fingerprint(vae)
    paths = sorted(folder.glob("*.png"))
    return [
        (cache.latent_key(cache.file_digest(p), vae_id, size, "center", False), p, size, False)
        for p in paths
    ]


def test_disk_cache_hits_and_invalidation(vae, tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    store = cache.LatentCache(tmp_path / "cache")
    jobs = jobs_for(data, vae)
    assert cache.fill_latents(store, vae, jobs, torch.float32, show_progress=False) == 16
    assert cache.fill_latents(store, vae, jobs, torch.float32, show_progress=False) == 0
    # A fresh process reading the same folder reuses every entry.
    reopened = cache.LatentCache(tmp_path / "cache")
    assert cache.fill_latents(reopened, vae, jobs_for(data, vae), torch.float32, False) == 0

    # Edit one image: only its entry misses.
    Image.new("RGB", (64, 64), (1, 2, 3)).save(data / "img_003.png")
    assert cache.fill_latents(store, vae, jobs_for(data, vae), torch.float32, False) == 1
    # Another resolution, or another VAE: everything misses.
    assert cache.fill_latents(store, vae, jobs_for(data, vae, (56, 56)), torch.float32, False) == 16
    other = AutoencoderKL.from_config(vae.config)
    assert cache.module_fingerprint(other) != cache.module_fingerprint(vae)


def test_vae_fingerprint_does_not_depend_on_the_memory_format(vae):
    # channels_last (a GPU speed option) must neither break the key nor change it.
    layout = AutoencoderKL.from_config(vae.config)
    layout.load_state_dict(vae.state_dict())
    layout.to(memory_format=torch.channels_last)
    assert any(p.dim() == 4 and not p.is_contiguous() for p in layout.parameters())
    assert cache.module_fingerprint(layout) == cache.module_fingerprint(vae)


def test_cached_entry_equals_a_fresh_encode(vae, tiny_data, tmp_path):
    from trainer.data import images

    store = cache.LatentCache(None)
    key, path, size, _ = jobs_for(tiny_data, vae)[0]
    cache.fill_latents(store, vae, [(key, path, size, False)], torch.float32, False)
    pixels = images.load_example(path, size, True, False, None)[0][None]
    with torch.no_grad():
        mean, std = posterior(vae, pixels)
    cached_mean, cached_std = store.get(key)
    torch.testing.assert_close(cached_mean, mean[0])
    torch.testing.assert_close(cached_std, std[0])


def test_training_on_cached_latents_matches_uncached(make_config, tmp_path):
    settings = ("train.max_steps=3", "data.random_flip=false", "data.center_crop=true")
    runs = {}
    for latents, text in (("off", "off"), ("memory", "on"), ("disk", "on")):
        out = tmp_path / f"{latents}-{text}"
        cfg = make_config(
            *settings, f'data.cache_latents="{latents}"', f'data.cache_text="{text}"', output=out
        )
        loop.run(cfg)
        runs[latents] = [r["loss"] for r in read_metrics(out)]
    assert runs["off"] == pytest.approx(runs["memory"], rel=1e-4)
    assert runs["memory"] == runs["disk"]
    assert len(list((tmp_path / "disk-on" / "cache").glob("*.safetensors"))) == 16


def test_latent_cache_with_random_crops_is_refused(make_config):
    with pytest.raises(ConfigError, match=r"data\.cache_latents"):
        make_config('data.cache_latents="memory"', "data.center_crop=false")


def test_text_cache_with_a_trained_text_encoder_is_refused(make_config):
    with pytest.raises(ConfigError, match=r"data\.cache_text"):
        make_config('data.cache_text="on"', "lora.train_text_encoder=true")
