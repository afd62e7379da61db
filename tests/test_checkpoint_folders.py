"""Checkpoint folders on disk, without a model: step folders are ordered by their number, and
re-saving a step never leaves a moment without a complete checkpoint of it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from trainer import files
from trainer.report import samples
from trainer.run import checkpoint as ckpt
from trainer.step_folders import numbered_folders, parse_step, step_name

# Past update 999,999 the name grows a digit, and text order puts it first.
STEPS = (999_998, 1_000_000, 999_999, 5)


def save(output_dir: Path, step: int, marker: str) -> Path:
    """A minimal complete checkpoint whose trainer_state records its one other file."""

    def write(tmp: Path) -> None:
        (tmp / "weights.bin").write_text(marker)
        state = {"global_step": step, "marker": marker}
        state["files"] = ckpt.record_files(tmp, ["weights.bin"])
        # A plain write: the crashes below count the os.replace calls of the folder swap.
        (tmp / ckpt.TRAINER_STATE).write_text(json.dumps(state))

    return files.write_folder_atomic(ckpt.step_dir(output_dir, step), write)


def marker(folder: Path) -> str:
    return json.loads((folder / ckpt.TRAINER_STATE).read_text())["marker"]


# ---------------------------------------------------------------- naming and order


def test_step_names_round_trip_and_other_names_are_not_steps():
    for step in (0, 7, 999_999, 1_000_000, 12_345_678):
        assert parse_step(step_name(step)) == step
    assert step_name(1_000_000) == "step-1000000"
    for name in ("step-000006.tmp", "step-000006.old", "step-000006.damaged", "step-12", "x"):
        assert parse_step(name) is None


def test_checkpoints_past_update_999999_are_ordered_by_number(tmp_path):
    for step in STEPS:
        save(tmp_path, step, str(step))
    newest = max(STEPS)
    assert [ckpt.step_of(p) for p in ckpt.step_folders(tmp_path)] == sorted(STEPS)
    assert ckpt.find_latest(tmp_path) == ckpt.step_dir(tmp_path, newest)
    assert ckpt.newest_intact(tmp_path) == (ckpt.step_dir(tmp_path, newest), [])
    removed = ckpt.prune(tmp_path, keep_last=1)
    assert sorted(ckpt.step_of(p) for p in removed) == sorted(STEPS)[:-1]


def test_sample_folders_past_update_999999_are_ordered_by_number(tmp_path):
    for step in STEPS:
        samples.step_folder(tmp_path, step).mkdir(parents=True)
    root = tmp_path / samples.SAMPLES_DIR
    assert [step for step, _ in numbered_folders(root)] == sorted(STEPS)
    samples.drop_after(tmp_path, 999_999)
    assert [step for step, _ in numbered_folders(root)] == sorted(s for s in STEPS if s <= 999_999)


# ---------------------------------------------------------------- replacing a step's folder


def crash(monkeypatch, module, name: str, nth: int) -> None:
    """Make the ``nth`` call of ``module.name`` kill the save, as a SIGKILL there would.

    A delete dies half-way: one file of the folder is gone, the folder is still there.
    """
    real = getattr(module, name)
    calls = []

    def dying(*args, **kwargs):
        calls.append(args)
        if len(calls) == nth:
            if name == "rmtree":
                next(Path(args[0]).iterdir()).unlink()
            raise KeyboardInterrupt(f"killed in {name} #{nth}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, dying)


# (where the kill lands, the marker of the checkpoint that must survive it)
CRASHES = {
    "while writing the new folder": (ckpt, "record_files", 1, "old"),
    "setting the old folder aside": (os, "replace", 1, "old"),
    "renaming the new folder in": (os, "replace", 2, "old"),
    "deleting the old folder": (shutil, "rmtree", 1, "new"),
}


@pytest.mark.parametrize("where", list(CRASHES))
def test_a_crash_while_a_step_is_saved_again_leaves_a_complete_checkpoint(
    tmp_path, monkeypatch, where
):
    module, name, nth, survivor = CRASHES[where]
    save(tmp_path, 4, "older step")
    save(tmp_path, 6, "old")
    with monkeypatch.context() as m:
        crash(m, module, name, nth)
        with pytest.raises(KeyboardInterrupt):
            save(tmp_path, 6, "new")

    # What a resume reads before anything is cleaned up (preflight only reads).
    latest = ckpt.find_latest(tmp_path)
    assert ckpt.step_of(latest) == 6
    assert ckpt.verify(latest) == []
    assert marker(latest) == survivor
    assert ckpt.newest_intact(tmp_path) == (latest, [])
    assert ckpt.settled(latest, tmp_path) == ckpt.step_dir(tmp_path, 6)

    # The next start settles it under its own name, with nothing left beside it.
    ckpt.clean_interrupted_saves(tmp_path)
    left = sorted(p.name for p in (tmp_path / ckpt.CHECKPOINTS).iterdir())
    assert left == ["step-000004", "step-000006"]
    assert ckpt.verify(ckpt.step_dir(tmp_path, 6)) == []
    assert marker(ckpt.step_dir(tmp_path, 6)) == survivor

    # And the step can be saved again after it.
    save(tmp_path, 6, "again")
    assert marker(ckpt.find_latest(tmp_path)) == "again"


def test_saving_again_over_a_leftover_old_folder_replaces_both(tmp_path):
    save(tmp_path, 6, "old")
    leftover = ckpt.step_dir(tmp_path, 6).with_name("step-000006.old")
    shutil.copytree(ckpt.step_dir(tmp_path, 6), leftover)
    save(tmp_path, 6, "new")
    assert not leftover.exists()
    assert marker(ckpt.find_latest(tmp_path)) == "new"


def test_resume_from_a_named_step_finds_its_set_aside_copy(tmp_path):
    save(tmp_path, 6, "old")
    folder = ckpt.step_dir(tmp_path, 6)
    os.replace(folder, folder.with_name("step-000006.old"))  # the crash between the renames
    found = ckpt.resolve(tmp_path, str(folder))
    assert marker(found) == "old" and ckpt.settled(found, tmp_path) == folder
    # Another run's checkpoint is read where it is: this run never renames its folders.
    assert ckpt.settled(found, tmp_path / "other") == found


def test_the_next_start_removes_the_temporary_a_killed_file_write_left(tmp_path):
    save(tmp_path, 6, "kept")
    leftover = tmp_path / ".pytorch_lora_weights.safetensors.tmp-k1ll3d"  # files.write_atomic's
    leftover.write_bytes(b"half of the new weights")
    mine = tmp_path / "notes.tmp-1"  # not a hidden temporary of ours: left alone
    mine.write_text("mine")
    assert ckpt.clean_interrupted_saves(tmp_path) == [leftover]
    assert not leftover.exists() and mine.exists()
    assert marker(ckpt.find_latest(tmp_path)) == "kept"
