"""Checkpoint layout, atomic saving, finding the latest, safe loading and pruning.

A checkpoint is a folder ``output_dir/checkpoints/step-NNNNNN/`` (NNNNNN = optimizer updates
done) holding:

    pytorch_lora_weights.safetensors   LoRA weights, diffusers format, fp32
    lr_scheduler.json                  schedule name, params, total/current step, base/last LRs
    trainer_state.json                 global step, epoch, position, samples seen, seeds, hashes
    optimizer.pt                       optimizer state, read back with weights_only=True
    scaler.json                        fp16 GradScaler state (only under fp16)
    config.toml                        the resolved config of the run that wrote it

It is written into ``step-NNNNNN.tmp/``, every file fsynced, then renamed into place with
``os.replace``. A crash mid-save leaves only a ``.tmp`` folder, which is never read.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
LR_SCHEDULER_STATE = "lr_scheduler.json"
OPTIMIZER_STATE = "optimizer.pt"
SCALER_STATE = "scaler.json"
CONFIG_NAME = "config.toml"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unsafe; the message says which and what to do."""


def step_dir(output_dir: str | Path, step: int) -> Path:
    """``output_dir/checkpoints/step-NNNNNN``."""
    return Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. ``.tmp`` folders (interrupted saves) are skipped."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    complete = [p for p in found if (p / TRAINER_STATE).is_file()]
    return sorted(complete, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def find_latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve(output_dir: str | Path, resume: str) -> Path | None:
    """Turn ``--resume latest|PATH`` into a checkpoint folder (None: latest, but none yet)."""
    if resume == "latest":
        return find_latest(output_dir)
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(
            f"--resume {resume}: not a complete checkpoint folder (no {TRAINER_STATE}); "
            f"use 'latest' or one of {[str(p) for p in list_checkpoints(output_dir)][-3:]}"
        )
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    """Write JSON (pretty, trailing newline)."""
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_atomic(final: Path, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a fresh ``<final>.tmp`` folder, fsync it, and rename it to ``final``.

    A crash at any moment leaves either the old state (plus a ``.tmp`` folder that nothing
    reads) or the complete new checkpoint, never a half-written ``final``.
    """
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # the same step saved again (e.g. a signal right after a save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)
    return final


def remove_stale_tmp(output_dir: str | Path) -> list[Path]:
    """Delete leftovers of interrupted saves; return what was removed."""
    root = Path(output_dir) / CHECKPOINTS
    stale = sorted(root.glob("step-*.tmp")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path)
    return stale


def prune(output_dir: str | Path, keep_last: int, protect: Sequence[Path] = ()) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints, never one in ``protect``; return
    what was removed."""
    if keep_last <= 0:
        return []
    kept = {p.resolve() for p in protect}
    doomed = [p for p in list_checkpoints(output_dir)[:-keep_last] if p.resolve() not in kept]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def read_json(folder: Path, name: str) -> dict[str, Any]:
    """Read one JSON file of a checkpoint, with an error that names it."""
    path = folder / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


def save_tensors_state(path: Path, state: dict[str, Any]) -> None:
    """Save an optimizer state dict (tensors, numbers, lists) for a weights_only load."""
    torch.save(state, path)


def load_tensors_state(path: Path) -> dict[str, Any]:
    """Load a state saved by :func:`save_tensors_state` without running any pickled code.

    Raises:
        CheckpointError: when the file holds anything but tensors and plain containers.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: the file holds pickled objects other than tensors, "
            "which could run code. Only load checkpoints you wrote yourself; this one may "
            f"have been tampered with. ({str(err).splitlines()[0]})"
        ) from err
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path}: unreadable or truncated ({err})") from err
