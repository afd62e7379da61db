"""The saved state of an LR schedule: one JSON format for checkpoints and the torch adapter.

The trainer writes it as ``lr_scheduler.json`` beside the LoRA weights in every checkpoint
and in the final output; :class:`schedulers.ScheduleLR` uses it for ``state_dict()``. Shape::

    {
      "format": 1,
      "name": "cosine",                 # registry name or "package.module:Class"
      "params": {"warmup_steps": 100, ...},
      "total_steps": 1000,              # optimizer updates in the run
      "step": 250,                      # updates completed = index of the next update
      "base_lrs": [0.0001, 5e-05],      # one per param group
      "last_lrs": [9.1e-05, 4.5e-05]    # the LRs in the optimizer when saved (informational)
    }

The schedule being pure, a resume recomputes every LR from name, params, total_steps and
base_lrs; ``last_lrs`` is there for people and for consistency checks, never as an input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, SupportsFloat

from schedulers.base import Schedule
from schedulers.config import from_table
from schedulers.errors import SOURCE
from typedtables import ConfigError

FORMAT = 1
KEYS = ("format", "name", "params", "total_steps", "step", "base_lrs", "last_lrs")


def schedule_state(
    schedule: Schedule,
    total_steps: int,
    step: int,
    base_lrs: Sequence[SupportsFloat],
    last_lrs: Sequence[SupportsFloat],
) -> dict[str, Any]:
    """The JSON-able state of a schedule in a run.

    Args:
        schedule: The schedule.
        total_steps: Optimizer updates in the run.
        step: Updates completed so far (the 0-based index of the next update).
        base_lrs: Each param group's base LR.
        last_lrs: The LRs in the optimizer's param groups when saving.

    Returns:
        A dict of plain ints, floats, strings and lists (see the module docs).
    """
    return {
        "format": FORMAT,
        "name": schedule.name,
        "params": schedule.params(),
        "total_steps": int(total_steps),
        "step": int(step),
        "base_lrs": [float(x) for x in base_lrs],
        "last_lrs": [float(x) for x in last_lrs],
    }


def schedule_from_state(state: Mapping[str, Any]) -> Schedule:
    """Rebuild the schedule a state was saved from, through the registry.

    Args:
        state: A dict from :func:`schedule_state` (e.g. ``json.load`` of lr_scheduler.json).

    Returns:
        The schedule, validated like a TOML table.

    Raises:
        ConfigError: The state is malformed, from an unknown format, or names a
            schedule or parameters that no longer load.
    """
    if not isinstance(state, Mapping):
        raise ConfigError([f"lr_scheduler state: expected a dict, got {type(state)}"], SOURCE)
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise ConfigError([f"lr_scheduler state: missing {', '.join(missing)}"], SOURCE)
    if state["format"] != FORMAT:
        raise ConfigError(
            [
                f"lr_scheduler state: format {state['format']!r} is not {FORMAT}, the only "
                "format this version reads"
            ],
            SOURCE,
        )
    if not isinstance(state["params"], Mapping):
        raise ConfigError(["lr_scheduler state: params must be a dict"], SOURCE)
    return from_table({**state["params"], "name": state["name"]})
