"""``sdlora lr-plot`` writes exactly the LRs that training applies, at every update of a
short run and at a bounded sample of a long one."""

from __future__ import annotations

import csv
import tracemalloc

import pytest

import schedulers
from schedulers import preview
from schedulers.base import Schedule
from trainer.commands import lr_plot
from trainer.commands.cli import main
from trainer.report.tracking import read_metrics
from trainer.run import loop


def csv_rows(path) -> list[list[float]]:
    with open(path) as f:
        reader = csv.reader(f)
        header = next(reader)
        assert header[0] == "step" and all(h.startswith("lr_") for h in header[1:])
        return [[float(x) for x in row[1:]] for row in reader]


def csv_names(path) -> list[str]:
    with open(path) as f:
        return [h.removeprefix("lr_") for h in next(csv.reader(f))[1:]]


def csv_steps(path) -> list[int]:
    with open(path) as f:
        return [int(row[0]) for row in list(csv.reader(f))[1:]]


def spy_on_png(monkeypatch) -> list:
    """Collect the figures ``lr-plot`` draws (the real drawing still runs and saves)."""
    figures = []
    draw = preview.write_png

    def spy(*args, **kwargs):
        figures.append(draw(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(preview, "write_png", spy)
    return figures


@pytest.mark.parametrize(
    "settings",
    [
        # max_steps, two param groups (UNet + text encoder with its own LR)
        (
            "train.max_steps=6",
            "lora.train_text_encoder=true",
            "train.text_encoder_lr=3e-4",
            'lr_scheduler.name="cosine"',
        ),
        # run length from epochs: 16 images, batch 2, accumulation 3 -> 2 epochs = 5 updates
        (
            "train.max_steps=0",
            "train.epochs=2",
            "train.batch_size=2",
            "train.gradient_accumulation_steps=3",
            'lr_scheduler.name="cosine_with_restarts"',
            "lr_scheduler.warmup_steps=1",
            "lr_scheduler.num_cycles=2",
        ),
        # LoRA+ and block multipliers: five named groups, one frozen block, a floor
        (
            "train.max_steps=5",
            "lora.plus_ratio=4.0",
            "lora.down_lr_weight=[1, 0.5, 0.5, 0, 2]",
            "lora.up_lr_weight=[0.5]",
            "lora.train_text_encoder=true",
            'lr_scheduler={name = "cosine", warmup_steps = 1, min_lr_ratio = 0.1}',
        ),
    ],
    ids=["max_steps-two-groups", "epochs-accumulation", "lora-plus-and-blocks"],
)
def test_csv_and_png_are_exactly_what_training_applies(
    make_config, tmp_path, settings, monkeypatch
):
    cfg = make_config(*settings)
    csv_path = tmp_path / "lr.csv"
    figures = spy_on_png(monkeypatch)
    lr_plot.run(cfg, str(csv_path), str(tmp_path / "lr.png"))
    result = loop.run(cfg)
    metrics = read_metrics(result.output_dir)
    applied = [r["lr"] for r in metrics]
    assert csv_rows(csv_path) == applied
    assert csv_names(csv_path) == metrics[0]["lr_groups"] == cfg.lr_group_names()
    assert len(applied) == result.updates
    # The plot: one line per param group, at the steps the CSV and metrics.jsonl number.
    (fig,) = figures
    lines = fig.axes[0].get_lines()
    assert len(lines) == len(cfg.base_lrs())
    for group, line in enumerate(lines):
        assert list(line.get_xdata()) == csv_steps(csv_path) == [r["step"] for r in metrics]
        assert list(line.get_ydata()) == [lrs[group] for lrs in applied]


def test_png_labels_every_param_group_of_every_schedule(make_config, tmp_path, monkeypatch):
    cfg = make_config(
        "train.max_steps=12", "lora.train_text_encoder=true", "train.text_encoder_lr=3e-4"
    )
    figures = spy_on_png(monkeypatch)
    csv_path = tmp_path / "lr.csv"
    lr_plot.run(cfg, str(csv_path), str(tmp_path / "lr.png"), compare=["linear"])
    (fig,) = figures
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == [
        "cosine (unet)",
        "cosine (text_encoder)",
        "linear (unet)",
        "linear (text_encoder)",
    ]
    rows = csv_rows(csv_path)
    for group in (0, 1):
        assert list(lines[group].get_ydata()) == [r[group] for r in rows]
    assert max(lines[1].get_ydata()) == pytest.approx(3e-4)  # the text encoder's own LR
    assert max(lines[3].get_ydata()) == pytest.approx(3e-4)  # in the compared schedule too
    assert "0.0003 (text_encoder)" in fig.axes[0].get_title()


def test_processes_shorten_an_epoch_based_run(make_config):
    cfg = make_config("train.max_steps=0", "train.epochs=3", "train.batch_size=2")
    # 16 images / (2 × P) micro-batches per epoch, accumulation 2 (tiny.toml)
    assert lr_plot.total_updates(cfg, 1) == 3 * 8 // 2
    assert lr_plot.total_updates(cfg, 2) == 3 * 4 // 2
    assert lr_plot.total_updates(cfg, 1, examples=40) == 3 * 20 // 2


def test_cli_writes_csv_and_png_with_comparisons(
    make_config, tiny_model, tiny_data, tmp_path, capsys
):
    csv_path, png_path = tmp_path / "lr.csv", tmp_path / "lr.png"
    args = ["lr-plot", "--config", "configs/tiny.toml", "--csv", str(csv_path)]
    args += ["--png", str(png_path), "--compare", "linear", "cosine_with_restarts:num_cycles=3"]
    args += ["--set", f'model.pretrained="{tiny_model}"', "--set", f'data.path="{tiny_data}"']
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "cosine: 40 optimizer updates" in out
    assert len(csv_rows(csv_path)) == 40
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_an_unknown_compare_schedule(tiny_model, tiny_data, tmp_path, capsys):
    args = ["lr-plot", "--config", "configs/tiny.toml", "--png", str(tmp_path / "x.png")]
    args += ["--compare", "cosin", "--set", f'model.pretrained="{tiny_model}"']
    args += ["--set", f'data.path="{tiny_data}"']
    assert main(args) == 2
    assert "cosine" in capsys.readouterr().err


def test_warmup_longer_than_an_epoch_based_run_is_a_config_error(make_config, capsys):
    cfg = make_config("train.max_steps=0", "train.epochs=1", "lr_scheduler.warmup_steps=50")
    from trainer.config.load import ConfigError

    with pytest.raises(ConfigError, match="warmup"):
        lr_plot.run(cfg, None, None)
    with pytest.raises(ConfigError, match="warmup"):
        loop.run(cfg)


def count_evaluations(monkeypatch, limit: int) -> list[int]:
    """Count ``Schedule.lrs`` calls (what a plotted update costs), failing past ``limit``."""
    calls = [0]
    lrs = Schedule.lrs

    def counted(self, step, total_steps, base_lrs):
        calls[0] += 1
        assert calls[0] <= limit, f"more than {limit} schedule evaluations"
        return lrs(self, step, total_steps, base_lrs)

    monkeypatch.setattr(Schedule, "lrs", counted)
    return calls


def test_a_ten_million_update_run_is_sampled_with_bounded_work(make_config, tmp_path, monkeypatch):
    """10,000,000 updates took 42 s, 3.2 GB and wrote a 293 MB CSV; now at most MAX_ROWS rows
    per curve, with the first and last updates, the warmup's end and each restart exactly."""
    total = 10_000_000
    cfg = make_config(
        f"train.max_steps={total}",
        'lr_scheduler={name = "cosine_with_restarts", num_cycles = 3, warmup_steps = 0.01}',
        "lora.train_text_encoder=true",
        "train.text_encoder_lr=3e-4",
    )
    csv_path = tmp_path / "lr.csv"
    figures = spy_on_png(monkeypatch)
    calls = count_evaluations(monkeypatch, limit=2 * 12_000)  # two curves: cosine and linear
    tracemalloc.start()
    try:
        text = lr_plot.run(cfg, str(csv_path), str(tmp_path / "lr.png"), compare=["linear"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    monkeypatch.undo()
    assert peak < 64 * 1024**2, f"{peak / 1024**2:.0f} MiB traced"
    steps, rows = csv_steps(csv_path), csv_rows(csv_path)
    assert preview.MAX_ROWS * 0.9 < len(steps) <= preview.MAX_ROWS, calls
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == total
    # Written exactly: each row is the LR training sets at that update (step N is index N - 1).
    assert rows == [cfg.lr_scheduler.lrs(n - 1, total, cfg.base_lrs()) for n in steps]
    # The warmup's last update and the peak after it, and both sides of each restart: warmup
    # round(0.01 * total) updates, then 3 cycles of (total - warmup) / 3 updates each.
    warmup = total // 100
    cycle = (total - warmup) // 3
    for index in (warmup, warmup + cycle, warmup + 2 * cycle):
        assert {index, index + 1} <= set(steps), index
    restart = steps.index(warmup + cycle + 1)
    assert rows[restart - 1][0] < 1e-9 and rows[restart][0] == pytest.approx(1e-3)
    assert f"{len(steps):,} of 10,000,000 updates: every " in text
    (fig,) = figures
    lines = fig.axes[0].get_lines()
    assert list(lines[0].get_xdata()) == steps and len(lines) == 4
    assert all(len(line.get_xdata()) <= preview.MAX_ROWS for line in lines)
    assert "drawn" in fig.axes[0].get_title()


@pytest.mark.parametrize(
    "table",
    [
        {"name": "multistep", "milestones": [333, 334, 777], "gamma": 0.5},
        {"name": "step", "step_size": 250, "gamma": 0.5, "warmup_steps": 40},
        {"name": "cosine_with_restarts", "first_cycle_steps": 301, "cycle_mult": 1.5},
    ],
    ids=["multistep", "step", "restarts-growing"],
)
def test_sampling_keeps_both_sides_of_every_jump(table):
    """Against the curve at every update: each update where the LR changes by more than a
    percent of the base LR is shown with the update before it."""
    schedule = schedulers.from_table(table)
    total, base = 5000, [1e-3, 3e-4]
    full = preview.lr_curve(schedule, total, base)
    curve = preview.sample_curve(schedule, total, base, max_rows=500)
    assert len(curve.steps) <= 500 and curve.stride > 1
    assert curve.rows == [full[n - 1] for n in curve.steps]
    jumps = [i for i in range(1, total) if abs(full[i][0] - full[i - 1][0]) > 1e-5]
    assert jumps, "the reference curve has jumps"
    for i in jumps:
        assert {i, i + 1} <= set(curve.steps), f"update {i + 1}"


def test_a_run_of_max_rows_is_every_update():
    schedule = schedulers.get("cosine")(warmup_steps=3)
    curve = preview.sample_curve(schedule, 300, [1e-4], max_rows=300)
    assert curve.steps == list(range(1, 301)) and curve.stride == 1 and curve.note == ""
    assert curve.rows == preview.lr_curve(schedule, 300, [1e-4])
