"""Typed, documented, frozen config tables read from TOML: the one mechanism behind every table
of the run config, every LR schedule and every optimizer.

It depends on nothing of the trainer, so ``schedulers/`` (and anyone's loop using it) can use
it without ``trainer/``.
"""

from typedtables.fields import (
    check_value,
    doc,
    field_problems,
    field_types,
    increasing_from_one,
    toml_value,
    type_name,
)
from typedtables.tables import (
    ConfigError,
    build_or_raise,
    build_table,
    class_summary,
    closest,
    describe_choice,
    describe_table,
    unknown_key_hint,
)

__all__ = [
    "ConfigError",
    "build_or_raise",
    "build_table",
    "check_value",
    "class_summary",
    "closest",
    "describe_choice",
    "describe_table",
    "doc",
    "field_problems",
    "field_types",
    "increasing_from_one",
    "toml_value",
    "type_name",
    "unknown_key_hint",
]
