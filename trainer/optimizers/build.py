"""Build the run's optimizer: one param group per trained model, and what the loop logs.

Param groups, in order: the UNet's LoRA parameters, then the text encoder's (when trained).
Each has its own base LR (``train.learning_rate``, ``train.text_encoder_lr``) and weight decay
(``optimizer.weight_decay``, ``optimizer.text_encoder_weight_decay``); the LR schedule scales
every group's LR by the same factor before each update.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from trainer.optimizers.base import OptimizerSpec
from trainer.optimizers.modes import unwrap
from typedtables import ConfigError

# The step size each optimizer's last step took, per param group, for optimizers that report
# one (see OptimizerSpec.effective_lrs); filled by a step pre-hook, read once per update.
_effective: weakref.WeakKeyDictionary[torch.optim.Optimizer, list[float] | None] = (
    weakref.WeakKeyDictionary()
)


def create(
    spec: OptimizerSpec, models: Sequence[torch.nn.Module], base_lrs: Sequence[float]
) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters of ``models``, one param group each.

    Args:
        spec: The ``[optimizer]`` table.
        models: The trained models: the UNet, then the text encoder(s).
        base_lrs: One base LR per model, in the same order.
    """
    decays = spec.weight_decays(len(models))
    groups = [
        {
            "params": [p for p in model.parameters() if p.requires_grad],
            "lr": lr,
            "weight_decay": decay,
        }
        for model, lr, decay in zip(models, base_lrs, decays, strict=True)
    ]
    optimizer = spec.create(groups)
    if type(spec).effective_lrs is not OptimizerSpec.effective_lrs:

        def record(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            _effective[opt] = spec.effective_lrs(opt)

        # Before the step, so it sees the step size the step is about to use.
        optimizer.register_step_pre_hook(record)
    return optimizer


def step_metrics(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"effective_lr": [one per param group]}`` for the step just taken, when the optimizer
    reports a step size of its own (Prodigy's ``d · lr``); else ``{}``.

    Read once per update: a step skipped by the fp16 GradScaler leaves nothing to report.
    """
    lrs = _effective.pop(unwrap(optimizer), None)
    return {} if lrs is None else {"effective_lr": lrs}


def check_device(spec: OptimizerSpec, device: torch.device, where: str = "optimizer") -> None:
    """Raise ConfigError when the optimizer cannot run on ``device`` (before models load)."""
    problems = spec.device_problems(device, where)
    if problems:
        raise ConfigError(problems, "the optimizer")
