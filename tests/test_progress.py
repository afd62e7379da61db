"""The progress line: what it shows for each update is that update's metrics.jsonl record."""

from __future__ import annotations

import re

import pytest

from trainer.report import progress
from trainer.report.progress import format_duration, format_loss, format_lrs, smoothed
from trainer.report.tracking import read_metrics
from trainer.run import loop

LINE = re.compile(
    r"(?P<n>\d+)/(?P<total>\d+), loss (?P<loss>\S+) ema (?P<ema>\S+) \| lr (?P<lr>\S+) \| "
    r"epoch (?P<epoch>\d+)/(?P<epochs>\d+) \| (?P<ups>\S+) upd/s (?P<ips>\S+) img/s \| "
    r"(?P<elapsed>[\dd :]+)<(?P<eta>[\dd :]+) \| peak (?P<peak>\S+ \S+) (?P<kind>RSS|VRAM)"
    r"(?: \| val (?P<val>\S+)@(?P<val_step>\d+))?"
)


def shown_lines(text: str) -> dict[int, dict[str, str]]:
    """The last progress line drawn for each update, from a captured stderr."""
    lines = {}
    for chunk in re.split(r"[\r\n]", text):
        match = LINE.search(chunk)
        if match:
            lines[int(match["n"])] = match.groupdict()
    return lines


def expected_line(records: list[dict], step: int) -> dict[str, str]:
    """What the line must show at ``step``, worked out from metrics.jsonl alone."""
    record = records[step - 1]
    scored = [r for r in records[:step] if "val_loss" in r]
    return {
        "loss": format_loss(record["loss"]),
        "ema": format_loss(smoothed(r["loss"] for r in records[:step])[-1]),
        "lr": format_lrs(record["lr"]),
        "epoch": str(record["epoch"] + 1),
        "elapsed": format_duration(record["elapsed"]),
        "val": format_loss(scored[-1]["val_loss"]) if scored else None,
        "val_step": str(scored[-1]["step"]) if scored else None,
    }


def test_the_line_shows_the_update_just_done_as_metrics_jsonl_records_it(
    make_config, capfd, every_update_drawn
):
    cfg = make_config(
        'logging.tracker="tensorboard"',
        "train.max_steps=5",
        "lora.train_text_encoder=true",
        "train.text_encoder_lr=5e-5",
        "validation.fraction=0.25",
        "validation.every_n_steps=2",
    )
    loop.run(cfg)
    lines = shown_lines(capfd.readouterr().err)
    records = read_metrics(cfg.output_dir)
    assert sorted(lines) == [1, 2, 3, 4, 5], "a line for every update"
    for step, shown in lines.items():
        expected = expected_line(records, step)
        assert {k: shown[k] for k in expected} == expected, f"update {step}"
        assert shown["total"] == "5" and "/" in shown["lr"], "both param groups' LRs"
        assert float(shown["ups"]) > 0 and float(shown["ips"]) > 0
    assert lines[1]["val"] is None and lines[2]["val_step"] == "2" and lines[5]["val_step"] == "5"


def test_smoothed_loss_is_a_bias_corrected_ema():
    beta = progress.LOSS_EMA_BETA
    assert smoothed([2.0]) == [2.0], "no pull towards 0 at the start"
    assert smoothed([3.0] * 50) == pytest.approx([3.0] * 50)
    losses = [1.0, 0.5, 0.25]
    raw, expected = 0.0, []
    for t, loss in enumerate(losses, 1):
        raw = beta * raw + (1 - beta) * loss
        expected.append(raw / (1 - beta**t))
    assert smoothed(losses) == pytest.approx(expected)


@pytest.mark.parametrize(
    "update, total, every, left",
    [(0, 10, 0, 1), (0, 10, 5, 2), (0, 10, 3, 4), (3, 10, 3, 3), (9, 10, 3, 1), (10, 10, 3, 0)],
)
def test_validation_points_left_count_every_n_and_the_last(update, total, every, left):
    points = {s for s in range(update + 1, total + 1) if s == total or (every and s % every == 0)}
    assert progress.validation_points_left(update, total, every) == left == len(points)


def test_durations_and_sizes_read_like_tqdm():
    assert format_duration(0) == "0:00:00"
    assert format_duration(3725.4) == "1:02:05"
    assert format_duration(2 * 86400 + 61) == "2d 0:01:01"
    assert progress.format_bytes(3 * 1024**3) == "3.00 GiB"
    assert progress.format_bytes(5 * 1024**2) == "5 MiB"


VALUES = progress.LineValues(
    loss=0.1234, loss_ema=0.1301, lrs=[1e-4, 5e-5], epoch=2, epochs=10, updates_per_s=1.52,
    images_per_s=12.2, elapsed_s=70, eta_s=242, peak_bytes=1100 * 1024**2, peak_kind="RSS",
    val_loss=0.118, val_step=200,
)  # fmt: skip
# What a narrow line keeps longest, most important first (update counter aside: tqdm's).
PRIORITY = [
    ("loss", r"ema 0\.1301"),
    ("lr", r"lr 1\.00e-04\b"),
    ("eta", r"(<|eta )0:04:02"),
    ("rate", r"1\.52 upd/s"),
    ("val", r"val 0\.1180"),
]


def test_a_narrow_line_keeps_the_important_fields_first():
    full = progress.format_line(VALUES)
    assert progress.format_line(VALUES, len(full)) == full
    for width in range(len(full) + 5):
        line = progress.format_line(VALUES, width)
        kept = [bool(re.search(pattern, line)) for _, pattern in PRIORITY]
        assert kept == sorted(kept, reverse=True), f"{width}: {line!r}"  # a prefix of PRIORITY
        assert len(line) <= max(width, len("ema 0.1301")), f"{width}: {line!r}"
        if width >= 51:  # smoothed loss, UNet LR, ETA and rate: 51 characters
            assert all(kept[:4]), f"{width}: {line!r}"


def test_an_80_column_terminal_shows_counter_loss_lr_rate_and_eta(
    make_config, capfd, every_update_drawn, monkeypatch
):
    """tqdm cut the line at the terminal's width, before the rate, ETA and val loss."""
    import tqdm.std

    # An 80x24 terminal, as tqdm measures it (it keeps the last column free: 79 wide).
    monkeypatch.setattr(tqdm.std, "_screen_shape_wrapper", lambda: lambda fp: (79, 23))
    cfg = make_config(
        "train.max_steps=12",
        "lora.train_text_encoder=true",
        "train.text_encoder_lr=5e-5",
        "validation.fraction=0.25",
        "validation.every_n_steps=2",
    )
    loop.run(cfg)
    drawn = [c for c in re.split(r"[\r\n]", capfd.readouterr().err) if re.search(r"\d+/12\b", c)]
    records = read_metrics(cfg.output_dir)
    shown = {}
    for chunk in drawn:
        assert len(chunk) <= 79, chunk
        match = re.search(r"(\d+)/12, ema (\S+) \| lr (\S+) \| (\S+) upd/s \| eta ([\d:]+)", chunk)
        if match:
            shown[int(match[1])] = match
    assert sorted(shown) == list(range(1, 13)), drawn[-3:]
    for step, match in shown.items():
        expected = expected_line(records, step)
        assert match[2] == expected["ema"] and float(match[4]) > 0
        lrs = records[step - 1]["lr"]
        assert match[3] in (format_lrs(lrs), format_lrs(lrs[:1])), "the UNet's LR first"
