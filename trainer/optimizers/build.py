"""Build the run's optimizer from named param groups, and what the loop logs.

The run's groups (``trainer/config/lr_groups.py``): the UNet's LoRA parameters, then the text
encoders' (when trained), each split by block LR multiplier and LoRA+. Each has its own base LR
and the weight decay of its model (``optimizer.weight_decay``,
``optimizer.text_encoder_weight_decay``); the LR schedule scales every group's LR by the same
factor before each update. ``create`` builds one group per model, for loops of other kinds.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ParamGroup:
    """One param group to build: its name (kept in the group, ``group["name"]``), tensors,
    base LR, and which trained model it belongs to (0 = the UNet, then the text encoders),
    which picks its weight decay."""

    name: str
    params: list[torch.nn.Parameter]
    lr: float
    model: int = 0


def create(
    spec: OptimizerSpec, models: Sequence[torch.nn.Module], base_lrs: Sequence[float]
) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters of ``models``, one param group each.

    Args:
        spec: The ``[optimizer]`` table.
        models: The trained models: the UNet, then the text encoder(s).
        base_lrs: One base LR per model, in the same order.
    """
    groups = [
        ParamGroup(f"group{i}", [p for p in model.parameters() if p.requires_grad], lr, i)
        for i, (model, lr) in enumerate(zip(models, base_lrs, strict=True))
    ]
    return create_groups(spec, groups)


def create_groups(spec: OptimizerSpec, groups: Sequence[ParamGroup]) -> torch.optim.Optimizer:
    """The optimizer over ``groups``, in order (the LR schedule scales each group's LR).

    A group may hold no tensor (a block multiplier no adapted module has): torch's
    optimizers step over it as over any other.
    """
    decays = spec.weight_decays(max((g.model for g in groups), default=0) + 1)
    torch_groups = [
        {"params": g.params, "lr": g.lr, "weight_decay": decays[g.model], "name": g.name}
        for g in groups
    ]
    optimizer = spec.create(torch_groups)
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
