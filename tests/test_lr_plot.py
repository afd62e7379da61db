"""``sdlora lr-plot`` writes exactly the LRs that training applies."""

from __future__ import annotations

import csv

import pytest

from schedulers import preview
from trainer import loop, lr_plot
from trainer.cli import main
from trainer.tracking import read_metrics


def csv_rows(path) -> list[list[float]]:
    with open(path) as f:
        reader = csv.reader(f)
        header = next(reader)
        assert header[0] == "step" and header[1:] == [f"lr_{i}" for i in range(len(header) - 1)]
        return [[float(x) for x in row[1:]] for row in reader]


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
    ],
    ids=["max_steps-two-groups", "epochs-accumulation"],
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
        "cosine (UNet)",
        "cosine (text encoder)",
        "linear (UNet)",
        "linear (text encoder)",
    ]
    rows = csv_rows(csv_path)
    for group in (0, 1):
        assert list(lines[group].get_ydata()) == [r[group] for r in rows]
    assert max(lines[1].get_ydata()) == pytest.approx(3e-4)  # the text encoder's own LR
    assert max(lines[3].get_ydata()) == pytest.approx(3e-4)  # in the compared schedule too
    assert "0.0003 (text encoder)" in fig.axes[0].get_title()


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
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="warmup"):
        lr_plot.run(cfg, None, None)
    with pytest.raises(ConfigError, match="warmup"):
        loop.run(cfg)
