"""Build a schedule from its ``[lr_scheduler]`` TOML table, and describe a schedule's keys.

The table is ``{"name": ..., <the schedule's fields>}``. Loading checks every key against the
schedule's dataclass and reports **all** problems at once (unknown name or key, wrong type,
out-of-range value, conflicting keys), each naming its TOML path and suggesting the closest
valid key. Nothing is silently ignored.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

from schedulers import registry
from schedulers.base import Schedule
from schedulers.errors import SOURCE, ScheduleRegistryError, UnknownScheduleError
from typedtables import ConfigError, build_table, describe_table, field_types, toml_value

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
    problems: list[str] = []
    schedule = build(table, where, problems)
    if problems:
        raise ConfigError(problems, SOURCE)
    return schedule


def build(table: Any, where: str, problems: list[str]) -> Schedule:
    """Like :func:`from_table`, appending problems to ``problems`` instead of raising (for a
    caller that reports a whole config at once). Returns ``constant`` when the name is bad."""
    fallback = registry.get("constant")()
    if not isinstance(table, Mapping):
        problems.append(f"[{where}]: expected a table, got {type(table).__name__}")
        return fallback
    name = table.get("name")
    if name is None:
        problems.append(f"{where}.name: required; one of {', '.join(registry.available())}")
        return fallback
    if not isinstance(name, str):
        problems.append(
            f"{where}.name: expected a schedule name (str), got {type(name).__name__} {name!r}"
        )
        return fallback
    try:
        cls = registry.get(name)
    except (UnknownScheduleError, ScheduleRegistryError) as err:
        # Without the class there is no schema to check the other keys against.
        problems.append(f"{where}.name: {err}")
        return fallback
    return build_table(cls, table, where, problems, unknown=unknown_key, skip=("name",))


def unknown_key(cls: type[Schedule], key: str, where: str) -> str:
    """The message for a key ``cls`` does not have, with the most useful hint found."""
    keys = list(field_types(cls))
    message = f"{where}.{key}: unknown key for the {cls.name!r} schedule"
    peer = PEER_NAMES.get(key)
    if peer in keys:
        return f"{message}; sdlora calls it {where}.{peer}"
    if key in RUN_LENGTH_KEYS:
        return f"{message}; the run length comes from train.max_steps (or train.epochs)"
    close = difflib.get_close_matches(key, keys, n=1)
    if close:
        return f"{message}; did you mean {where}.{close[0]}?"
    owners = [n for n in _registered() if key in field_types(registry.get(n))]
    if owners:
        return f"{message}; it is a key of: {', '.join(owners)}"
    return f"{message}; its keys are: name, {', '.join(keys)}"


def _registered() -> list[str]:
    # Only names already loaded: a hint must not import every plug-in.
    return sorted(registry.REGISTRY.loaded())


def describe(name: str) -> str:
    """Help text for one schedule: its description and formula, then every key.

    Args:
        name: A schedule name or ``"package.module:Class"`` path.

    Returns:
        Multi-line text: ``name``, the class docstring, then one line per key with its type,
        TOML default and doc.
    """
    cls = registry.get(name)
    lines = [f"{cls.name}", ""]
    text = inspect.getdoc(cls) or ""
    lines += [f"  {line}".rstrip() for line in text.splitlines()]
    lines += ["", f"  keys of [lr_scheduler] with name = {toml_value(cls.name)}:"]
    lines.append(describe_table(cls, "", indent="    "))
    return "\n".join(lines)
