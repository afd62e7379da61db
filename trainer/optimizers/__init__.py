"""Optimizers: typed ``[optimizer]`` tables, a registry, and what training needs from them.

An optimizer is a frozen dataclass whose fields are its hyperparameters (the keys of the
``[optimizer]`` table); ``create(groups)`` builds the torch optimizer. Look one up with
:func:`get`, build one from a TOML table with :func:`from_table`, and at training time use
:func:`create` (param groups per model), :func:`eval_mode` (schedule-free eval weights) and
:func:`checkpoint_state` / :func:`load_checkpoint_state` (exact resume). See
docs/optimizers.md. Importing this package does not import torch; the training helpers do,
on first use.
"""

from trainer.optimizers import (  # noqa: F401  (imported so every built-in registers itself)
    adafactor,
    adamw,
    adamw8bit,
    came,
    lion,
    prodigy,
    schedule_free_adamw,
    sgd,
)
from trainer.optimizers.base import BaseLR, Findings, OptimizerSpec, is_constant
from trainer.optimizers.config import describe, from_table
from trainer.optimizers.registry import (
    ENTRY_POINT_GROUP,
    OptimizerRegistryError,
    UnknownOptimizerError,
    available,
    get,
    register,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "BaseLR",
    "Findings",
    "OptimizerRegistryError",
    "OptimizerSpec",
    "ParamGroup",
    "UnknownOptimizerError",
    "available",
    "check_device",
    "checkpoint_state",
    "create",
    "create_groups",
    "describe",
    "eval_mode",
    "from_table",
    "get",
    "is_constant",
    "is_schedule_free",
    "load_checkpoint_state",
    "register",
    "step_metrics",
    "to_eval",
]

# The training helpers import torch: loaded on first use, so config loading stays light.
_LAZY = {
    "create": "trainer.optimizers.build",
    "create_groups": "trainer.optimizers.build",
    "ParamGroup": "trainer.optimizers.build",
    "check_device": "trainer.optimizers.build",
    "step_metrics": "trainer.optimizers.build",
    "eval_mode": "trainer.optimizers.modes",
    "to_eval": "trainer.optimizers.modes",
    "is_schedule_free": "trainer.optimizers.modes",
    "checkpoint_state": "trainer.optimizers.modes",
    "load_checkpoint_state": "trainer.optimizers.modes",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'optimizers' has no attribute {name!r}")
