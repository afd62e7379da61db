"""Override values of a sweep as ``--set`` flags, and their short labels.

One rule for every table, in ``[set]``, ``[grid]``, ``[[trials]]`` and ``[search]`` alike:

- a table that has a ``name`` key is a *whole* typed table (an ``[lr_scheduler]``, later an
  ``[optimizer]``): it replaces the base config's table, because another schedule has other
  keys;
- a table without ``name`` sets only the keys it gives (``lora = {rank = 8, alpha = 8}`` sets
  two keys of ``[lora]`` and keeps the rest);
- anything else sets one key.

TOML turns a bare dotted key (``train.learning_rate = 1e-3``) into nested tables, so both
spellings, quoted and bare, mean the same thing here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from typedtables import toml_value

Assignment = tuple[str, Any]
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def assignments(key: str, value: Any) -> list[Assignment]:
    """The single-key settings one override value makes (see the module docstring)."""
    if isinstance(value, Mapping) and "name" not in value:
        out: list[Assignment] = []
        for sub, item in value.items():
            out += assignments(f"{key}.{sub}" if key else sub, item)
        return out
    return [(key, value)]


def ordered(items: Sequence[Assignment]) -> list[Assignment]:
    """Whole tables first, then single keys, each group in the given order.

    So a sweep-wide ``"lr_scheduler.warmup_steps" = 2`` lands on every trial's own
    ``lr_scheduler`` table instead of being wiped out by it.
    """
    tables = [a for a in items if isinstance(a[1], Mapping)]
    return tables + [a for a in items if not isinstance(a[1], Mapping)]


def toml_text(value: Any) -> str:
    """A value as TOML text; tables become inline tables (``{name = "cosine"}``)."""
    if isinstance(value, Mapping):
        items = ", ".join(f"{_key(k)} = {toml_text(v)}" for k, v in value.items())
        return "{" + items + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_text(v) for v in value) + "]"
    return toml_value(value)


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else toml_value(key)


def set_flags(items: Sequence[Assignment]) -> list[str]:
    """``--set`` values (``table.key=value``) for settings, in order."""
    return [f"{key}={toml_text(value)}" for key, value in items]


def label(value: Any) -> str:
    """A short human label: ``cosine(warmup_steps=2)``, ``rank=8, alpha=8``, ``0.001``."""
    if isinstance(value, Mapping):
        rest = ", ".join(f"{k}={label(v)}" for k, v in value.items() if k != "name")
        if "name" in value:
            return f"{value['name']}({rest})" if rest else str(value["name"])
        return rest
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.6g}"  # a sampled 0.0006824078427098838 reads as 0.000682408
    return toml_text(value)


def key_label(key: str, value: Any) -> str:
    """How one varied key shows in a configuration's label: a named table by its label
    alone, any other key as ``last_part=value``."""
    if isinstance(value, Mapping) and "name" in value:
        return label(value)
    return f"{key.rpartition('.')[2]}={label(value)}"


def slug(text: str, limit: int = 48) -> str:
    """A folder-name-safe version of a label."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return cleaned[:limit].rstrip("-.") or "trial"
