"""Learning-rate schedules: exact, documented, pluggable.

A schedule is a frozen dataclass whose ``lr(step, total_steps, base_lr)`` is a pure function
of the optimizer-update index. Look one up by name with :func:`get`, build one from a TOML
table with :func:`from_table`, drive any PyTorch loop with :class:`ScheduleLR`, and save or
restore it with :func:`schedule_state` / :func:`schedule_from_state`. See docs/schedules.md.
"""

from schedulers import (  # noqa: F401  (imported so every built-in registers itself)
    constant,
    constant_with_warmup,
    cosine,
    cosine_with_restarts,
    exponential_ramp,
    inverse_sqrt,
    linear,
    multistep,
    piecewise_constant,
    polynomial,
    rex,
    sine,
    step,
    warmup_stable_decay,
)
from schedulers.base import DecaySchedule, Schedule
from schedulers.config import describe, from_table
from schedulers.errors import ScheduleConfigError, ScheduleRegistryError, UnknownScheduleError
from schedulers.registry import ENTRY_POINT_GROUP, available, get, register
from schedulers.state import schedule_from_state, schedule_state

__all__ = [
    "ENTRY_POINT_GROUP",
    "DecaySchedule",
    "Schedule",
    "ScheduleConfigError",
    "ScheduleLR",
    "ScheduleRegistryError",
    "UnknownScheduleError",
    "available",
    "describe",
    "from_table",
    "get",
    "register",
    "schedule_from_state",
    "schedule_state",
]


def __getattr__(name: str):
    # The torch adapter is imported on first use, so the command line and config loading
    # start without importing torch.
    if name == "ScheduleLR":
        from schedulers.adapter import ScheduleLR

        return ScheduleLR
    raise AttributeError(f"module 'schedulers' has no attribute {name!r}")
