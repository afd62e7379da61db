"""Whether a checkpoint may be resumed under the current config.

A checkpoint is written and restored by ``trainer/run/checkpoint.py``. Which checkpoint a run
resumes from (and whether it needs to train at all) is decided before any model loads, in
``trainer/run/preflight.py``, with the rules of this module:

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

A **shared prefix** (a sweep trains the updates that several trials share once, then each
trial resumes from a checkpoint at its branch point, ``trainer/sweep/prefixes.py``): a
checkpoint folder holding :data:`BRANCH_MARKER` may be resumed under another LR schedule and
run length (:data:`PREFIX_KEYS`) without ``--allow-change``, and under no other change, when
the new schedule applies exactly the LRs the checkpoint was trained with at every update
before it (:func:`prefix_lr_problem`, checked once the run length is known). The resumed run
is then the run the new config trains from scratch, bit for bit.

Some keys cannot change even when allowed, and are refused before any model loads:
``[optimizer]`` (:data:`FIXED_KEYS`), and the ``[lora]`` keys that decide which adapter tensors
exist and their shapes (:data:`ADAPTER_KEYS`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config.deprecated import upgrade_saved
from trainer.config.load import ConfigError, flatten

if TYPE_CHECKING:
    from schedulers import Schedule

log = logging.getLogger("sdlora")

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
# Keys that decide the optimizer's param groups (trainer/config/lr_groups.py): the saved
# optimizer state holds one entry per group, and loading it into other groups would either
# fail or give a tensor another tensor's moments.
GROUP_KEYS = ("lora.plus_ratio", "lora.down_lr_weight", "lora.mid_lr_weight", "lora.up_lr_weight")
# The --allow-change name of a change in the training images themselves (added, removed,
# renamed, re-captioned), which no config key shows.
DATA_KEY = "data.images"
# In a checkpoint folder: this checkpoint is a shared prefix's branch point (see above).
BRANCH_MARKER = "branch.json"
# What a run resuming a branch point may differ in, without --allow-change: the LR schedule
# and the run length (whose LRs before the branch point must agree, prefix_lr_problem).
PREFIX_KEYS = ("lr_scheduler", "train.max_steps", "train.epochs")
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
    return key in allow or name in allow or (table != "" and table in allow)


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
        groups = sorted(k for k in fixed if k in GROUP_KEYS)
        if groups:
            lines.append(
                f"{', '.join(groups)} cannot change on resume, not even with --allow-change: "
                "they decide the optimizer's param groups, and the checkpoint's optimizer "
                "state holds the old ones; resume with the checkpoint's values, or start a "
                "new run (another LoRA+ ratio, both non-zero, may change when allowed)"
            )
        adapter = sorted(k for k in fixed if not k.startswith(FIXED_KEYS) and k not in GROUP_KEYS)
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
    if key in GROUP_KEYS:
        # The same groups with other LRs (one LoRA+ ratio for another) fit the saved state.
        return bool(old) != bool(new) or key != "lora.plus_ratio"
    if key not in ADAPTER_KEYS:
        return False
    lists = all(isinstance(v, list | tuple) for v in (old, new))
    if key in _MODULE_LISTS and lists and set(old) == set(new):
        return False  # the same modules in another order get the same adapters
    if key == "lora.text_encoder_target_modules":
        # Adapters on no text encoder, before or now: nothing in the checkpoint depends on it.
        return any(config.get(k) for config in settings for k in _TEXT_ENCODER_KEYS)
    return True


def data_change(state: Mapping[str, Any], now: Mapping[str, Any], total_updates: int) -> str | None:
    """How the training examples differ from those the checkpoint was trained on, or None.

    Args:
        state: The checkpoint's ``trainer_state.json`` (older ones record only the count).
        now: :func:`trainer.run.checkpoint.data_record` of the examples found now.
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


def branch_marker(folder: Path) -> dict[str, Any] | None:
    """The branch marker of a checkpoint folder (a shared prefix's branch point), or None."""
    try:
        marker = json.loads((folder / BRANCH_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def prefix_lr_problem(
    saved: Mapping[str, Any],
    schedule: Schedule,
    total_updates: int,
    base_lrs: Sequence[float],
    updates: int,
) -> str | None:
    """Whether ``schedule`` over ``total_updates`` applies, at every update before
    ``updates``, exactly the LRs of the saved schedule (a checkpoint's ``lr_scheduler.json``);
    the first update where it does not, said, else None."""
    from schedulers import schedule_from_state

    before = schedule_from_state(saved)
    for update in range(updates):
        old = before.lrs(update, int(saved["total_steps"]), saved["base_lrs"])
        new = schedule.lrs(update, total_updates, base_lrs)
        if old != new:
            return (
                f"the checkpoint is a shared prefix trained with other LRs: at update "
                f"{update + 1} its schedule applied {old} and this run's applies {new}; resume "
                "it only with a schedule and run length whose LRs agree up to it"
            )
    return None
