"""Checkpoints: what one holds, writing it from a live run (:func:`save_checkpoint`), restoring a
run from it (:func:`restore_checkpoint`), finding the latest, safe loading and pruning.

A checkpoint is a folder ``output_dir/checkpoints/step-NNNNNN/`` (NNNNNN = optimizer updates
done) holding:

    pytorch_lora_weights.safetensors   LoRA weights, diffusers format, fp32
    lr_scheduler.json                  schedule name, params, total/current step, base/last LRs
    trainer_state.json                 global step, epoch, position, samples seen, seeds, hashes
    optimizer.pt                       optimizer state, read back with weights_only=True
    scaler.json                        fp16 GradScaler state (only under fp16)
    config.toml                        the resolved config of the run that wrote it

It is written by :func:`trainer.files.write_folder_atomic`: into ``step-NNNNNN.tmp/``, every
file fsynced, then renamed into place with ``os.replace``. A crash mid-save leaves only a
``.tmp`` folder, which is never read. Saving a step whose folder exists sets the old folder
aside as ``step-NNNNNN.old`` before the new one is renamed in, and deletes it after, so at
every moment one complete folder of that step exists: a ``.old`` folder with no
``step-NNNNNN`` beside it is that checkpoint, listed as such and renamed back at the next
start (:func:`clean_interrupted_saves`).

``trainer_state.json`` records the size and SHA-256 of every other file, so damage (a
truncated or altered file, a disk error) is detected before any model is loaded rather than
guessed from a failed read. A checkpoint that fails the check is renamed to
``step-NNNNNN.damaged`` (kept for inspection, never overwritten), and ``--resume latest``
falls back to the newest intact one, saying so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from schedulers import schedule_state
from trainer import files
from trainer.config.load import tables_hash, to_toml
from trainer.errors import UserError
from trainer.lora import metadata as meta
from trainer.lora.files import WEIGHTS_NAME
from trainer.optimizers import checkpoint_state, eval_mode, load_checkpoint_state
from trainer.step_folders import CHECKPOINTS, numbered_folders, parse_step, step_name

if TYPE_CHECKING:
    from trainer.data.dataset import Example
    from trainer.run.state import RunState

TRAINER_STATE = "trainer_state.json"
LR_SCHEDULER_STATE = "lr_scheduler.json"
OPTIMIZER_STATE = "optimizer.pt"
SCALER_STATE = "scaler.json"
CONFIG_NAME = "config.toml"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or unsafe; the message says which and what to do."""


def step_dir(output_dir: str | Path, step: int) -> Path:
    """``output_dir/checkpoints/step-NNNNNN``."""
    return Path(output_dir) / CHECKPOINTS / step_name(step)


def step_of(folder: Path) -> int:
    """The update count of a ``step-NNNNNN`` folder (or of its set-aside ``.old`` copy)."""
    step = parse_step(folder.name.removesuffix(files.OLD_SUFFIX))
    if step is None:
        raise ValueError(f"{folder}: not a step-NNNNNN checkpoint folder")
    return step


def settled(folder: Path, output_dir: str | Path | None = None) -> Path:
    """Where a checkpoint folder is once :func:`clean_interrupted_saves` ran: a set-aside
    ``step-NNNNNN.old`` is renamed back to ``step-NNNNNN``. With ``output_dir``, only a folder
    of that run's checkpoints is (another run's folders are read where they are)."""
    checkpoints = None if output_dir is None else Path(output_dir) / CHECKPOINTS
    if checkpoints is not None and folder.resolve().parent != checkpoints.resolve():
        return folder
    return folder.with_name(folder.name.removesuffix(files.OLD_SUFFIX))


def step_folders(output_dir: str | Path) -> list[Path]:
    """Every checkpoint folder, intact or not, oldest first (by update, not by name).

    ``.tmp`` and ``.damaged`` folders are not checkpoints. A ``step-NNNNNN.old`` folder with no
    ``step-NNNNNN`` beside it is: a crash hit :func:`trainer.files.write_folder_atomic` between
    setting the old save aside and renaming the new one in, so it is the only complete save of
    that step.
    """
    root = Path(output_dir) / CHECKPOINTS
    found = dict(numbered_folders(root, files.OLD_SUFFIX))
    found.update(numbered_folders(root))  # the step-NNNNNN folder wins over its .old copy
    return [found[step] for step in sorted(found)]


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints that finished saving (they hold ``trainer_state.json``), oldest first."""
    return [p for p in step_folders(output_dir) if (p / TRAINER_STATE).is_file()]


def find_latest(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that finished saving, or None (not verified: see :func:`verify`)."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def file_record(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a file, as recorded in ``trainer_state.json`` and manifests."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def record_files(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """:func:`file_record` of each named file in ``folder``."""
    return {name: file_record(folder / name) for name in sorted(names)}


def check_records(folder: Path, records: dict[str, Any]) -> list[str]:
    """Every file whose size or hash differs from its record, or that is missing."""
    problems = []
    for name, want in records.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != want.get("size"):
            problems.append(f"{path}: {size} bytes, but {want.get('size')} were written")
        elif file_record(path)["sha256"] != want.get("sha256"):
            problems.append(f"{path}: its content changed since it was written (hash mismatch)")
    return problems


# What a checkpoint written before trainer_state.json recorded its files must hold.
REQUIRED = ("pytorch_lora_weights.safetensors", LR_SCHEDULER_STATE, OPTIMIZER_STATE)


def verify(folder: Path) -> list[str]:
    """Every problem that would stop a resume from ``folder``, each naming its file.

    Reads no model: sizes and hashes against ``trainer_state.json``'s records (checkpoints
    written before the records existed get a presence check).
    """
    state_path = folder / TRAINER_STATE
    if not state_path.is_file():
        return [f"{state_path}: missing (the save did not finish)"]
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return [f"{state_path}: not valid JSON ({err})"]
    if not isinstance(state, dict) or "global_step" not in state:
        return [f"{state_path}: not a trainer state (no global_step)"]
    records = state.get("files")
    if isinstance(records, dict):
        return check_records(folder, records)
    return [f"{folder / name}: missing" for name in REQUIRED if not (folder / name).is_file()]


def quarantine(folder: Path) -> Path:
    """Rename a damaged checkpoint out of the way (``step-NNNNNN.damaged``); return the new
    path. It is kept for inspection, and no later save can overwrite it."""
    target = folder.with_name(folder.name + ".damaged")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.damaged-{n}")
    os.replace(folder, target)
    return target


def newest_intact(output_dir: str | Path) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    """The newest checkpoint that verifies, and every newer one that does not (with why)."""
    damaged: list[tuple[Path, list[str]]] = []
    for folder in reversed(step_folders(output_dir)):
        problems = verify(folder)
        if not problems:
            return folder, damaged
        damaged.append((folder, problems))
    return None, damaged


def resolve(output_dir: str | Path, resume: str) -> Path:
    """Turn an explicit ``--resume PATH`` into a verified checkpoint folder.

    Raises:
        CheckpointError: naming the damaged file, or listing the checkpoints that exist.
    """
    path = Path(resume)
    set_aside = path.with_name(path.name + files.OLD_SUFFIX)
    if not path.is_dir() and parse_step(path.name) is not None and set_aside.is_dir():
        path = set_aside  # a crash mid-save left this step's only checkpoint set aside
    if not path.is_dir():
        found = [str(p) for p in list_checkpoints(output_dir)][-3:]
        raise CheckpointError(
            f"--resume {resume}: no such checkpoint folder; use 'latest' or one of {found}"
        )
    problems = verify(path)
    if problems:
        raise CheckpointError(
            f"--resume {resume}: the checkpoint is damaged: {'; '.join(problems)}. "
            "Use --resume latest to fall back to the newest intact checkpoint."
        )
    return path


def clean_interrupted_saves(output_dir: str | Path) -> list[Path]:
    """Finish what interrupted saves left (run at start, main process); return what was
    removed.

    Per step, :func:`trainer.files.finish_folder_write`: a ``.tmp`` folder is deleted, a
    ``.old`` folder is deleted when its ``step-NNNNNN`` exists (the swap finished) and renamed
    back to ``step-NNNNNN`` when not (it is the checkpoint). The hidden temporary files a
    killed write of a final file left in ``output_dir`` are deleted too.
    """
    output_dir = Path(output_dir)
    root = output_dir / CHECKPOINTS
    interrupted = {
        folder.with_name(folder.name.removesuffix(suffix))
        for suffix in (files.TMP_SUFFIX, files.OLD_SUFFIX)
        for _, folder in numbered_folders(root, suffix)
    }
    removed = [p for final in sorted(interrupted) for p in files.finish_folder_write(final)]
    if root.is_dir():
        files.fsync_path(root)
    return removed + files.remove_stale_tmp(output_dir)


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


# ---------------------------------------------------------------- what a checkpoint holds

# Tables whose change alters the trained weights; their hashes go in trainer_state.json.
HASHED_TABLES = ("model", "lora", "data", "train", "optimizer", "lr_scheduler")


def data_record(examples: Sequence[Example], data_path: str) -> dict[str, Any]:
    """What a checkpoint records of its training examples, to tell on resume whether they
    changed: their count (repeats included) and a hash of each one's path under ``data.path``,
    caption, training size and file size, in the loader's order."""
    digest = hashlib.sha256()
    for example in examples:
        try:
            size = os.path.getsize(example.path)
        except OSError:  # gone since it was checked; the hash then differs on resume
            size = None
        name = os.path.relpath(example.path, data_path)
        digest.update(json.dumps([name, example.caption, list(example.size), size]).encode())
        digest.update(b"\n")
    return {"examples": len(examples), "sha256": digest.hexdigest()}


def save_checkpoint(run: RunState) -> Path:
    """Write ``checkpoints/step-NNNNNN`` for the current update atomically (main process) and
    prune old ones, never the checkpoint this run resumed from.

    A schedule-free optimizer is in eval mode meanwhile, so the saved LoRA is the one it means
    to be evaluated, and its train-mode weights go in its state
    (see ``trainer/optimizers/modes.py``).
    """
    with eval_mode(run.optimizer):
        return _write_checkpoint(run)


def _write_checkpoint(run: RunState) -> Path:
    # peft, through the adapters: imported where a checkpoint is written or restored, so
    # preflight, which reads checkpoints' files only, runs before the training libraries load.
    from trainer.lora import adapters as lora

    config, accelerator, plan, update = run.config, run.accelerator, run.plan, run.update
    folder = step_dir(config.output_dir, update)
    if accelerator.is_main_process:
        train = config.train
        epoch, position = plan.position(update)
        micro = update * plan.accumulation
        trainer_state = {
            "format": 1,
            "global_step": update,
            "total_updates": plan.total_updates,
            "epoch": epoch,
            "position_in_epoch": position,
            "micro_batches": micro,
            "samples_seen": micro * train.batch_size * accelerator.num_processes,
            "seed": train.seed,
            "rng": "every draw is seeded from (seed, counters) by trainer.data.order.seed_for",
            "num_processes": accelerator.num_processes,
            "config_hashes": {t: tables_hash(config, [t]) for t in HASHED_TABLES},
            "data": data_record(run.feed.prepared.examples, config.data.path),
            # What the final LoRA's metadata needs, so the final files can be written from
            # this checkpoint alone, with no model loaded (trainer/run/final.py).
            "architecture": run.architecture,
            "run_facts": dataclasses.asdict(run_facts(run)),
            "saved_at": time.time(),
        }
        base_lrs = config.base_lrs()
        last_lrs = [group["lr"] for group in run.optimizer.param_groups]
        lr_state = schedule_state(
            config.lr_scheduler, plan.total_updates, update, base_lrs, last_lrs
        )
        unet, text_encoders = run.unwrapped(run.unet), run.trained_text_encoders()

        def write(tmp: Path) -> None:
            lora.save(tmp, unet, text_encoders, dtype="fp32", training_metadata=trainer_state)
            files.write_json(tmp / LR_SCHEDULER_STATE, lr_state)
            save_tensors_state(tmp / OPTIMIZER_STATE, checkpoint_state(run.optimizer))
            if accelerator.scaler is not None:
                files.write_json(tmp / SCALER_STATE, accelerator.scaler.state_dict())
            (tmp / CONFIG_NAME).write_text(to_toml(config.to_dict()))
            # Written last: it records every other file's size and hash, so damage is found
            # before a resume loads anything.
            names = [p.name for p in tmp.iterdir()]
            state = {**trainer_state, "files": record_files(tmp, names)}
            files.write_json(tmp / TRAINER_STATE, state)

        files.write_folder_atomic(folder, write)
        protect = [folder] + ([run.resumed_from] if run.resumed_from else [])
        prune(config.output_dir, config.checkpoint.keep_last, protect)
    accelerator.wait_for_everyone()
    return folder


def run_facts(run: RunState) -> meta.RunFacts:
    """What only the loop knows about the run, for the LoRA's metadata."""
    micro = run.update * run.plan.accumulation
    return meta.collect_run_facts(
        run.feed.prepared.examples,
        steps=run.update,
        epochs=-(-micro // run.plan.micro_batches_per_epoch),
        optimizer=run.optimizer,
        num_processes=run.accelerator.num_processes,
        # SD3's flow-matching scheduler has no prediction type: it predicts the velocity.
        prediction_type=run.parts.noise_scheduler.config.get("prediction_type", "flow_matching"),
        started_at=run.started_at,
        model_variant=run.parts.variant,
    )


def restore_checkpoint(run: RunState, folder: Path) -> int:
    """Load weights, optimizer and scaler state; return the global update to continue from."""
    from trainer.lora import adapters as lora  # see _write_checkpoint

    state = read_json(folder, TRAINER_STATE)
    lora.load_into(folder / WEIGHTS_NAME, run.unwrapped(run.unet), run.trained_text_encoders())
    load_checkpoint_state(run.optimizer, load_tensors_state(folder / OPTIMIZER_STATE))
    scaler = run.accelerator.scaler
    if scaler is not None and (folder / SCALER_STATE).is_file():
        scaler.load_state_dict(read_json(folder, SCALER_STATE))
    run.started_at = state.get("run_facts", {}).get("started_at") or run.started_at
    return int(state["global_step"])
