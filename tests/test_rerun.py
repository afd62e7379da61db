"""Every command is rerun: a finished, half-finished or damaged run must do the obvious, safe
thing, and nothing a user trained is replaced without ``--overwrite``.

The reference is always the same run left uninterrupted; "without loading the models" is
proven by making the model loader fail.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import without_clock
from safetensors.torch import load_file

from trainer.commands import cli
from trainer.config.load import ConfigError
from trainer.files import write_atomic, write_folder_atomic
from trainer.lora.files import WEIGHTS_NAME
from trainer.models import load as models
from trainer.report.tracking import read_metrics
from trainer.run import checkpoint as ckpt
from trainer.run import final, loop

SETTINGS = (
    "train.max_steps=6",
    "train.batch_size=2",
    "train.gradient_accumulation_steps=2",
    "data.random_flip=true",
    "checkpoint.every_n_steps=2",
    'output.name="tiny"',  # not the folder's name, which differs between the copies here
)


@pytest.fixture(scope="module")
def reference(tiny_config, tmp_path_factory) -> Path:
    """The uninterrupted run (checkpoints at 2, 4 and 6)."""
    out = tmp_path_factory.mktemp("reference")
    loop.run(tiny_config(out, *SETTINGS))
    return out


@pytest.fixture
def no_model_load(monkeypatch):
    """Make any model load fail, so a test proves none happened."""

    def refuse(*args, **kwargs):
        raise AssertionError("the models were loaded")

    monkeypatch.setattr(models, "load_components", refuse)


def copy_run(reference: Path, out: Path) -> Path:
    shutil.copytree(reference, out)
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(a / WEIGHTS_NAME), load_file(b / WEIGHTS_NAME)
    assert x.keys() == y.keys()
    assert all(torch.equal(x[k], y[k]) for k in x), "final LoRA differs from the reference"


def header(folder: Path) -> dict[str, str]:
    # safetensors writes the header's keys in no fixed order, so compare them as a dict.
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        return f.metadata()


def train_cli(config, *flags: str) -> int:
    """``sdlora train`` in-process on an already built config (its TOML written beside)."""
    path = Path(config.output_dir).parent / f"{Path(config.output_dir).name}.toml"
    path.write_text(
        __import__("trainer.config.load", fromlist=["to_toml"]).to_toml(config.to_dict())
    )
    return cli.main(["train", "--config", str(path), *flags])


# ---------------------------------------------------------------- finished runs


def test_a_finished_run_resumed_is_complete_without_loading_models(
    reference, tiny_config, tmp_path, no_model_load, capsys, caplog
):
    out = copy_run(reference, tmp_path / "run")
    before = (out / WEIGHTS_NAME).read_bytes()
    with caplog.at_level("INFO", logger="sdlora"):
        assert train_cli(tiny_config(out, *SETTINGS), "--resume", "latest") == 0
    assert "nothing to train" in capsys.readouterr().out
    assert "already complete: 6 updates" in caplog.text
    assert (out / WEIGHTS_NAME).read_bytes() == before
    assert read_metrics(out) == read_metrics(reference)


def test_the_same_command_rerun_on_a_finished_run_is_complete(
    reference, tiny_config, tmp_path, no_model_load
):
    out = copy_run(reference, tmp_path / "run")
    result = loop.run(tiny_config(out, *SETTINGS))
    assert result.already_complete and result.updates == 6


def test_a_run_killed_before_its_final_outputs_is_finished_from_its_checkpoint(
    reference, tiny_config, tmp_path, no_model_load
):
    # The state a kill leaves after the last checkpoint: no final weights, no manifest.
    out = copy_run(reference, tmp_path / "run")
    for name in (WEIGHTS_NAME, final.MANIFEST_NAME, ckpt.LR_SCHEDULER_STATE):
        (out / name).unlink()
    assert train_cli(tiny_config(out, *SETTINGS), "--resume", "latest") == 0
    assert_same_weights(out, reference)
    assert header(out) == header(reference)
    kohya = load_file(out / "tiny.safetensors")
    assert all(
        torch.equal(v, load_file(reference / "tiny.safetensors")[k]) for k, v in kohya.items()
    )
    assert final.read_manifest(out)[1] == []
    lr_state = ckpt.LR_SCHEDULER_STATE
    assert (out / lr_state).read_bytes() == (reference / lr_state).read_bytes()


def test_a_kill_mid_metrics_line_resumes_to_the_uninterrupted_records(
    reference, tiny_config, tmp_path
):
    # Killed during update 6, after its checkpoint at 4 and while appending a record.
    out = copy_run(reference, tmp_path / "run")
    shutil.rmtree(ckpt.step_dir(out, 6))
    for name in (WEIGHTS_NAME, final.MANIFEST_NAME, ckpt.LR_SCHEDULER_STATE):
        (out / name).unlink()
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
    assert len(read_metrics(out)) == 5, "the half-written record is skipped, not fatal"
    loop.run(tiny_config(out, *SETTINGS, 'checkpoint.resume="latest"'))
    assert without_clock(read_metrics(out)) == without_clock(read_metrics(reference))
    assert_same_weights(out, reference)


def test_truncated_final_weights_are_detected_and_rewritten(
    reference, tiny_config, tmp_path, no_model_load
):
    out = copy_run(reference, tmp_path / "run")
    data = (out / WEIGHTS_NAME).read_bytes()
    (out / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    result = loop.run(tiny_config(out, *SETTINGS, 'checkpoint.resume="latest"'))
    assert result.already_complete
    assert_same_weights(out, reference)


# ---------------------------------------------------------------- nothing trained is lost


def test_a_new_config_never_replaces_a_finished_lora_without_overwrite(
    reference, tiny_config, tmp_path
):
    # Users delete intermediate checkpoints; the final LoRA must still be protected.
    out = copy_run(reference, tmp_path / "run")
    shutil.rmtree(out / ckpt.CHECKPOINTS)
    weights, metrics = (out / WEIGHTS_NAME).read_bytes(), (out / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="--overwrite") as err:
        loop.run(tiny_config(out, *SETTINGS, "train.seed=1"))
    assert "train.seed: 0 → 1" in str(err.value)
    assert (out / WEIGHTS_NAME).read_bytes() == weights
    assert (out / "metrics.jsonl").read_bytes() == metrics


def test_overwrite_starts_over(reference, tiny_config, tmp_path):
    out = copy_run(reference, tmp_path / "run")
    cfg = tiny_config(out, *SETTINGS, "train.seed=1", "train.max_steps=2")
    result = loop.run(cfg, overwrite=True)
    assert result.updates == 2 and not result.already_complete
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert [p.name for p in ckpt.step_folders(out)] == ["step-000002"]


def test_overwrite_and_resume_together_are_refused(reference, tiny_config, tmp_path):
    out = copy_run(reference, tmp_path / "run")
    with pytest.raises(ConfigError, match="not both"):
        loop.run(tiny_config(out, *SETTINGS, 'checkpoint.resume="latest"'), overwrite=True)


# ---------------------------------------------------------------- damaged checkpoints


def damage(folder: Path, how: str) -> None:
    if how == "truncated weights":
        path = folder / WEIGHTS_NAME
        path.write_bytes(path.read_bytes()[:100])
    elif how == "missing state":
        (folder / ckpt.TRAINER_STATE).unlink()
    elif how == "flipped optimizer byte":
        path = folder / ckpt.OPTIMIZER_STATE
        data = bytearray(path.read_bytes())
        data[-20] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated weights", "missing state", "flipped optimizer byte"])
def test_resume_latest_falls_back_to_the_newest_intact_checkpoint_loudly(
    reference, tiny_config, tmp_path, how, caplog
):
    out = tmp_path / "run"
    shutil.copytree(reference / ckpt.CHECKPOINTS, out / ckpt.CHECKPOINTS)
    for step in (6,):  # the run was killed after step 4; its step-4 checkpoint is damaged
        shutil.rmtree(ckpt.step_dir(out, step))
    damage(ckpt.step_dir(out, 4), how)
    with caplog.at_level("WARNING", logger="sdlora"):
        result = loop.run(tiny_config(out, *SETTINGS, 'checkpoint.resume="latest"'))
    assert result.updates == 6
    warned = caplog.text
    assert "step-000004 is damaged" in warned and "step-000004.damaged" in warned
    assert (out / ckpt.CHECKPOINTS / "step-000004.damaged").is_dir(), "kept, not deleted"
    assert_same_weights(out, reference)
    assert without_clock(read_metrics(out)) == without_clock(read_metrics(reference))[2:]  # from 2


def test_an_explicitly_named_damaged_checkpoint_is_an_error_naming_the_file(
    reference, tiny_config, tmp_path
):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt.step_dir(reference, 4), bad)
    damage(bad, "truncated weights")
    cfg = tiny_config(tmp_path / "out", *SETTINGS, f'checkpoint.resume="{bad}"')
    with pytest.raises(ckpt.CheckpointError, match=WEIGHTS_NAME) as err:
        loop.run(cfg)
    assert "bytes, but" in str(err.value)


def test_a_kill_between_the_renames_of_a_resaved_checkpoint_resumes_from_it(
    reference, tiny_config, tmp_path, monkeypatch
):
    # A run killed after update 4 while it saved step 4 again (a signal right after the
    # periodic save): killed after step-000004 was set aside, before the new one was renamed
    # in. The step-000004.old folder is then the only copy of that checkpoint.
    out = tmp_path / "run"
    shutil.copytree(reference / ckpt.CHECKPOINTS, out / ckpt.CHECKPOINTS)
    shutil.rmtree(ckpt.step_dir(out, 6))
    source = ckpt.step_dir(reference, 4)
    real_replace, calls = os.replace, []

    def killed_at_the_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed_at_the_second_rename)
        with pytest.raises(KeyboardInterrupt):
            write_folder_atomic(
                ckpt.step_dir(out, 4), lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True)
            )
    assert not ckpt.step_dir(out, 4).exists()

    result = loop.run(tiny_config(out, *SETTINGS, 'checkpoint.resume="latest"'))
    assert [r["step"] for r in read_metrics(out)] == [5, 6]  # resumed at 4, not 2
    assert result.updates == 6
    assert_same_weights(out, reference)
    left = sorted(p.name for p in (out / ckpt.CHECKPOINTS).iterdir())
    assert left == ["step-000002", "step-000004", "step-000006"]


def test_checkpoint_records_every_file_and_its_config_copy_agrees_with_lr_scheduler_json(
    reference,
):
    import tomllib

    for folder in ckpt.list_checkpoints(reference):
        state = json.loads((folder / ckpt.TRAINER_STATE).read_text())
        names = {p.name for p in folder.iterdir()} - {ckpt.TRAINER_STATE}
        assert set(state["files"]) == names
        assert ckpt.verify(folder) == []
        # lr_scheduler.json is the source of truth; config.toml's copy must say the same.
        schedule = json.loads((folder / ckpt.LR_SCHEDULER_STATE).read_text())
        table = tomllib.loads((folder / ckpt.CONFIG_NAME).read_text())["lr_scheduler"]
        assert table == {"name": schedule["name"], **schedule["params"]}


# ---------------------------------------------------------------- final files


def test_final_and_checkpoint_files_are_readable_by_others_per_umask(tiny_config, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        loop.run(tiny_config(out, "train.max_steps=1"))
    finally:
        os.umask(old)
    finals = [WEIGHTS_NAME, ckpt.LR_SCHEDULER_STATE, ckpt.CONFIG_NAME, final.MANIFEST_NAME]
    in_checkpoint = [p.name for p in ckpt.step_dir(out, 1).iterdir()]
    paths = [out / n for n in finals] + [ckpt.step_dir(out, 1) / n for n in in_checkpoint]
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


KILL_MID_WRITE = """
import os, signal, sys
from pathlib import Path
from trainer.files import write_atomic

def write(tmp):
    with open(tmp, "wb") as f:
        f.write(b"half of the new weights")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

write_atomic(Path(sys.argv[1]), write)
"""


@pytest.mark.slow
def test_a_kill_while_writing_a_final_file_leaves_the_old_file_whole(tmp_path):
    target = tmp_path / WEIGHTS_NAME
    target.write_bytes(b"the finished weights")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo))
    done = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(target)], env=env)
    assert done.returncode == -9
    assert target.read_bytes() == b"the finished weights"
    # The leftover is a hidden temporary that nothing reads and the next start removes.
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert all(p.name.startswith(f".{WEIGHTS_NAME}.tmp-") for p in leftovers)


def test_a_failed_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.bin"

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, fail)
    assert list(tmp_path.iterdir()) == []


def test_a_key_added_since_a_checkpoint_was_written_compares_as_its_default(
    reference, tiny_config, tmp_path, no_model_load
):
    """A newer version knows more keys; an older checkpoint that lacks one must still resume
    (or be recognised as complete) when the current value is the default."""
    out = copy_run(reference, tmp_path / "run")
    for path in [out / final.MANIFEST_NAME]:
        manifest = json.loads(path.read_text())
        del manifest["config"]["train"]["channels_last"]
        path.write_text(json.dumps(manifest))
    assert loop.run(tiny_config(out, *SETTINGS)).already_complete  # by the manifest
    (out / WEIGHTS_NAME).unlink()  # and by the checkpoint
    for folder in ckpt.list_checkpoints(out):
        text = (folder / ckpt.CONFIG_NAME).read_text().replace("channels_last = false\n", "")
        (folder / ckpt.CONFIG_NAME).write_text(text)
        state = json.loads((folder / ckpt.TRAINER_STATE).read_text())
        state["files"][ckpt.CONFIG_NAME] = ckpt.file_record(folder / ckpt.CONFIG_NAME)
        (folder / ckpt.TRAINER_STATE).write_text(json.dumps(state))
    result = loop.run(tiny_config(out, *SETTINGS, 'checkpoint.resume="latest"'))
    assert result.already_complete
