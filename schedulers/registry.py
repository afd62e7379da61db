"""Find LR schedules by name: built-ins, entry-point plug-ins and "package.module:Class" paths.

- Built-ins register themselves with ``@register("cosine")`` when ``schedulers`` is imported.
- Third-party packages declare an entry point in the group ``sdlora.lr_schedulers``
  (``my_schedule = "my_pkg.schedules:MySchedule"`` under
  ``[project.entry-points."sdlora.lr_schedulers"]`` in their ``pyproject.toml``). The group is
  read on the first lookup, not at import time, and a plug-in module is only imported when its
  name is asked for.
- Any importable schedule can also be named by its path, ``name = "my_pkg.mod:MySchedule"``;
  it is not registered, and its ``name`` stays its path.

The mechanism is :class:`typedtables.registry.Registry` (the optimizers use it too); this
module holds the LR schedules' one and the contract only a schedule has: a curve.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from schedulers.base import DecaySchedule, Schedule
from schedulers.errors import ScheduleRegistryError
from typedtables.registry import Registry

ENTRY_POINT_GROUP = "sdlora.lr_schedulers"

S = TypeVar("S", bound=type[Schedule])


def _has_a_curve(cls: type[Schedule], what: str) -> None:
    if cls.after_warmup is Schedule.after_warmup or (
        issubclass(cls, DecaySchedule)
        and cls.after_warmup is DecaySchedule.after_warmup
        and cls.decay is DecaySchedule.decay
    ):
        raise ScheduleRegistryError(
            f"{what}: {cls.__qualname__} implements neither decay() nor after_warmup()"
        )


REGISTRY: Registry[type[Schedule]] = Registry(
    "LR schedule", Schedule, ENTRY_POINT_GROUP, _has_a_curve, base_name="schedulers.Schedule"
)


def register(name: str) -> Callable[[S], S]:
    """Class decorator registering a schedule under ``name`` (``[lr_scheduler] name``).

    Raises:
        ScheduleRegistryError: The name is malformed or already taken by another class, or
            the class breaks the Schedule contract: a ``@dataclass(frozen=True)`` subclass of
            :class:`Schedule` implementing ``after_warmup`` (or ``decay``), every field
            documented.
    """
    add = REGISTRY.register(name)

    def decorate(cls: S) -> S:
        add(cls)  # checks and registers it; returning `cls` here keeps its own type
        return cls

    return decorate


def get(name: str) -> type[Schedule]:
    """The schedule class for a registered name, an entry-point name, or a
    ``"package.module:Class"`` path (call it with its fields to build a schedule).

    Raises:
        UnknownScheduleError: No schedule has that name (the message suggests the closest).
        ScheduleRegistryError: A plug-in or path failed to load, or two plug-ins clash.
    """
    return REGISTRY.get(name)


def available() -> list[str]:
    """Every schedule name: built-ins, registered plug-ins and entry points, sorted."""
    return REGISTRY.available()


def refresh_entry_points() -> None:
    """Forget the entry points read so far; the next lookup reads them again (after installing
    a plug-in into a running process, and in tests)."""
    REGISTRY.refresh_entry_points()
