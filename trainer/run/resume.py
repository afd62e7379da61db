"""Writing a run's checkpoint, and resuming from one.

What a checkpoint holds is listed in ``trainer/run/checkpoint.py``; this module fills it from a
live run and restores a run from it. Which checkpoint a run resumes from (and whether it needs
to train at all) is decided before any model loads, in ``trainer/run/preflight.py``.

Whether a checkpoint may be resumed under the current config:

A checkpoint stores the resolved config it was trained with. On resume the two are compared
key by key. Keys that cannot change the trained weights (where logs go, worker counts,
checkpoint cadence) may always differ. Any other difference stops the run with a readable
diff, unless the user allows it with ``--allow-change`` (a key such as ``train.max_steps``,
its bare name ``max_steps``, or a whole table such as ``lr_scheduler``).

What an allowed change does, since the schedule is a pure function of (update, total):
- ``train.max_steps`` raised: the run continues from the true global update on the curve of the
  new length. Warmup is not restarted and the LR never jumps to 0 (kohya #141); lowering it
  to or below the updates already done is refused.
- ``lr_scheduler``: the new schedule is evaluated at the true global update, not restarted
  from update 0 (OneTrainer #297), and not silently ignored (SimpleTuner #163).
- ``train.learning_rate`` / ``train.text_encoder_lr`` / ``train.text_encoder_2_lr``: the new
  base LRs scale the curve from the next update on.
- ``data.images`` (:data:`DATA_KEY`, not a config key): the images or captions in
  ``data.path`` changed since the checkpoint (:func:`data_change` says how). The run continues
  on the new ones; from the checkpoint's update on, its data order differs from an
  uninterrupted run on the old ones, so it is no longer bitwise reproducible.

Some keys cannot change even when allowed, and are refused before any model loads:
``[optimizer]`` (:data:`FIXED_KEYS`), and the ``[lora]`` keys that decide which adapter tensors
exist and their shapes (:data:`ADAPTER_KEYS`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schedulers import schedule_state
from trainer import files
from trainer.config.deprecated import upgrade_saved
from trainer.config.load import ConfigError, flatten, tables_hash, to_toml
from trainer.lora import adapters as lora
from trainer.lora import metadata as meta
from trainer.optimizers import checkpoint_state, eval_mode, load_checkpoint_state
from trainer.run import checkpoint as ckpt

if TYPE_CHECKING:
    from trainer.data.dataset import Example
    from trainer.run.state import RunState

log = logging.getLogger("sdlora")

# Tables whose change alters the trained weights; their hashes go in trainer_state.json.
HASHED_TABLES = ("model", "lora", "data", "train", "optimizer", "lr_scheduler")
# Keys that do not influence the trained weights, so they may differ freely on resume.
# How the final files are written (format, dtype, name) never changes the trained weights.
FREE_KEYS = (
    "output_dir",
    "logging.",
    "checkpoint.",
    "data.num_workers",
    "output.",
    "lora.save_dtype",
)
# Keys a resume cannot honour a change of, even when allowed: the optimizer state is saved
# with its settings, and loading it restores the old ones into every param group.
FIXED_KEYS = ("optimizer.",)
# [lora] keys that decide which adapter tensors exist and their shapes: the checkpoint's
# weights and optimizer state do not fit adapters built another way (a changed rank fails on
# a shape after the models load; a changed dora_axis can even load, meaning something else).
# lora.alpha and the dropouts only scale or drop, and may change when allowed.
ADAPTER_KEYS = (
    "lora.type",
    "lora.rank",
    "lora.target_modules",
    "lora.train_text_encoder",
    "lora.train_text_encoder_2",
    "lora.text_encoder_target_modules",
    "lora.dora_axis",
    "lora.conv_tucker",
    "lora.factor",
    "lora.decompose_both",
)
# The --allow-change name of a change in the training images themselves (added, removed,
# renamed, re-captioned), which no config key shows.
DATA_KEY = "data.images"
_MODULE_LISTS = ("lora.target_modules", "lora.text_encoder_target_modules")
_TEXT_ENCODER_KEYS = ("lora.train_text_encoder", "lora.train_text_encoder_2")


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Differences between two config dicts as (key, saved value, current value).

    Keys in :data:`FREE_KEYS` are left out. A key present on one side only shows ``<unset>``.
    """
    old, new = flatten(upgrade_saved(saved)), flatten(current)
    diff = []
    for key in sorted(set(old) | set(new)):
        if key.startswith(FREE_KEYS):
            continue
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if a != b:
            diff.append((key, a, b))
    return diff


def is_allowed(key: str, allow: Sequence[str]) -> bool:
    """True when ``key`` is named in ``allow`` by full path, bare name or table."""
    table, _, name = key.rpartition(".")
    return key in allow or name in allow or (table and table in allow)


def check_resumable(
    saved: Mapping[str, Any], current: Mapping[str, Any], allow: Sequence[str], source: str
) -> list[tuple[str, Any, Any]]:
    """Return the allowed differences, or raise ConfigError showing the refused ones.

    Args:
        saved: The checkpoint's config (plus launch facts such as ``launch.num_processes``).
        current: The config being resumed with, in the same shape.
        allow: ``--allow-change`` entries.
        source: The checkpoint folder, for the message.
    """
    diff = config_diff(saved, current)
    settings = (flatten(upgrade_saved(saved)), flatten(current))
    fixed = {k for k, old, new in diff if _cannot_change(k, old, new, settings)}
    refused = [d for d in diff if not is_allowed(d[0], allow) or d[0] in fixed]
    if refused:
        lines = [f"{key}: {old!r} (checkpoint) → {new!r} (now)" for key, old, new in refused]
        names = ",".join(sorted({k for k, _, _ in refused} - fixed))
        if names:
            lines.append(
                "resuming under a different config would not reproduce the run; restore these "
                f"values, or accept the change with --allow-change {names}"
            )
        if any(k.startswith(FIXED_KEYS) for k in fixed):
            lines.append(
                "[optimizer] cannot change on resume, not even with --allow-change: the "
                "checkpoint's optimizer state was built with its settings; resume with the "
                "checkpoint's [optimizer] table, or start a new run"
            )
        adapter = sorted(k for k in fixed if not k.startswith(FIXED_KEYS))
        if adapter:
            lines.append(
                f"{', '.join(adapter)} cannot change on resume, not even with --allow-change: "
                "the checkpoint's LoRA weights and optimizer state are adapter tensors built "
                "with the checkpoint's value; resume with it, or start a new run without "
                "--resume (another output_dir, or --overwrite to replace this one)"
            )
        raise ConfigError(lines, f"resume from {source}")
    return diff


def _cannot_change(
    key: str, old: Any, new: Any, settings: tuple[dict[str, Any], dict[str, Any]]
) -> bool:
    """Whether a changed ``key`` is one no resume can honour (``settings``: both flat configs)."""
    if key.startswith(FIXED_KEYS):
        return True
    if key not in ADAPTER_KEYS:
        return False
    lists = all(isinstance(v, list | tuple) for v in (old, new))
    if key in _MODULE_LISTS and lists and set(old) == set(new):
        return False  # the same modules in another order get the same adapters
    if key == "lora.text_encoder_target_modules":
        # Adapters on no text encoder, before or now: nothing in the checkpoint depends on it.
        return any(config.get(k) for config in settings for k in _TEXT_ENCODER_KEYS)
    return True


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


def data_change(state: Mapping[str, Any], now: Mapping[str, Any], total_updates: int) -> str | None:
    """How the training examples differ from those the checkpoint was trained on, or None.

    Args:
        state: The checkpoint's ``trainer_state.json`` (older ones record only the count).
        now: :func:`data_record` of the examples found now.
        total_updates: The run length planned now.
    """
    saved = state.get("data") or {}
    count = saved.get("examples", state.get("run_facts", {}).get("image_count"))
    if count is None:
        return None  # written before checkpoints recorded their data: nothing to compare
    if count != now["examples"]:
        what = f"now has {now['examples']} training images, the checkpoint was trained on {count}"
    elif "sha256" in saved and saved["sha256"] != now["sha256"]:
        what = f"has {count} training images as before, but images or captions changed"
    else:
        return None
    update = int(state["global_step"])
    message = (
        f"data.path {what} (repeats counted). From update {update} on, the data order differs "
        "from an uninterrupted run on the old images, so the resumed run is not bitwise "
        "reproducible"
    )
    if int(state.get("total_updates", total_updates)) != total_updates:
        message += (
            f"; the run length derives from the data (train.max_steps = 0): {total_updates} "
            f"updates now, {state['total_updates']} before, and the LR curve follows it"
        )
    return message


def comparable_config(config_data: dict, num_processes: int) -> dict:
    """The config plus the launch facts that also shape the run (compared on resume)."""
    return {**config_data, "launch": {"num_processes": num_processes}}


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
    config, accelerator, plan, update = run.config, run.accelerator, run.plan, run.update
    folder = ckpt.step_dir(config.output_dir, update)
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
            files.write_json(tmp / ckpt.LR_SCHEDULER_STATE, lr_state)
            ckpt.save_tensors_state(tmp / ckpt.OPTIMIZER_STATE, checkpoint_state(run.optimizer))
            if accelerator.scaler is not None:
                files.write_json(tmp / ckpt.SCALER_STATE, accelerator.scaler.state_dict())
            (tmp / ckpt.CONFIG_NAME).write_text(to_toml(config.to_dict()))
            # Written last: it records every other file's size and hash, so damage is found
            # before a resume loads anything.
            names = [p.name for p in tmp.iterdir()]
            state = {**trainer_state, "files": ckpt.record_files(tmp, names)}
            files.write_json(tmp / ckpt.TRAINER_STATE, state)

        files.write_folder_atomic(folder, write)
        protect = [folder] + ([run.resumed_from] if run.resumed_from else [])
        ckpt.prune(config.output_dir, config.checkpoint.keep_last, protect)
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
        prediction_type=run.parts.noise_scheduler.config.prediction_type,
        started_at=run.started_at,
    )


def restore_checkpoint(run: RunState, folder: Path) -> int:
    """Load weights, optimizer and scaler state; return the global update to continue from."""
    state = ckpt.read_json(folder, ckpt.TRAINER_STATE)
    lora.load_into(folder / lora.WEIGHTS_NAME, run.unwrapped(run.unet), run.trained_text_encoders())
    load_checkpoint_state(run.optimizer, ckpt.load_tensors_state(folder / ckpt.OPTIMIZER_STATE))
    scaler = run.accelerator.scaler
    if scaler is not None and (folder / ckpt.SCALER_STATE).is_file():
        scaler.load_state_dict(ckpt.read_json(folder, ckpt.SCALER_STATE))
    run.started_at = state.get("run_facts", {}).get("started_at") or run.started_at
    return int(state["global_step"])
