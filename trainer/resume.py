"""Deciding whether a checkpoint may be resumed under the current config.

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

from collections.abc import Mapping, Sequence
from typing import Any

from trainer.config import ConfigError

# Keys that do not influence the trained weights, so they may differ freely on resume.
FREE_KEYS = ("output_dir", "logging.", "checkpoint.", "data.num_workers")


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
