"""Helpers of the sweep tests: a small sweep on the tiny model, run as real worker processes."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = (
    '["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", '
    '"--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]'
)
SCHEDULES = (
    '{ name = "constant" }',
    '{ name = "cosine", warmup_steps = 2, min_lr_ratio = 0.1 }',
    '{ name = "cosine_with_restarts", num_cycles = 2 }',
)


def write_sweep(folder: Path, model: Path, data: Path, name: str = "three") -> Path:
    """A base config and a 3-trial grid over three LR schedules (8 updates each)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.toml").write_text(
        f"""output_dir = "unused"
[model]
pretrained = "{model}"
[data]
path = "{data}"
resolution = 64
[train]
batch_size = 2
max_steps = 8
learning_rate = 1e-3
[validation]
fraction = 0.125
every_n_steps = 2
timesteps = 2
prompts = ["a red circle", "a blue square"]
sample_steps = 2
[checkpoint]
every_n_steps = 2
[logging]
tracker = "none"
"""
    )
    sweep = folder / f"{name}.toml"
    sweep.write_text(
        f'base = "base.toml"\nname = "{name}"\nlaunch = {LAUNCH}\n\n[grid]\nlr_scheduler = [\n'
        + "".join(f"  {s},\n" for s in SCHEDULES)
        + "]\n"
    )
    return sweep


def environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO)
    return env


def sweep_command(sweep: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trainer.commands.cli",
        "sweep",
        str(sweep),
        "--out",
        str(out),
        *extra,
    ]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """A worker in its own session (so a test can kill it and all it started)."""
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd, cwd=REPO, env=environment(), stdout=f, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def run_sweep(cmd: list[str], log: Path) -> None:
    proc = start(cmd, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]


def summary(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(out / "summary.csv") as f:
        return {(r["trial"], r["seed"]): r for r in csv.DictReader(f)}


def need(what: str, found: object) -> None:
    """Skip where a system tool is missing, but fail in CI, which must install it."""
    if not found:
        message = f"{what} is not installed (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl are (Debian keeps them off PATH)."""
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates = [Path(out.stdout.strip())]
    except OSError:
        candidates = []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")
