"""A sweep over the tiny SD 3.5, checked as the SD and SDXL sweeps are: every trial completes
as an ordinary training run in its own process, applies exactly the LRs `sdlora lr-plot`
computes for its config (three param groups: the transformer and both CLIPs), and the summary
reports its fixed-σ validation loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sweep_helpers import LAUNCH, run_sweep, summary, sweep_command

from trainer.commands import cli
from trainer.sweep.results import read_metrics

pytestmark = pytest.mark.slow


def test_an_sd3_sweep_of_two_schedules_runs_every_trial_on_its_schedule(
    tiny_sd3, tiny_data, tmp_path
):
    spec = tmp_path / "spec"
    spec.mkdir()
    (spec / "base.toml").write_text(
        f"""output_dir = "unused"
[model]
pretrained = "{tiny_sd3}"
t5_max_length = 16
[lora]
train_text_encoder = true
train_text_encoder_2 = true
[data]
path = "{tiny_data}"
resolution = 64
[train]
batch_size = 2
max_steps = 4
learning_rate = 1e-3
text_encoder_lr = 5e-4
text_encoder_2_lr = 2e-4
[validation]
fraction = 0.125
every_n_steps = 2
timesteps = 2
[logging]
tracker = "none"
"""
    )
    sweep = spec / "sd3.toml"
    sweep.write_text(
        f'base = "base.toml"\nname = "sd3"\nlaunch = {LAUNCH}\n\n[grid]\nlr_scheduler = [\n'
        '  { name = "constant" },\n  { name = "cosine", warmup_steps = 1 },\n]\n'
    )
    out = tmp_path / "sweep"
    run_sweep(sweep_command(sweep, out), tmp_path / "worker.log")

    rows = summary(out)
    assert len(rows) == 2
    assert all(r["state"] == "complete" and r["updates"] == "4" for r in rows.values())
    curves = []
    for row in rows.values():
        folder = Path(row["folder"])
        csv_path = tmp_path / f"{folder.name}.csv"
        config = str(folder / "config.toml")
        assert cli.main(["lr-plot", "--config", config, "--csv", str(csv_path)]) == 0
        lines = csv_path.read_text().splitlines()[1:]
        expected = [[float(x) for x in line.split(",")[1:]] for line in lines]
        records = read_metrics(folder)
        assert [r["lr"] for r in records] == expected
        assert all(len(lrs) == 3 for lrs in expected)
        curves.append(expected)
        assert float(row["final_val_loss"]) == pytest.approx(records[-1]["val_loss"], rel=1e-5)
        state = json.loads(next(folder.glob("checkpoints/step-*/trainer_state.json")).read_text())
        assert state["architecture"] == "sd3"
    assert curves[0] != curves[1], "the two trials ran two schedules"
