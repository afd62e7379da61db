"""Build an optimizer from its ``[optimizer]`` TOML table, and describe an optimizer's keys.

The table is ``{"name": ..., <that optimizer's fields>}``, resolved through the registry and
built by the one table mechanism, ``typedtables.build_table``: every key is checked against
the optimizer's dataclass and **all** problems are reported at once, each naming its TOML path
and suggesting the closest valid key. Nothing is silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainer.optimizers import registry
from trainer.optimizers.base import OptimizerSpec
from typedtables import build_or_raise, describe_choice

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
    return build_or_raise(build, table, where, SOURCE)


def build(table: Any, where: str, problems: list[str]) -> OptimizerSpec:
    """Like :func:`from_table`, appending problems to ``problems`` instead of raising (for a
    caller that reports a whole config at once). Returns ``adamw`` when the name is bad."""
    return registry.REGISTRY.build(
        table,
        where,
        problems,
        noun="optimizer",
        default=DEFAULT,
        fallback=DEFAULT,
        hints=ELSEWHERE,
        peer_names=PEER_NAMES,
    )


def describe(name: str) -> str:
    """Help text for one optimizer: its description, then every key.

    Args:
        name: An optimizer name or ``"package.module:Class"`` path.

    Returns:
        Multi-line text: ``name``, the class docstring, then one line per key with its type,
        TOML default and doc.
    """
    cls = registry.get(name)
    needs = [f"needs: pip install 'sdlora[{cls.extra or cls.package}]'"] if cls.package else []
    return describe_choice(cls, "optimizer", needs)
