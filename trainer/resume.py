"""Writing a run's checkpoint, and resuming from one.

What a checkpoint holds is listed in ``trainer/checkpoint.py``; this module fills it from a
live run and restores a run from it.

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
- ``train.learning_rate`` / ``train.text_encoder_lr``: the new base LRs scale the curve from
  the next update on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from schedulers import schedule_state
from trainer import checkpoint as ckpt
from trainer import lora
from trainer.config import ConfigError, RunConfig, read_toml, tables_hash, to_toml
from trainer.plan import Plan

log = logging.getLogger("sdlora")

# Tables whose change alters the trained weights; their hashes go in trainer_state.json.
HASHED_TABLES = ("model", "lora", "data", "train", "lr_scheduler")
# Keys that do not influence the trained weights, so they may differ freely on resume.
FREE_KEYS = ("output_dir", "logging.", "checkpoint.", "data.num_workers")
# How the final files are written (format, dtype, name) never changes the trained weights.
FREE_KEYS += ("output.", "lora.save_dtype")


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"seed": 1}}`` → ``{"train.seed": 1}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Differences between two config dicts as (key, saved value, current value).

    Keys in :data:`FREE_KEYS` are left out. A key present on one side only shows ``<unset>``.
    """
    old, new = flatten(saved), flatten(current)
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
    refused = [d for d in diff if not is_allowed(d[0], allow)]
    if refused:
        lines = [f"{key}: {old!r} (checkpoint) → {new!r} (now)" for key, old, new in refused]
        names = ",".join(sorted({k for k, _, _ in refused}))
        lines.append(
            "resuming under a different config would not reproduce the run; restore these "
            f"values, or accept the change with --allow-change {names}"
        )
        raise ConfigError(lines, f"resume from {source}")
    return diff


def comparable_config(config_data: dict, num_processes: int) -> dict:
    """The config plus the launch facts that also shape the run (compared on resume)."""
    return {**config_data, "launch": {"num_processes": num_processes}}


def find_resume_point(config: RunConfig, num_processes: int) -> Path | None:
    """The checkpoint to resume from, after checking the config may resume it."""
    output_dir = Path(config.output_dir)
    if not config.checkpoint.resume:
        if ckpt.list_checkpoints(output_dir):
            raise ConfigError(
                [
                    f"output_dir = {str(output_dir)!r} already holds checkpoints of a run; "
                    "resume it with --resume latest, or choose another output_dir"
                ]
            )
        return None
    folder = ckpt.resolve(output_dir, config.checkpoint.resume)
    if folder is None:
        log.info("--resume latest: no checkpoint in %s yet; starting from update 0", output_dir)
        return None
    saved = read_toml(folder / ckpt.CONFIG_NAME)
    schedule_json = ckpt.read_json(folder, ckpt.LR_SCHEDULER_STATE)
    saved["lr_scheduler"] = {"name": schedule_json["name"], **schedule_json["params"]}
    state = ckpt.read_json(folder, ckpt.TRAINER_STATE)
    saved = comparable_config(saved, state["num_processes"])
    current = comparable_config(config.to_dict(), num_processes)
    allowed = check_resumable(saved, current, config.checkpoint.allow_change, str(folder))
    for key, old, new in allowed:
        log.warning("resume: %s changed from %r to %r (allowed)", key, old, new)
    return folder


def save_checkpoint(
    config: RunConfig,
    accelerator: Accelerator,
    plan: Plan,
    update: int,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    base_lrs: list[float],
    resumed_from: Path | None,
) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically (main process) and prune old ones, never
    the checkpoint this run resumed from."""
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
            "rng": "every draw is seeded from (seed, counters) by trainer.order.seed_for",
            "num_processes": accelerator.num_processes,
            "config_hashes": {t: tables_hash(config, [t]) for t in HASHED_TABLES},
        }
        last_lrs = [group["lr"] for group in optimizer.param_groups]
        lr_state = schedule_state(
            config.lr_scheduler, plan.total_updates, update, base_lrs, last_lrs
        )
        models_to_save = (
            accelerator.unwrap_model(unet),
            accelerator.unwrap_model(text_encoder) if text_encoder is not None else None,
        )

        def write(tmp: Path) -> None:
            lora.save(tmp, *models_to_save, dtype="fp32", training_metadata=trainer_state)
            ckpt.write_json(tmp / ckpt.LR_SCHEDULER_STATE, lr_state)
            ckpt.write_json(tmp / ckpt.TRAINER_STATE, trainer_state)
            ckpt.save_tensors_state(tmp / ckpt.OPTIMIZER_STATE, optimizer.state_dict())
            if accelerator.scaler is not None:
                ckpt.write_json(tmp / ckpt.SCALER_STATE, accelerator.scaler.state_dict())
            (tmp / ckpt.CONFIG_NAME).write_text(to_toml(config.to_dict()))

        ckpt.save_atomic(folder, write)
        protect = [folder] + ([resumed_from] if resumed_from else [])
        ckpt.prune(config.output_dir, config.checkpoint.keep_last, protect)
    accelerator.wait_for_everyone()
    return folder


def restore_checkpoint(
    folder: Path,
    accelerator: Accelerator,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
) -> int:
    """Load weights, optimizer and scaler state; return the global update to continue from."""
    state = ckpt.read_json(folder, ckpt.TRAINER_STATE)
    lora.load_into(
        folder / lora.WEIGHTS_NAME,
        accelerator.unwrap_model(unet),
        accelerator.unwrap_model(text_encoder) if text_encoder is not None else None,
    )
    optimizer.load_state_dict(ckpt.load_tensors_state(folder / ckpt.OPTIMIZER_STATE))
    if accelerator.scaler is not None and (folder / ckpt.SCALER_STATE).is_file():
        accelerator.scaler.load_state_dict(ckpt.read_json(folder, ckpt.SCALER_STATE))
    return int(state["global_step"])
