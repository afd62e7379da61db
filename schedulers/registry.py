"""Find LR schedules by name: built-ins, entry-point plug-ins and "package.module:Class" paths.

- Built-ins register themselves with ``@register("cosine")`` when ``schedulers`` is imported.
- Third-party packages declare an entry point in the group ``sdlora.lr_schedulers``
  (``my_schedule = "my_pkg.schedules:MySchedule"`` under
  ``[project.entry-points."sdlora.lr_schedulers"]`` in their ``pyproject.toml``). The group is
  read on the first lookup, not at import time, and a plug-in module is only imported when its
  name is asked for.
- Any importable schedule can also be named by its path, ``name = "my_pkg.mod:MySchedule"``.

Lookups fail loudly and never return ``None``: an unknown name lists what exists and suggests
the closest; a duplicate name names both definitions; a broken plug-in says what failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import importlib.metadata
import re
from collections.abc import Callable, Iterator
from typing import TypeVar

from schedulers.base import DecaySchedule, Schedule
from schedulers.errors import ScheduleRegistryError, UnknownScheduleError

ENTRY_POINT_GROUP = "sdlora.lr_schedulers"

S = TypeVar("S", bound=type[Schedule])

_schedules: dict[str, type[Schedule]] = {}
# Entry points by name, read once on the first lookup; None until then.
_entry_points: dict[str, importlib.metadata.EntryPoint] | None = None

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def origin(cls: type) -> str:
    """Where a class is defined, as ``module:QualName``."""
    return f"{cls.__module__}:{cls.__qualname__}"


def register(name: str) -> Callable[[S], S]:
    """Class decorator registering a schedule under ``name``.

    Args:
        name: The name used in ``[lr_scheduler] name = ...``; letters, digits, ``_ . -``.

    Returns:
        The decorator; it sets the class's ``name`` and returns the class unchanged.

    Raises:
        ScheduleRegistryError: The name is malformed or already taken by another class, or
            the class breaks the Schedule contract (see :func:`check_class`).
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ScheduleRegistryError(
            f"LR schedule name {name!r}: use letters, digits, '_', '.' or '-' "
            "(':' is reserved for 'package.module:Class' paths)"
        )

    def decorate(cls: S) -> S:
        check_class(cls, f"@register({name!r}) on {origin(cls)}")
        _add(name, cls)
        return cls

    return decorate


def _add(name: str, cls: type[Schedule]) -> None:
    existing = _schedules.get(name)
    # The same module:qualname again is a re-import (importlib.reload), not a clash.
    if existing is not None and origin(existing) != origin(cls):
        raise ScheduleRegistryError(
            f"LR schedule name {name!r} is defined twice: by {origin(existing)} and by "
            f"{origin(cls)}; rename one of them"
        )
    _schedules[name] = cls
    # A class registered under a second name (an alias) keeps its first name.
    if cls.name in ("", origin(cls)):
        cls.name = name


def check_class(obj: object, what: str) -> None:
    """Raise :class:`ScheduleRegistryError` unless ``obj`` honours the Schedule contract.

    The contract: a subclass of :class:`Schedule`, decorated ``@dataclass(frozen=True)``
    itself, implementing ``after_warmup`` (or ``decay``), every field documented.
    """
    if not (isinstance(obj, type) and issubclass(obj, Schedule)):
        shown = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)
        kind = "class" if isinstance(obj, type) else type(obj).__name__
        raise ScheduleRegistryError(
            f"{what}: {shown!r} is a {kind}, not a subclass of schedulers.Schedule"
        )
    # An undecorated subclass inherits __dataclass_params__, so look at the class itself.
    params = vars(obj).get("__dataclass_params__")
    if params is None or not params.frozen:
        raise ScheduleRegistryError(f"{what}: decorate {obj.__qualname__} @dataclass(frozen=True)")
    if obj.after_warmup is Schedule.after_warmup or (
        issubclass(obj, DecaySchedule)
        and obj.after_warmup is DecaySchedule.after_warmup
        and obj.decay is DecaySchedule.decay
    ):
        raise ScheduleRegistryError(
            f"{what}: {obj.__qualname__} implements neither decay() nor after_warmup()"
        )
    undocumented = [f.name for f in dataclasses.fields(obj) if not f.metadata.get("doc")]
    if undocumented:
        raise ScheduleRegistryError(
            f"{what}: fields without a one-line doc: {', '.join(undocumented)}; declare them "
            "with typedtables.doc(text, default)"
        )
    if "name" in {f.name for f in dataclasses.fields(obj)}:
        raise ScheduleRegistryError(f"{what}: 'name' is reserved for the schedule's name")


def get(name: str) -> type[Schedule]:
    """The schedule class for a name or a ``"package.module:Class"`` path.

    Args:
        name: A registered name, an entry-point name, or a dotted path with a colon.

    Returns:
        The schedule class (call it with its fields to build a schedule).

    Raises:
        UnknownScheduleError: No schedule has that name.
        ScheduleRegistryError: A plug-in or path failed to load, or two plug-ins clash.
    """
    if not isinstance(name, str) or not name:
        raise UnknownScheduleError(repr(name), available(), None)
    if ":" in name:
        return load_path(name)
    entry_points = _scan_entry_points()
    if name in _schedules:
        return _schedules[name]
    if name in entry_points:
        return _load_entry_point(entry_points[name])
    names = available()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    raise UnknownScheduleError(name, names, close[0] if close else None)


def available() -> list[str]:
    """Every schedule name: built-ins, registered plug-ins and entry points, sorted."""
    return sorted(set(_schedules) | set(_scan_entry_points()))


def refresh_entry_points() -> None:
    """Forget the entry points read so far; the next lookup reads them again.

    Useful after installing a plug-in into a running process, and in tests.
    """
    global _entry_points
    _entry_points = None


def _scan_entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    global _entry_points
    if _entry_points is not None:
        return _entry_points
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        other = found.get(ep.name)
        if other is not None and other.value != ep.value:
            raise ScheduleRegistryError(
                f"LR schedule name {ep.name!r} is defined twice in the entry-point group "
                f"{ENTRY_POINT_GROUP}: {other.value} ({_dist(other)}) and {ep.value} "
                f"({_dist(ep)}); uninstall one of them"
            )
        known = _schedules.get(ep.name)
        if known is not None and origin(known) != ep.value:
            raise ScheduleRegistryError(
                f"LR schedule name {ep.name!r} is defined twice: by {origin(known)} and by the "
                f"entry point {ep.value} ({_dist(ep)}); a plug-in cannot reuse a taken name"
            )
        found[ep.name] = ep
    _entry_points = found
    return found


def _dist(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return (
        f"distribution {dist.name} {dist.version}" if dist is not None else "unknown distribution"
    )


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> type[Schedule]:
    what = (
        f"LR schedule plug-in {ep.name!r} (entry point '{ep.name} = {ep.value}' in group "
        f"{ENTRY_POINT_GROUP}, {_dist(ep)})"
    )
    try:
        obj = ep.load()
    except Exception as err:
        raise ScheduleRegistryError(f"{what} failed to load: {type(err).__name__}: {err}") from err
    check_class(obj, what)
    _add(ep.name, obj)
    return obj


def load_path(path: str) -> type[Schedule]:
    """Import a schedule class from ``"package.module:ClassName"``.

    Args:
        path: Module path, a colon, and the class's (possibly dotted) qualified name.

    Returns:
        The class. It is not registered; its ``name`` stays its path unless it registered
        itself under a shorter name when its module was imported.

    Raises:
        ScheduleRegistryError: The path is malformed, the module is not found or fails to
            import, the attribute is missing, or it is not a Schedule subclass.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ScheduleRegistryError(
            f"LR schedule {path!r}: expected 'package.module:ClassName', one colon"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # Tell "no such module" apart from a module that exists but imports something missing.
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ScheduleRegistryError(
                f"LR schedule {path!r}: module {module_name!r} not found; is its package "
                "installed, or its folder on PYTHONPATH?"
            ) from err
        raise ScheduleRegistryError(
            f"LR schedule {path!r}: importing module {module_name!r} failed: {err}"
        ) from err
    except Exception as err:
        raise ScheduleRegistryError(
            f"LR schedule {path!r}: importing module {module_name!r} raised "
            f"{type(err).__name__}: {err}"
        ) from err
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            classes = [
                k
                for k, v in vars(module).items()
                if isinstance(v, type) and issubclass(v, Schedule)
            ]
            close = difflib.get_close_matches(part, classes, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ScheduleRegistryError(
                f"LR schedule {path!r}: module {module_name!r} has no attribute {attr!r}{hint}"
            )
        obj = getattr(obj, part)
    check_class(obj, f"LR schedule {path!r}")
    return obj  # type: ignore[return-value]


@contextlib.contextmanager
def _isolated() -> Iterator[None]:
    """Test helper: undo every registration and entry-point scan made inside the block."""
    global _entry_points
    saved = dict(_schedules)
    names = {cls: cls.name for cls in saved.values()}
    saved_eps = _entry_points
    try:
        yield
    finally:
        _schedules.clear()
        _schedules.update(saved)
        for cls, name in names.items():
            cls.name = name
        _entry_points = saved_eps
