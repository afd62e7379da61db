"""Real interruptions of a training process: SIGKILL at any moment, and SIGTERM.

Every run here is a subprocess of ``train.py`` with the same environment, so the reference
and the interrupted runs use the same threads and kernels and must agree to the bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import without_clock
from safetensors.torch import load_file

from trainer.lora.files import WEIGHTS_NAME
from trainer.report.tracking import read_metrics
from trainer.run.checkpoint import find_latest, list_checkpoints

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
SETTINGS = (
    "train.max_steps=30",
    "train.batch_size=2",
    "train.gradient_accumulation_steps=2",
    "data.random_flip=true",
    "data.caption_dropout=0.1",
    'lora.save_dtype="fp32"',
    "checkpoint.every_n_steps=2",
    'logging.tracker="none"',
)


def command(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    sets = [f'model.pretrained="{model}"', f'data.path="{data}"', f'output_dir="{out}"']
    sets += [*SETTINGS, *extra]
    args = [sys.executable, "train.py", "--config", "configs/tiny.toml"]
    return args + [x for s in sets for x in ("--set", s)]


def environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO)
    return env


def run_to_end(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, env=environment(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def start_and_signal(cmd: list[str], out: Path, sig: int, after_checkpoint: int):
    """Start training and send ``sig`` once a checkpoint past ``after_checkpoint`` exists."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        latest = find_latest(out)
        if latest and int(latest.name.split("-")[1]) >= after_checkpoint:
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    output, _ = proc.communicate(timeout=120)
    return proc.returncode, output


@pytest.fixture(scope="module")
def reference(tiny_model, tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_to_end(command(tiny_model, tiny_data, out))
    return out


def assert_same_run(out: Path, reference: Path) -> None:
    a, b = load_file(out / WEIGHTS_NAME), load_file(reference / WEIGHTS_NAME)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "final LoRA differs from the reference"
    assert without_clock(read_metrics(out)) == without_clock(read_metrics(reference))


def test_sigkill_mid_training_then_resume_latest_matches(
    reference, tiny_model, tiny_data, tmp_path
):
    out = tmp_path / "killed"
    cmd = command(tiny_model, tiny_data, out)
    code, _ = start_and_signal(cmd, out, signal.SIGKILL, after_checkpoint=6)
    if code == 0:
        pytest.skip("the run finished before the kill landed (machine too fast)")
    assert code == -signal.SIGKILL
    assert not (out / WEIGHTS_NAME).exists()
    killed_at = find_latest(out)
    assert killed_at is not None
    run_to_end([*cmd, "--resume", "latest"])
    assert_same_run(out, reference)


def test_sigterm_saves_prints_the_resume_command_and_resumes_exactly(
    reference, tiny_model, tiny_data, tmp_path
):
    out = tmp_path / "terminated"
    cmd = command(tiny_model, tiny_data, out)
    code, output = start_and_signal(cmd, out, signal.SIGTERM, after_checkpoint=4)
    if code == 0:
        pytest.skip("the run finished before the signal landed (machine too fast)")
    assert code == 130, output[-2000:]
    assert "--resume latest" in output and "train.py" in output
    stopped = int(find_latest(out).name.split("-")[1])
    assert stopped < 30 and read_metrics(out)[-1]["step"] == stopped
    run_to_end([*cmd, "--resume", "latest"])
    assert_same_run(out, reference)
    assert list_checkpoints(out)[-1].name == "step-000030"


def test_following_the_printed_resume_command_after_ctrl_c_ends_like_the_uninterrupted_run(
    reference, tiny_model, tiny_data, tmp_path
):
    """The command printed after Ctrl-C, pasted into a shell as is, continues this run (its
    --set flags included) in its output_dir, and ends bit for bit like the reference."""
    out = tmp_path / "interrupted"
    cmd = command(tiny_model, tiny_data, out)
    code, output = start_and_signal(cmd, out, signal.SIGINT, after_checkpoint=4)
    if code == 0:
        pytest.skip("the run finished before the signal landed (machine too fast)")
    assert code == 130, output[-2000:]
    printed = output.split("resume with:\n", 1)[1].splitlines()[0].strip()
    assert "--set" in printed and printed.endswith("--resume latest")
    done = subprocess.run(
        printed, shell=True, env=environment(), capture_output=True, text=True, cwd="/"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(out, reference)
