"""Warm workers (``trainer/sweep/warm.py``): a worker runs its single-process trials in its own
process. Each trial must train exactly what its own training process trains (checked against
a sweep with ``warm_workers = false``, to the bit), survive a killed worker like a cold trial,
and a trial that raises must fail alone."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import without_clock
from safetensors.torch import load_file
from sweep_helpers import LAUNCH, run_sweep, start, summary, sweep_command

from trainer.commands import cli
from trainer.config.load import ModelConfig
from trainer.lora.files import WEIGHTS_NAME
from trainer.models import pristine
from trainer.models.load import load_components
from trainer.report.tracking import read_metrics
from trainer.run import loop
from trainer.run.checkpoint import find_latest
from trainer.sweep import spec, warm

pytestmark = pytest.mark.slow
# Constant and WSD without warmup apply the same LR until WSD decays (its second half): they
# share a stem to update 3, so stems run warm too.
SCHEDULES = ('{ name = "constant" }', '{ name = "warmup_stable_decay", decay_ratio = 0.5 }')
VALUE_COLUMNS = ("state", "final_val_loss", "best_val_loss", "final_train_loss", "updates")
WARM_LINE = "(in the sweep worker's process)"


def write_sweep(folder: Path, model: Path, data: Path, warm_workers: bool | None) -> Path:
    """Two schedules × two seeds, 8 updates each; ``warm_workers`` None leaves the default."""
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
[output]
save_dtype = "fp32"
[validation]
fraction = 0.125
every_n_steps = 2
timesteps = 2
[checkpoint]
every_n_steps = 2
[logging]
tracker = "none"
"""
    )
    lines = ['base = "base.toml"', "seeds = [0, 1]", f"launch = {LAUNCH}"]
    if warm_workers is not None:
        lines.append(f"warm_workers = {str(warm_workers).lower()}")
    lines += ["", "[grid]", f"lr_scheduler = [{', '.join(SCHEDULES)}]", ""]
    path = folder / "sweep.toml"
    path.write_text("\n".join(lines))
    return path


def trial_folders(out: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((out / "trials").iterdir()) if p.is_dir()}


def assert_same_sweep(out: Path, reference: Path) -> None:
    """Bitwise the same LoRAs and metrics.jsonl values (but the clock), the same summary."""
    mine, ref = trial_folders(out), trial_folders(reference)
    assert mine.keys() == ref.keys() and len(mine) == 4
    for name in ref:
        a, b = load_file(mine[name] / WEIGHTS_NAME), load_file(ref[name] / WEIGHTS_NAME)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: the LoRA differs"
        assert without_clock(read_metrics(mine[name])) == without_clock(read_metrics(ref[name]))
    rows, ref_rows = summary(out), summary(reference)
    assert rows.keys() == ref_rows.keys()
    for key, row in rows.items():
        assert [row[c] for c in VALUE_COLUMNS] == [ref_rows[key][c] for c in VALUE_COLUMNS]


@pytest.fixture(scope="module")
def warm_sweep(tiny_model, tiny_data, tmp_path_factory) -> Path:
    """The sweep with the shipped default (warm), run once by one worker."""
    folder = tmp_path_factory.mktemp("warm")
    out = folder / "out"
    run_sweep(sweep_command(write_sweep(folder, tiny_model, tiny_data, None), out),
              folder / "worker.log")  # fmt: skip
    return out


def test_warm_trials_equal_cold_trials_bit_for_bit(warm_sweep, tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    run_sweep(sweep_command(write_sweep(tmp_path, tiny_model, tiny_data, False), out),
              tmp_path / "worker.log")  # fmt: skip
    assert_same_sweep(warm_sweep, out)
    # Each ran as it says: in the worker's process (no training process registered a pid), or
    # as a process of its own; the stem too.
    for folder in [*trial_folders(warm_sweep).values(), *(warm_sweep / "stems").glob("*/")]:
        assert WARM_LINE in (folder / "train.log").read_text()
    assert not list((warm_sweep / "locks").glob("*.pids"))
    assert list((out / "stems").glob("*/")) and list((out / "locks").glob("*.pids"))
    for folder in trial_folders(out).values():
        assert WARM_LINE not in (folder / "train.log").read_text()


def test_a_killed_warm_worker_resumes_to_the_uninterrupted_result(
    warm_sweep, tiny_model, tiny_data, tmp_path
):
    sweep = write_sweep(tmp_path, tiny_model, tiny_data, True)
    out = tmp_path / "out"
    worker = start(sweep_command(sweep, out), tmp_path / "killed.log")
    deadline, victim = time.monotonic() + 300, None
    while time.monotonic() < deadline and worker.poll() is None and victim is None:
        for folder in trial_folders(out).values() if (out / "trials").is_dir() else []:
            latest = find_latest(folder)
            # Past a stem's branch point: the trial's own training has saved a checkpoint.
            if latest is not None and int(latest.name.split("-")[1]) >= 4:
                victim = folder
                break
        time.sleep(0.01)
    assert victim is not None, (tmp_path / "killed.log").read_text()[-3000:]
    os.killpg(worker.pid, signal.SIGKILL)  # the worker is the training process: one kill
    worker.wait()
    assert not (victim / "manifest.json").exists(), "the run finished before the kill landed"
    latest = find_latest(victim)
    assert latest is not None
    killed_at = int(latest.name.split("-")[1])

    run_sweep(sweep_command(sweep, out), tmp_path / "rerun.log")
    assert f"resuming at {killed_at}" in (victim / "train.log").read_text()
    assert "its worker is gone" in (tmp_path / "rerun.log").read_text()
    assert_same_sweep(out, warm_sweep)


def test_a_trial_that_raises_fails_alone_and_the_worker_is_left_as_it_was(
    tiny_model, tiny_data, tmp_path, monkeypatch
):
    """The worker runs in this process; one trial's setup raises."""
    sweep = write_sweep(tmp_path, tiny_model, tiny_data, None)
    setup = loop.setup

    def failing(config, *args, **kwargs):
        if "constant" in str(config.output_dir) and "seed0" in str(config.output_dir):
            raise RuntimeError("a bug in one trial")
        return setup(config, *args, **kwargs)

    monkeypatch.setattr(loop, "setup", failing)
    environ, threads = dict(os.environ), torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger().handlers[:]
    out = tmp_path / "out"
    assert cli.main(["sweep", str(sweep), "--out", str(out)]) == 1
    rows = {key: r["state"] for key, r in summary(out).items()}
    failed = [key for key, state in rows.items() if state == "failed"]
    assert len(failed) == 1 and failed[0][0] == "constant", rows
    assert sorted(rows.values()) == ["complete", "complete", "complete", "failed"]
    log = next(f for n, f in trial_folders(out).items() if "constant" in n and "seed0" in n)
    text = (log / "train.log").read_text()
    assert WARM_LINE in text and "RuntimeError: a bug in one trial" in text
    assert dict(os.environ) == environ and torch.get_num_threads() == threads
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert logging.getLogger().handlers == root


def test_launch_flags_for_several_processes_keep_trials_cold(tiny_model, tiny_data, tmp_path):
    sweep = spec.load(write_sweep(tmp_path, tiny_model, tiny_data, None), str(tmp_path / "o"))
    assert sweep.file.warm_workers is True  # the shipped default
    assert warm.launch_env(["--num_processes", "2", "--cpu"]) is None
    one = warm.launch_env(["--num_processes", "1", "--num_cpu_threads_per_process", "3"])
    assert one is not None and one["OMP_NUM_THREADS"] == "3"


def test_the_kept_model_is_copied_per_run_and_reloaded_when_its_files_change(tiny_model):
    """What one run does to its parts never reaches the next; a rewritten model is reloaded."""
    model = ModelConfig(pretrained=str(tiny_model))
    fresh = load_components(model, torch.float32, "sd1")
    with pristine.kept():
        first = pristine.load_components(model, torch.float32, "sd1")
        with torch.no_grad():
            for p in first.unet.parameters():
                p.add_(1.0)
        second = pristine.load_components(model, torch.float32, "sd1")
        assert second.unet is not first.unet
        reference = fresh.unet.state_dict()
        assert all(torch.equal(v, reference[k]) for k, v in second.unet.state_dict().items())
        kept = next(iter(pristine._memo.values()))
        weights = next(tiny_model.glob("unet/*.safetensors"))
        times = (weights.stat().st_atime_ns, weights.stat().st_mtime_ns)
        os.utime(weights, ns=(times[0], times[1] + 1))
        try:
            pristine.load_components(model, torch.float32, "sd1")
            assert next(iter(pristine._memo.values())) is not kept  # loaded again
        finally:
            os.utime(weights, ns=times)  # the session's model, as the other tests know it
    # Off again: a plain load, nothing kept for it.
    assert pristine._key(model, torch.float32, "sd1") is not None
    assert pristine.load_components(model, torch.float32, "sd1").unet is not second.unet
