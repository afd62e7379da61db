"""Config keys that moved, read for one more release, each with one warning per load.

:func:`upgrade` is the one path: ``config.load.build`` runs it on the raw TOML data once, so
a key is warned about once per load, however often a table is rebuilt afterwards.

- The optimizer keys of ``[train]``: until the ``[optimizer]`` table existed, ``[train]`` held
  ``optimizer``, ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``, ``weight_decay`` and
  ``optimizer_impl``. A config that still uses them trains exactly as it did: they are moved
  into an ``[optimizer]`` table, with the old ``[train]`` defaults for the ones it leaves out,
  and one warning shows the table to write instead. Giving old keys together with an
  ``[optimizer]`` table is an error, since it is not clear which should win.
- ``lora.save_dtype``: now ``output.save_dtype``. It stays a ``[lora]`` field for this release
  (``trainer.lora.outputs.save_dtype`` lets it win when set); here it is only warned about.

Remove this module (and its call sites) in the release after next.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from typedtables import closest, field_types, toml_value, unknown_key_hint

# Old [train] key → new [optimizer] key.
MOVED = {
    "optimizer": "name",
    "adam_beta1": "beta1",
    "adam_beta2": "beta2",
    "adam_epsilon": "eps",
    "weight_decay": "weight_decay",
    "optimizer_impl": "impl",
}
# The old defaults that differ from the new ones: an old config keeps its exact numerics.
OLD_DEFAULTS = {"weight_decay": 1e-2, "impl": "default"}
ADAMW_ONLY = ("adam_beta1", "adam_beta2", "adam_epsilon")


def upgrade(data: Mapping[str, Any], problems: list[str], warnings: list[str]) -> Mapping[str, Any]:
    """Raw config data in today's shape, and one warning for each deprecated key it uses.

    Args:
        data: The raw TOML data (not modified).
        problems: Receives the errors (old keys that conflict with their new place).
        warnings: Receives the deprecation warnings.
    """
    data = move_optimizer_keys(data, problems, warnings)
    lora = data.get("lora")
    if isinstance(lora, Mapping) and lora.get("save_dtype"):
        warnings.append(
            "lora.save_dtype is deprecated; set output.save_dtype = "
            f"{toml_value(lora['save_dtype'])} instead (lora.save_dtype is still read for "
            "this release)"
        )
    return data


def move_optimizer_keys(
    data: Mapping[str, Any], problems: list[str], warnings: list[str]
) -> Mapping[str, Any]:
    """Raw config data with ``[train]``'s old optimizer keys moved into ``[optimizer]``.

    Args:
        data: The raw TOML data (not modified).
        problems: Receives the errors (old keys beside an ``[optimizer]`` table).
        warnings: Receives the one deprecation warning.
    """
    train = data.get("train")
    if not isinstance(train, Mapping):
        return data
    old = {key: train[key] for key in MOVED if key in train}
    if not old:
        return data
    out = {**data, "train": {k: v for k, v in train.items() if k not in MOVED}}
    if "optimizer" in data:
        problems += [
            f"train.{key}: the old place of optimizer.{MOVED[key]}, given together with an "
            f"[optimizer] table; move it into [optimizer] as {MOVED[key]} (or drop it)"
            for key in old
        ]
        return out
    table, ignored = _table(old)
    out["optimizer"] = table
    moved = ", ".join(f"train.{k} → optimizer.{MOVED[k]}" for k in old if k not in ignored)
    lines = [f"{k} = {toml_value(v)}" for k, v in table.items()]
    message = (
        f"[train] optimizer keys are deprecated and will stop working in a later release "
        f"({moved}); write instead:\n[optimizer]\n" + "\n".join(lines)
    )
    if ignored:
        message += (
            f"\n({', '.join('train.' + k for k in ignored)}: AdamW settings, ignored by 'sgd' as "
            "they always were; remove them)"
        )
    warnings.append(message)
    return out


def _table(old: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    name = old.get("optimizer", "adamw")
    table: dict[str, Any] = {"name": name}
    ignored = []
    for key, value in old.items():
        if key == "optimizer":
            continue
        if name == "sgd" and key in ADAMW_ONLY:
            ignored.append(key)
            continue
        table[MOVED[key]] = value
    if name in ("adamw", "sgd"):  # the only two the old keys could name
        for key, default in OLD_DEFAULTS.items():
            table.setdefault(key, default)
    return table, ignored


def upgrade_saved(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """A saved config (a checkpoint's or a manifest's) in today's shape, to compare with the
    current one: old ``[train]`` keys moved, and the ``[optimizer]`` table completed with its
    defaults, as a resolved config written today would hold it."""
    data = move_optimizer_keys(data, [], [])
    table = data.get("optimizer")
    if not isinstance(table, Mapping):
        return data
    from trainer.optimizers.config import build

    spec = build(table, "optimizer", [])
    return {**data, "optimizer": {"name": spec.name, **spec.params(), **table}}


def unknown_train_key(cls: type, key: str, where: str) -> str:
    """The message for an unknown ``[train]`` key; a near miss of a moved key says where the
    optimizer settings are now."""
    keys = list(field_types(cls))
    near = closest(key, [*keys, *MOVED])
    if near in MOVED:
        return (
            f"{where}.{key}: unknown key; the optimizer settings are the [optimizer] table "
            f"now: did you mean optimizer.{MOVED[near]}?"
        )
    return f"{where}.{key}: unknown key{unknown_key_hint(key, keys)}"
