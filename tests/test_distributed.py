"""Two CPU processes (gloo) against one: the global batch, not the process count, decides.

Each example draws its noise and timestep from its own seed, so 2 processes × batch 2 must
train the same LoRA as 1 process × batch 4, up to the order of float reductions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.checkpoint import step_dir
from trainer.lora import WEIGHTS_NAME
from trainer.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not built in"
)


def launch(model, data, out, processes: int, batch: int, *extra: str) -> None:
    sets = [
        f'model.pretrained="{model}"',
        f'data.path="{data}"',
        f'output_dir="{out}"',
        f"train.batch_size={batch}",
        "train.gradient_accumulation_steps=1",
        "train.max_steps=6",
        'lora.save_dtype="fp32"',
        'logging.tracker="none"',
        "checkpoint.every_n_steps=3",
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


@pytest.fixture(scope="module")
def two_processes(tiny_model, tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two")
    launch(tiny_model, tiny_data, out, 2, 2)
    return out


def test_two_processes_train_like_one_process_with_the_same_global_batch(
    two_processes, tiny_model, tiny_data, tmp_path
):
    launch(tiny_model, tiny_data, tmp_path, 1, 4)
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
    launch(tiny_model, tiny_data, tmp_path / "out", 2, 2, f'checkpoint.resume="{start}"')
    a = load_file(tmp_path / "out" / WEIGHTS_NAME)
    b = load_file(two_processes / WEIGHTS_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(tmp_path / "out") == read_metrics(two_processes)[3:]
