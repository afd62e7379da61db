"""Build a frozen, typed table from TOML data, and describe one: the one mechanism every config
table uses (the run config's tables, each LR schedule, each optimizer).

A table is a frozen dataclass whose fields carry a one-line doc (:func:`doc`). Building one
checks every key against the fields and collects **all** problems instead of stopping at the
first: an unknown key (with the closest valid key as a hint), a value of the wrong type, and
then the table's own range checks, its ``problems(where)`` method. Checks that span several
tables belong to whoever assembles them (``trainer.config.load.cross_checks``).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

from typedtables.fields import check_value, field_types, toml_value, type_name

T = TypeVar("T")


class NamedTable(Protocol):
    """A table class chosen by ``name`` in a table (an LR schedule, an optimizer): a dataclass
    whose ``name`` class attribute is what the table writes."""

    name: ClassVar[str]
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


class ConfigError(ValueError):
    """Every problem found in a config (or one table of it), reported together.

    Attributes:
        problems: One human message per problem, each starting with the key it is about
            (``train.batch_size: ...``).
        source: What was read: a file name, ``--set``, a sweep trial...
    """

    def __init__(self, problems: Sequence[str], source: str = "config") -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(self.problems)

    def __reduce__(self) -> tuple:
        # Rebuild from both arguments, so the error survives pickling across processes.
        return type(self), (self.problems, self.source)

    def __str__(self) -> str:
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"{len(self.problems)} problem(s) in {self.source}:\n{lines}"


def closest(key: str, options: Sequence[str]) -> str | None:
    """The option closest to a misspelled ``key``, or None when nothing is close."""
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return match[0] if match else None


def unknown_key_hint(key: str, options: Sequence[str]) -> str:
    """``; did you mean 'x'?`` for a near miss, else the list of valid keys."""
    near = closest(key, options)
    return f"; did you mean '{near}'?" if near else f"; valid keys: {', '.join(options)}"


UnknownKey = Callable[[type, str, str], str]


def build_table(
    cls: type[T],
    table: Any,
    where: str,
    problems: list[str],
    unknown: UnknownKey | None = None,
    skip: Sequence[str] = (),
) -> T:
    """Build one frozen table, appending every problem found to ``problems`` instead of raising.

    Args:
        cls: The table's dataclass.
        table: The TOML data (a mapping; anything else is a problem).
        where: The table's TOML path (``train``, ``lr_scheduler``), used to name keys.
        problems: Receives one message per problem.
        unknown: Builds the message for an unknown key, ``unknown(cls, key, where)``; the
            default suggests the closest field.
        skip: Keys handled by the caller (``name`` in a registry-resolved table).

    Returns:
        The table. Ill-typed keys keep their defaults, so the table's own range checks, run
        after the type checks, only see well-typed values.
    """
    if not isinstance(table, Mapping):
        problems.append(f"[{where}]: expected a table, got {type(table).__name__}")
        return cls()
    types = field_types(cls)
    values: dict[str, Any] = {}
    found: list[str] = []
    for key, raw in table.items():
        if key in skip:
            continue
        if key not in types:
            if unknown is not None:
                found.append(unknown(cls, key, where))
            else:
                found.append(f"{where}.{key}: unknown key{unknown_key_hint(key, list(types))}")
            continue
        value, problem = check_value(raw, types[key])
        if problem:
            found.append(f"{where}.{key}: {problem}")
        else:
            values[key] = value
    built = cls(**values)
    own = getattr(built, "problems", None)
    if callable(own):
        found += [p for p in own(where) if p not in found]
    problems.extend(found)
    return built


def describe_table(cls: type, where: str, indent: str = "  ", first: Sequence[str] = ()) -> str:
    """Every key of a table with its type, TOML default and one-line doc.

    Args:
        cls: The table's dataclass.
        where: Its TOML path, printed as the ``[where]`` header (empty: no header).
        indent: Put before every key line.
        first: Extra lines printed before the keys (e.g. ``name``'s own line).
    """
    lines = [f"[{where}]"] if where else []
    lines += [f"{indent}{line}" for line in first]
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        default = f.default
        if default is dataclasses.MISSING:
            shown = "required"
        elif dataclasses.is_dataclass(default):
            continue  # a nested table is described under its own header
        else:
            shown = f"default {toml_value(default)}"
        lines.append(f"{indent}{f.name} ({type_name(types[f.name])}, {shown}): {f.metadata['doc']}")
    return "\n".join(lines)


def class_summary(cls: type) -> str:
    """The first line of a class's docstring (empty when it has none)."""
    text = inspect.getdoc(cls) or ""
    return text.splitlines()[0] if text else ""


def build_or_raise(
    build: Callable[[Any, str, list[str]], T], table: Any, where: str, source: str
) -> T:
    """Run a problem-collecting ``build(table, where, problems)`` and raise them all at once.

    For a table read on its own (one LR schedule, one optimizer) rather than as part of a
    config that reports every table's problems together.

    Raises:
        ConfigError: With every problem found, from ``source``.
    """
    problems: list[str] = []
    built = build(table, where, problems)
    if problems:
        raise ConfigError(problems, source)
    return built


def describe_choice(cls: type[NamedTable], where: str, notes: Sequence[str] = ()) -> str:
    """Help text for a class chosen by ``name`` in a table (a schedule, an optimizer).

    Args:
        cls: The registered class; its ``name`` class attribute is what the table writes.
        where: The table's TOML path (``lr_scheduler``).
        notes: Lines printed between the docstring and the keys (what it needs installed).

    Returns:
        Multi-line text: ``name``, the class docstring, the notes, then one line per key with
        its type, TOML default and doc.
    """
    lines = [f"{cls.name}", ""]
    text = inspect.getdoc(cls) or ""
    lines += [f"  {line}".rstrip() for line in text.splitlines()]
    for note in notes:
        lines += ["", f"  {note}"]
    lines += ["", f"  keys of [{where}] with name = {toml_value(cls.name)}:"]
    lines.append(describe_table(cls, "", indent="    "))
    return "\n".join(lines)
