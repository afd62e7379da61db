"""TensorBoard holds one run per output_dir, and a resumed run leaves one value per step."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

import pytest

from trainer.report.progress import format_loss, smoothed
from trainer.report.tracking import read_metrics
from trainer.run import checkpoint as ckpt
from trainer.run import final, loop

SETTINGS = (
    'logging.tracker="tensorboard"',  # the shipped default (the fixture turns it off)
    "train.max_steps=6",
    "checkpoint.every_n_steps=2",
    "validation.fraction=0.25",
    "validation.every_n_steps=2",
    'validation.prompts=["a red circle"]',
    "validation.sample_steps=1",
)


def events(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import (
        IMAGES,
        SCALARS,
        EventAccumulator,
    )

    return EventAccumulator(
        str(out / "logs" / "sdlora"), size_guidance={SCALARS: 0, IMAGES: 0}
    ).Reload()


def steps_of(accumulator, tag: str) -> list[int]:
    return [e.step for e in accumulator.Scalars(tag)]


def assert_one_run(out: Path) -> None:
    """``logs/`` holds the project's run and nothing else: no timestamped folders."""
    assert [p.name for p in (out / "logs").iterdir()] == ["sdlora"]
    assert all(p.is_file() for p in (out / "logs" / "sdlora").iterdir())


def test_resuming_from_an_earlier_checkpoint_leaves_one_value_per_step(
    tiny_config, tmp_path, capfd, every_update_drawn
):
    out = tmp_path / "run"
    loop.run(tiny_config(out, *SETTINGS))
    assert_one_run(out)
    first = events(out)
    assert steps_of(first, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert "_hparams_/session_start_info" in first.summary_metadata, "hparams in the same run"

    # As if killed after update 5, with the step-4 checkpoint lost: resume from update 2.
    (out / final.MANIFEST_NAME).unlink()
    for step in (4, 6):
        shutil.rmtree(ckpt.step_dir(out, step))
    (out / "samples" / "step-000004" / "stale").write_text("from the first session")
    capfd.readouterr()
    loop.run(tiny_config(out, *SETTINGS, 'checkpoint.resume="latest"'))
    shown = capfd.readouterr().err

    assert_one_run(out)
    resumed, records = events(out), read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for tag in ("train/loss", "train/lr/unet"):
        assert steps_of(resumed, tag) == [1, 2, 3, 4, 5, 6], f"{tag}: one value per step"
    assert [e.value for e in resumed.Scalars("train/loss")] == pytest.approx(
        [r["loss"] for r in records], rel=1e-6
    ), "the values of the resumed session, as in metrics.jsonl"
    assert steps_of(resumed, "val/loss") == [2, 4, 6]
    assert [e.step for e in resumed.Images("samples/grid")] == [2, 4, 6]
    assert not (out / "samples" / "step-000004" / "stale").exists(), "redrawn, not mixed"

    # The clock survives the resume, and the smoothed loss continues the same curve.
    for record in records:
        datetime.fromisoformat(record["time"])
    elapsed = [r["elapsed"] for r in records]
    assert elapsed == sorted(elapsed)
    ema = smoothed(r["loss"] for r in records)
    for step in (3, 6):
        assert f"{step}/6, loss {format_loss(records[step - 1]['loss'])} ema " + format_loss(
            ema[step - 1]
        ) in shown.replace("\r", "\n")


def test_prodigy_effective_step_size_reaches_tensorboard(make_config, tmp_path):
    pytest.importorskip("prodigyopt")
    out = tmp_path / "prodigy"
    cfg = make_config(
        'logging.tracker="tensorboard"',
        "train.max_steps=3",
        "train.learning_rate=1.0",
        'optimizer={name = "prodigy"}',
        output=out,
    )
    loop.run(cfg)
    board = events(out)
    logged = [e.value for e in board.Scalars("train/effective_lr/unet")]
    expected = [r["effective_lr"][0] for r in read_metrics(out)]
    assert logged == pytest.approx(expected, rel=1e-6)  # tensorboard stores float32
