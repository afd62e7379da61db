"""The end summary of ``sdlora train``: its numbers come from metrics.jsonl, its paths exist,
and the commands it suggests work."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_TOML

from trainer.commands import cli
from trainer.commands import summary as end_summary
from trainer.config.load import load
from trainer.lora.files import WEIGHTS_NAME
from trainer.report import samples
from trainer.report.progress import LOSS_EMA_BETA, format_loss, smoothed
from trainer.report.tracking import read_metrics
from trainer.run import checkpoint as ckpt


def train(monkeypatch, args: list[str]) -> int:
    """``sdlora train ARGS`` in-process, with sys.argv as the shell would set it."""
    monkeypatch.setattr(sys, "argv", ["sdlora", "train", *args])
    return cli.main(["train", *args])


def section(text: str, start: str, end: str | None = None) -> list[str]:
    """The lines after the one starting with ``start``, up to the one starting with ``end``."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    last = next((i for i, line in enumerate(lines) if end and line.startswith(end)), len(lines))
    return [line.strip() for line in lines[first + 1 : last]]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("summary") / "run"


@pytest.fixture(scope="module")
def args(tiny_model, tiny_data, out) -> list[str]:
    sets = [
        f'model.pretrained="{tiny_model}"',
        f'data.path="{tiny_data}"',
        f'output_dir="{out}"',
        "train.max_steps=4",
        "checkpoint.every_n_steps=2",
        "validation.fraction=0.25",
        "validation.every_n_steps=2",
        'validation.prompts=["a red circle"]',
        "validation.sample_steps=1",
    ]
    return ["--config", str(TINY_TOML), *[x for s in sets for x in ("--set", s)]]


@pytest.fixture(scope="module")
def summary(args, out) -> tuple[Path, str]:
    """The run's printed summary (module scope: trained once for the tests below)."""
    import io
    from contextlib import redirect_stdout

    monkeypatch = pytest.MonkeyPatch()
    printed = io.StringIO()
    try:
        with redirect_stdout(printed):
            assert train(monkeypatch, args) == 0
    finally:
        monkeypatch.undo()
    # The summary follows the run's log lines (checkpoints, samples) on stdout.
    text = printed.getvalue()
    return out, text[text.index("\ndone: ") + 1 :]


def test_summary_numbers_are_metrics_jsonls(summary):
    out, text = summary
    records = read_metrics(out)
    assert text.startswith("done: 4 updates in ")
    assert "updates/s" in text and "images/s (training time only)" in text
    losses = [r["loss"] for r in records]
    assert (
        f"train loss   {format_loss(smoothed(losses)[-1])} smoothed (EMA, factor "
        f"{LOSS_EMA_BETA}), {format_loss(losses[-1])} last update"
    ) in text
    scored = [r for r in records if "val_loss" in r]
    best = min(scored, key=lambda r: r["val_loss"])
    assert (
        f"val loss     {format_loss(best['val_loss'])} best (update {best['step']}), "
        f"{format_loss(scored[-1]['val_loss'])} final (update 4)"
    ) in text


def test_summary_lists_every_output_and_each_exists(summary):
    out, text = summary
    listed = [line.split("  ")[0] for line in section(text, "outputs in", "next:")]
    for path in listed:
        assert list(Path("/").glob(path.lstrip("/"))), f"{path} is listed but does not exist"
    expected = [
        "pytorch_lora_weights.safetensors",
        "run.safetensors",  # the kohya file, named after the output_dir by default
        "lr_scheduler.json",
        "config.toml",
        "manifest.json",
        "metrics.jsonl",
        "logs/sdlora",
        "samples/progression.png",
        "samples/step-*",
        "checkpoints/step-000004",
    ]
    assert listed == [str(out / name) for name in expected]


def test_suggested_commands_export_and_train_longer(summary, args, monkeypatch, capsys):
    out, text = summary
    commands = [line for line in section(text, "next:") if not line.startswith("#")]
    sample, export, longer = commands
    assert shlex.split(export) == ["sdlora", "export", str(out / "checkpoints" / "step-000004")]
    assert cli.main(shlex.split(export)[1:]) == 0
    assert (out / "export" / "step-000004" / "pytorch_lora_weights.safetensors").is_file()
    assert shlex.split(sample)[:4] == ["sdlora", "sample", "--lora", str(out / WEIGHTS_NAME)]

    folder, launched = longer.split(" && ", 1)
    assert shlex.split(folder) == ["cd", os.getcwd()]
    words = shlex.split(launched)
    i = args.index("train.max_steps=4")
    kept = args[: i - 1] + args[i + 1 :]  # the old run length is replaced, every other flag kept
    assert words[:2] == ["sdlora", "train"] and words[2:] == [
        *kept, "--set", "train.max_steps=8", "--allow-change", "max_steps", "--resume", "latest"
    ]  # fmt: skip
    capsys.readouterr()
    assert train(monkeypatch, words[2:]) == 0
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 9))
    assert "\ndone: 8 updates (4 in this session) in " in capsys.readouterr().out

    # The same command again: the run is complete, and that is all it prints.
    assert train(monkeypatch, words[2:]) == 0
    again = capsys.readouterr().out
    assert "nothing to train" in again and "done:" not in again and "next:" not in again


@pytest.mark.slow
def test_the_sample_command_draws_an_image_with_the_lora(summary, tmp_path):
    _, text = summary
    sample = next(line for line in section(text, "next:") if line.startswith("sdlora sample"))
    words = shlex.split(sample)
    out = Path(words[words.index("--out") + 1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "trainer.commands.cli", *words[1:], "--steps", "2"]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=300)
    assert out.is_file()


def test_train_longer_command_replaces_the_run_length_and_joins_allowed_changes():
    argv = ["sdlora", "train", "--config", "c.toml", "--set", "train.max_steps=40",
            "--set=train.seed=3", "--allow-change", "lr_scheduler", "--resume=latest"]  # fmt: skip
    command = cli.resume_command(argv, parent=["bash"], max_steps=80)
    assert shlex.split(command.split(" && ", 1)[1]) == [
        "sdlora", "train", "--config", "c.toml", "--set=train.seed=3",
        "--set", "train.max_steps=80", "--allow-change", "lr_scheduler,max_steps",
        "--resume", "latest",
    ]  # fmt: skip


def test_the_last_checkpoint_past_update_999999_is_named_by_number(tmp_path):
    config = load(TINY_TOML, [f'output_dir="{tmp_path / "run"}"'])
    steps = (999_998, 1_000_000, 999_999)  # as text, step-1000000 sorts first
    for step in steps:
        ckpt.step_dir(config.output_dir, step).mkdir(parents=True)
        samples.step_folder(config.output_dir, step).mkdir(parents=True)
    newest = str(ckpt.step_dir(config.output_dir, max(steps)))
    assert shlex.split(end_summary.commands(config, "").export) == ["sdlora", "export", newest]
    rows = dict(end_summary.outputs(config))
    assert rows[newest] == f"last of {len(steps)} checkpoint(s)"
    assert rows[str(Path(config.output_dir) / "samples" / "step-*")] == "3 validation points"
