"""Dataclass fields that document themselves, and the type checks the TOML loader runs on them.

A table's fields (a config table's, a schedule's, an optimizer's) are its schema and its help
text at once: each carries a one-line doc in ``metadata["doc"]``, and its annotation says
which TOML values it accepts. Supported annotations: ``bool``, ``int``, ``float``, ``str``,
``Literal[...]`` of strings, unions of those (``int | float``), and ``tuple[X, ...]``
(written as a TOML array).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import json
import math
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal

_MISSING = dataclasses.MISSING


def doc(text: str, default: Any = _MISSING) -> Any:
    """A dataclass field carrying a one-line doc.

    Args:
        text: The field's one-line documentation, shown by ``describe()``.
        default: The default value; a list becomes a tuple so frozen schedules stay hashable.

    Returns:
        A ``dataclasses.field`` with ``metadata={"doc": text}``.
    """
    if isinstance(default, list):
        default = tuple(default)
    return dataclasses.field(default=default, metadata={"doc": text})


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every dataclass field of ``cls`` (cached per class)."""
    # A plain function in front of the cache: mypy does not see ``type[X]`` as Hashable, the
    # cache's argument type (python/mypy#11470), so every caller passing a class would fail.
    return _field_types(cls)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def type_name(tp: Any) -> str:
    """A short human name for an annotation: ``int | float``, ``"hard" | "soft"``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(toml_value(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def toml_value(value: Any) -> str:
    """A Python value written as TOML: ``false``, ``"text"``, ``[1, 2]``, ``1e-8``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, float):
        text = repr(value)
        if "e" in text:  # 1e-08 -> 1e-8: valid either way, but the short form is what people write
            mantissa, exponent = text.split("e")
            text = f"{mantissa}e{int(exponent)}"
        return text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def check_value(value: Any, tp: Any) -> tuple[Any, str | None]:
    """Check a TOML value against a field annotation.

    Args:
        value: The value as parsed from TOML (or given in Python).
        tp: The field's resolved annotation.

    Returns:
        ``(coerced, None)`` when the value fits (an int becomes a float for a float field, a
        list becomes a tuple), else ``(value, problem)`` with a message such as
        ``"expected float, got str 'abc'"``.
    """
    ok, coerced = _fits(value, tp)
    if ok:
        return coerced, None
    if typing.get_origin(tp) is Literal and isinstance(value, str):
        choices = [a for a in typing.get_args(tp) if isinstance(a, str)]
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"; did you mean {toml_value(close[0])}?" if close else ""
        return value, f"{toml_value(value)} is not one of {type_name(tp)}{hint}"
    if isinstance(value, float) and not math.isfinite(value):
        return value, f"expected a finite {type_name(tp)}, got {value!r}"
    return value, f"expected {type_name(tp)}, got {type(value).__name__} {value!r}"


def _fits(value: Any, tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp) and isinstance(value, str), value
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(tp)
        # An arm that takes the value as it is wins over one that would convert it,
        # so `int | float` keeps 3 an int and 0.5 a float.
        for arm in arms:
            if _exact(value, arm):
                return True, value
        for arm in arms:
            ok, coerced = _fits(value, arm)
            if ok:
                return True, coerced
        return False, value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        item_tp = typing.get_args(tp)[0]
        items = []
        for item in value:
            ok, coerced = _fits(item, item_tp)
            if not ok:
                return False, value
            items.append(coerced)
        return True, tuple(items)
    if tp is float:
        # bool is an int subclass; True is never a learning rate.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return math.isfinite(value), float(value)
        return False, value
    return _exact(value, tp), value


def _exact(value: Any, tp: Any) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, float) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    return False


def field_problems(obj: Any, where: str) -> list[str]:
    """Type problems of every field of a dataclass instance, as ``where.key: message``."""
    problems = []
    for name, tp in field_types(type(obj)).items():
        _, problem = check_value(getattr(obj, name), tp)
        if problem:
            problems.append(f"{where}.{name}: {problem}")
    return problems


def increasing_from_one(values: Sequence[int]) -> bool:
    """True when ``values`` start at 1 or later and strictly increase (milestones, bounds)."""
    return (not values or values[0] >= 1) and all(a < b for a, b in itertools.pairwise(values))
