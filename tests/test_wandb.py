"""wandb as the tracker: one wandb run per output_dir, continued by every resume, with its
files in the run's logs/ folder (wandb in offline mode: it writes what it would upload)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from trainer.config.load import ConfigError
from trainer.report.tracking import LOGS_DIR, WANDB_RUN_NAME
from trainer.run import loop

WANDB = ('logging.tracker="wandb"', 'logging.project="tiny-wandb"', "checkpoint.every_n_steps=2")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """wandb offline, started from a working directory the test watches."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def run_ids(output: Path) -> set[str]:
    """The run ids of the wandb sessions that wrote into ``output``: offline-run-<time>-<id>."""
    return {f.name.split("-", 3)[3] for f in (output / LOGS_DIR / "wandb").glob("offline-run-*")}


def test_a_resumed_run_continues_its_wandb_run(make_config, tmp_path, offline):
    out = tmp_path / "run"
    loop.run(make_config(*WANDB, "train.max_steps=2", output=out))
    first = json.loads((out / LOGS_DIR / WANDB_RUN_NAME).read_text())["id"]
    assert run_ids(out) == {first}

    resumed = make_config(
        *WANDB,
        "train.max_steps=4",
        'checkpoint.resume="latest"',
        'checkpoint.allow_change=["max_steps"]',
        output=out,
    )
    assert loop.run(resumed).updates == 4
    # wandb names the second session's folder <id>-1 ("resumed"); the id is the first's.
    assert json.loads((out / LOGS_DIR / WANDB_RUN_NAME).read_text())["id"] == first
    sessions = sorted((out / LOGS_DIR / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2
    assert all(f"-{first}" in s.name for s in sessions)
    assert list(offline.iterdir()) == [], "wandb wrote into the working directory"


def test_a_fresh_run_gets_its_own_wandb_run(make_config, tmp_path, offline):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        loop.run(make_config(*WANDB, "train.max_steps=1", output=out))
    id_a = json.loads((a / LOGS_DIR / WANDB_RUN_NAME).read_text())["id"]
    id_b = json.loads((b / LOGS_DIR / WANDB_RUN_NAME).read_text())["id"]
    assert id_a != id_b
    assert run_ids(a) == {id_a} and run_ids(b) == {id_b}


def test_wandb_not_installed_is_a_config_error_naming_the_extra(make_config, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError) as err:
        make_config('logging.tracker="wandb"')
    assert "logging.tracker" in str(err.value) and "sdlora[wandb]" in str(err.value)
