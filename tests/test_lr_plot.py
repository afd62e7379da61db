"""``sdlora lr-plot`` writes exactly the LRs that training applies."""

from __future__ import annotations

import csv

import pytest

from trainer import loop, lr_plot
from trainer.cli import main
from trainer.tracking import read_metrics


def csv_rows(path) -> list[list[float]]:
    with open(path) as f:
        reader = csv.reader(f)
        header = next(reader)
        assert header[0] == "step" and header[1:] == [f"lr_{i}" for i in range(len(header) - 1)]
        return [[float(x) for x in row[1:]] for row in reader]


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
def test_csv_is_exactly_what_training_applies(make_config, tmp_path, settings):
    cfg = make_config(*settings)
    csv_path = tmp_path / "lr.csv"
    lr_plot.run(cfg, str(csv_path), None)
    result = loop.run(cfg)
    applied = [r["lr"] for r in read_metrics(result.output_dir)]
    assert csv_rows(csv_path) == applied
    assert len(applied) == result.updates


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
