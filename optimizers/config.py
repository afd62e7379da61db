"""Build an optimizer from its ``[optimizer]`` TOML table, and describe an optimizer's keys.

The table is ``{"name": ..., <that optimizer's fields>}``, resolved through the registry and
built by the one table mechanism, ``typedtables.build_table``: every key is checked against
the optimizer's dataclass and **all** problems are reported at once, each naming its TOML path
and suggesting the closest valid key. Nothing is silently ignored.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

from optimizers import registry
from optimizers.base import OptimizerSpec
from typedtables import ConfigError, build_table, describe_table, field_types, toml_value
from typedtables.registry import RegistryError, UnknownNameError

SOURCE = "the optimizer"
DEFAULT = "adamw"

# Names other trainers (kohya's optimizer_args, transformers, torch) use for our keys.
PEER_NAMES = {
    "adam_beta1": "beta1",
    "adam_beta2": "beta2",
    "adam_epsilon": "eps",
    "epsilon": "eps",
    "weight_decay_text_encoder": "text_encoder_weight_decay",
    "optimizer_impl": "impl",
}
# Keys that are not the optimizer's, with where they live instead.
ELSEWHERE = {
    "lr": "the base LR is train.learning_rate (train.text_encoder_lr for the text encoder); "
    "the LR schedule scales it",
    "learning_rate": "the base LR is train.learning_rate; the LR schedule scales it",
    "betas": "write the betas as separate keys: beta1, beta2",
    "warmup_steps": "the warmup comes from lr_scheduler.warmup_steps",
    "relative_step": "sdlora always gives Adafactor the schedule's LR (relative_step = false)",
    "max_grad_norm": "gradient clipping is train.max_grad_norm",
    "optimizer_args": "write each argument as its own key of [optimizer]",
}


def from_table(table: Mapping[str, Any], where: str = "optimizer") -> OptimizerSpec:
    """Build and validate an optimizer from a TOML table.

    Args:
        table: ``{"name": "prodigy", "d_coef": 1.0, ...}``.
        where: The table's TOML path, used to name keys in messages.

    Raises:
        ConfigError: With every problem found, each naming ``<where>.<key>``.
    """
    problems: list[str] = []
    spec = build(table, where, problems)
    if problems:
        raise ConfigError(problems, SOURCE)
    return spec


def build(table: Any, where: str, problems: list[str]) -> OptimizerSpec:
    """Like :func:`from_table`, appending problems to ``problems`` instead of raising (for a
    caller that reports a whole config at once). Returns ``adamw`` when the name is bad."""
    fallback = registry.get(DEFAULT)()
    if not isinstance(table, Mapping):
        problems.append(f"[{where}]: expected a table, got {type(table).__name__}")
        return fallback
    name = table.get("name", DEFAULT)
    if not isinstance(name, str):
        problems.append(
            f"{where}.name: expected an optimizer name (str), got {type(name).__name__} {name!r}"
        )
        return fallback
    try:
        cls = registry.get(name)
    except (UnknownNameError, RegistryError) as err:
        # Without the class there is no schema to check the other keys against.
        problems.append(f"{where}.name: {err}")
        return fallback
    return build_table(cls, table, where, problems, unknown=unknown_key, skip=("name",))


def unknown_key(cls: type[OptimizerSpec], key: str, where: str) -> str:
    """The message for a key ``cls`` does not have, with the most useful hint found."""
    keys = list(field_types(cls))
    message = f"{where}.{key}: unknown key for the {cls.name!r} optimizer"
    peer = PEER_NAMES.get(key)
    if peer in keys:
        return f"{message}; sdlora calls it {where}.{peer}"
    if key in ELSEWHERE:
        return f"{message}; {ELSEWHERE[key]}"
    close = difflib.get_close_matches(key, keys, n=1)
    if close:
        return f"{message}; did you mean {where}.{close[0]}?"
    owners = [n for n, c in sorted(registry.REGISTRY.loaded().items()) if key in field_types(c)]
    if owners:
        # Typically `--set optimizer.name=...` over a table written for another optimizer.
        return (
            f"{message}; it is a key of: {', '.join(owners)}. To switch optimizers, replace "
            f"the whole table, e.g. --set '{where}={{name = \"{cls.name}\"}}'"
        )
    return f"{message}; its keys are: name, {', '.join(keys)}"


def describe(name: str) -> str:
    """Help text for one optimizer: its description, then every key.

    Args:
        name: An optimizer name or ``"package.module:Class"`` path.

    Returns:
        Multi-line text: ``name``, the class docstring, then one line per key with its type,
        TOML default and doc.
    """
    cls = registry.get(name)
    lines = [f"{cls.name}", ""]
    text = inspect.getdoc(cls) or ""
    lines += [f"  {line}".rstrip() for line in text.splitlines()]
    if cls.package:
        lines += ["", f"  needs: pip install 'sdlora[{cls.extra or cls.package}]'"]
    lines += ["", f"  keys of [optimizer] with name = {toml_value(cls.name)}:"]
    lines.append(describe_table(cls, "", indent="    "))
    return "\n".join(lines)
