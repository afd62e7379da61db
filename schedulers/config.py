"""Build a schedule from its ``[lr_scheduler]`` TOML table, and describe a schedule's keys.

The table is ``{"name": ..., <the schedule's fields>}``. Loading checks every key against the
schedule's dataclass and reports **all** problems at once (unknown name or key, wrong type,
out-of-range value, conflicting keys), each naming its TOML path and suggesting the closest
valid key. Nothing is silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from schedulers import registry
from schedulers.base import Schedule
from schedulers.errors import SOURCE
from typedtables import build_or_raise, describe_choice

# Names other trainers use for our keys, so a ported config gets a precise hint.
PEER_NAMES = {
    "num_warmup_steps": "warmup_steps",
    "lr_warmup_steps": "warmup_steps",
    "warmup_ratio": "warmup_steps",
    "warmup_type": "warmup_shape",
    "warmup_lr_rate": "warmup_start_factor",
    "start_factor": "warmup_start_factor",
    "lr_end": "min_lr",
    "eta_min": "min_lr",
    "min_lr_rate": "min_lr_ratio",
    "lr_num_cycles": "num_cycles",
    "lr_power": "power",
    "T_0": "first_cycle_steps",
    "T_mult": "cycle_mult",
    "decay_type": "decay_shape",
    "num_decay_steps": "decay_ratio",
    "T_max": "period",
}
RUN_LENGTH_KEYS = ("num_training_steps", "total_steps", "max_train_steps", "max_steps")


def from_table(table: Mapping[str, Any], where: str = "lr_scheduler") -> Schedule:
    """Build and validate a schedule from a TOML table.

    Args:
        table: ``{"name": "cosine", "warmup_steps": 100, ...}``.
        where: The table's TOML path, used to name keys in messages.

    Returns:
        The schedule, valid apart from run-length checks (see ``Schedule.check``).

    Raises:
        ConfigError: With every problem found, each naming ``<where>.<key>``.
    """
    return build_or_raise(build, table, where, SOURCE)


def build(table: Any, where: str, problems: list[str]) -> Schedule:
    """Like :func:`from_table`, appending problems to ``problems`` instead of raising (for a
    caller that reports a whole config at once). Returns ``constant`` when the name is bad."""
    return registry.REGISTRY.build(
        table,
        where,
        problems,
        noun="schedule",
        default=None,  # no default schedule: the choice is the point of the table
        fallback="constant",
        hints=dict.fromkeys(
            RUN_LENGTH_KEYS, "the run length comes from train.max_steps (or train.epochs)"
        ),
        peer_names=PEER_NAMES,
    )


def describe(name: str) -> str:
    """Help text for one schedule: its description and formula, then every key.

    Args:
        name: A schedule name or ``"package.module:Class"`` path.

    Returns:
        Multi-line text: ``name``, the class docstring, then one line per key with its type,
        TOML default and doc.
    """
    return describe_choice(registry.get(name), "lr_scheduler")
