"""A sweep's shared latent and text caches: filled once, read by every trial, never stale.

The reference is a run that encodes its own caches: a run reading the shared cache (filled
by another run, or by itself) must train the same LoRA, bit for bit.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import without_clock
from safetensors.torch import load_file

from trainer.data import shared_cache
from trainer.lora.files import WEIGHTS_NAME
from trainer.report.tracking import read_metrics
from trainer.run import loop
from trainer.run.trial import CACHE_ENV

REPO = Path(__file__).resolve().parents[1]
SHORT = ("train.max_steps=2", 'output.save_dtype="fp32"', "data.caption_dropout=0.1")


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / WEIGHTS_NAME)


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert without_clock(read_metrics(a)) == without_clock(read_metrics(b))


def train(make_config, out: Path, shared: Path | None, monkeypatch, *extra: str) -> None:
    shared_cache._memo.clear()  # what a fresh trial process starts with
    if shared is None:
        monkeypatch.delenv(CACHE_ENV, raising=False)
    else:
        monkeypatch.setenv(CACHE_ENV, str(shared))
    loop.run(make_config(*SHORT, *extra, output=out))


def fills(caplog, kind: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"shared {kind} cache: filled" in r.message]


@pytest.fixture(scope="module")
def alone(tiny_config, tmp_path_factory) -> Path:
    """The reference: a run that encodes its own caches."""
    out = tmp_path_factory.mktemp("alone")
    os.environ.pop(CACHE_ENV, None)
    loop.run(tiny_config(out, *SHORT))
    return out


def test_trials_fill_one_cache_once_and_train_what_they_would_alone(
    alone, make_config, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="sdlora")
    shared = tmp_path / "cache"
    train(make_config, tmp_path / "first", shared, monkeypatch)
    train(make_config, tmp_path / "second", shared, monkeypatch)
    # Disk mode reads the same cache file, entry by entry.
    train(make_config, tmp_path / "disk", shared, monkeypatch, 'data.cache_latents="disk"')
    assert len(fills(caplog, "latents")) == 1 and len(fills(caplog, "text")) == 1
    reused = [r.message for r in caplog.records if "cache: reused" in r.message]
    assert len(reused) == 4  # latents and text, by the second and the third run
    for out in ("first", "second", "disk"):
        assert_same_run(tmp_path / out, alone)
    assert sorted(p.name for p in shared.iterdir() if p.is_dir()) == sorted(
        Path(m.split()[4]).name for m in fills(caplog, "latents") + fills(caplog, "text")
    )


def test_a_trial_at_another_resolution_does_not_share_the_latents(
    make_config, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="sdlora")
    shared = tmp_path / "cache"
    train(make_config, tmp_path / "a", shared, monkeypatch)
    train(make_config, tmp_path / "b", shared, monkeypatch, "data.resolution=32")
    assert len(fills(caplog, "latents")) == 2  # a second cache for the other size
    assert len(fills(caplog, "text")) == 1  # the captions and encoders are the same
    assert len(list(shared.glob("latents-*[!k]"))) == 2


KILLED_FILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from trainer.config import load as config
from trainer.data import shared_cache
from trainer.run import loop

save = shared_cache.save_file

def save_then_die(tensors, path):
    save(tensors, path)  # the tensors are written, key.json is not yet
    os.kill(os.getpid(), signal.SIGKILL)

shared_cache.save_file = save_then_die
loop.run(config.load({toml!r}, {sets!r}))
"""


def test_a_killed_filler_leaves_no_cache_a_later_trial_reads(
    alone, tiny_model, tiny_data, make_config, tmp_path, monkeypatch, caplog
):
    shared = tmp_path / "cache"
    sets = [
        f'model.pretrained="{tiny_model}"', f'data.path="{tiny_data}"',
        f'output_dir="{tmp_path / "killed"}"', 'logging.tracker="none"', *SHORT,
    ]  # fmt: skip
    script = KILLED_FILLER.format(repo=str(REPO), toml=str(REPO / "configs/tiny.toml"), sets=sets)
    env = dict(os.environ, HF_HUB_OFFLINE="1", **{CACHE_ENV: str(shared)})
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    assert [p.name.endswith(".tmp") for p in shared.iterdir() if p.is_dir()] == [True]
    caplog.set_level(logging.INFO, logger="sdlora")
    train(make_config, tmp_path / "after", shared, monkeypatch)
    assert len(fills(caplog, "latents")) == 1  # filled again, the half-written one unread
    assert not [p for p in shared.iterdir() if p.name.endswith(".tmp")]
    assert_same_run(tmp_path / "after", alone)


def test_a_cache_under_the_same_name_with_another_key_is_never_a_hit(
    alone, make_config, tmp_path, monkeypatch, caplog
):
    shared = tmp_path / "cache"
    train(make_config, tmp_path / "first", shared, monkeypatch)
    (folder,) = [p for p in shared.glob("latents-*") if p.is_dir()]
    key = folder / shared_cache.KEY_NAME
    ours = f'"format": {shared_cache.FORMAT}'
    key.write_text(key.read_text().replace(ours, '"format": 0'))
    caplog.set_level(logging.INFO, logger="sdlora")
    train(make_config, tmp_path / "second", shared, monkeypatch)
    assert len(fills(caplog, "latents")) == 1 and len(fills(caplog, "text")) == 0
    assert ours in key.read_text()  # filled again under its own key
    assert_same_run(tmp_path / "second", alone)
