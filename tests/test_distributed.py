"""Two CPU processes (gloo) against one: the global batch, not the process count, decides.

Each example draws its noise and timestep from its own seed, so 2 processes × batch 2 must
train the same LoRA as 1 process × batch 4, up to the order of float reductions.

Every launch here keeps the shipped tracker (tensorboard): a test that turned it off hid a
crash at the end of every multi-process run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import without_clock
from safetensors.torch import load_file

from trainer.lora.files import WEIGHTS_NAME
from trainer.report.tracking import read_metrics
from trainer.run.checkpoint import step_dir

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available(), reason="torch.distributed is not built in"
    ),
    pytest.mark.slow,
]


SHORT = (
    "train.gradient_accumulation_steps=1",
    "train.max_steps=6",
    'lora.save_dtype="fp32"',
    "checkpoint.every_n_steps=3",
)


def launch(model, data, out, processes: int, batch: int, *extra: str) -> str:
    """``accelerate launch ... train.py --config configs/tiny.toml`` with the paths set; returns
    what it printed (stdout, then stderr)."""
    sets = [
        f'model.pretrained="{model}"',
        f'data.path="{data}"',
        f'output_dir="{out}"',
        f"train.batch_size={batch}",
        *extra,
    ]
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if processes > 1:  # the example config shipped in docker/ (MULTI_CPU over gloo)
        launcher += ["--config_file", str(REPO / "docker" / "accelerate" / "cpu2.yaml")]
        launcher += ["--num_processes", str(processes), "--main_process_port", "0"]
    else:
        launcher += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no"]
        launcher += ["--dynamo_backend", "no"]
    launcher += ["--num_cpu_threads_per_process", "1"]
    cmd = [*launcher, "train.py", "--config", "configs/tiny.toml"]
    cmd += [x for s in sets for x in ("--set", s)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "gemm_4bit" not in done.stderr, "bitsandbytes' CPU-kernel warning is not silenced"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def two_processes(tiny_model, tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two")
    launch(tiny_model, tiny_data, out, 2, 2, *SHORT)
    return out


def test_two_processes_train_like_one_process_with_the_same_global_batch(
    two_processes, tiny_model, tiny_data, tmp_path
):
    launch(tiny_model, tiny_data, tmp_path, 1, 4, *SHORT)
    one, two = read_metrics(tmp_path), read_metrics(two_processes)
    assert [r["step"] for r in two] == list(range(1, 7)), "one metrics line per update"
    assert [r["lr"] for r in one] == [r["lr"] for r in two], "the LR is not scaled by processes"
    assert [r["samples"] for r in one] == [r["samples"] for r in two]
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in two], rel=1e-5)
    a, b = load_file(tmp_path / WEIGHTS_NAME), load_file(two_processes / WEIGHTS_NAME)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-6)


def test_two_process_resume_is_bitwise_exact(two_processes, tiny_model, tiny_data, tmp_path):
    start = tmp_path / "start"
    shutil.copytree(step_dir(two_processes, 3), start)
    resume = f'checkpoint.resume="{start}"'
    launch(tiny_model, tiny_data, tmp_path / "out", 2, 2, *SHORT, resume)
    a = load_file(tmp_path / "out" / WEIGHTS_NAME)
    b = load_file(two_processes / WEIGHTS_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = without_clock(read_metrics(tmp_path / "out"))
    assert resumed == without_clock(read_metrics(two_processes))[3:]


def test_two_processes_finish_a_killed_run_and_say_so_once(
    two_processes, tiny_model, tiny_data, tmp_path
):
    """Killed while writing its final weights: the rerun with --resume latest rewrites them
    from the last checkpoint, and each decision is printed once, not once per process."""
    out = tmp_path / "out"
    shutil.copytree(two_processes, out)
    weights = out / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    printed = launch(tiny_model, tiny_data, out, 2, 2, *SHORT, 'checkpoint.resume="latest"')
    assert printed.count("final outputs incomplete") == 1, printed[-3000:]
    assert printed.count("already trained") == 1, printed[-3000:]
    a, b = load_file(weights), load_file(two_processes / WEIGHTS_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_shipped_tiny_config_runs_on_two_processes(tiny_model, tiny_data, tmp_path):
    """The issue's reproduction, as is: two gloo processes, configs/tiny.toml with its
    tensorboard tracker, only the batch halved; it must exit 0 with the 1-process LRs."""
    two, one = tmp_path / "two", tmp_path / "one"
    launch(tiny_model, tiny_data, two, 2, 2)
    launch(tiny_model, tiny_data, one, 1, 4)
    lrs = [r["lr"] for r in read_metrics(two)]
    assert len(lrs) == 40 and lrs == [r["lr"] for r in read_metrics(one)]
    # The tracker got the loss of every update before the process group was torn down.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for folder in {p.parent for p in (two / "logs").rglob("events.out.tfevents.*")}:
        board = EventAccumulator(str(folder))
        board.Reload()
        if "train/loss" in board.Tags()["scalars"]:
            steps += [e.step for e in board.Scalars("train/loss")]
    assert sorted(steps) == list(range(1, 41))
