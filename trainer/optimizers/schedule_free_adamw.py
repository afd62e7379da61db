"""``schedule_free_adamw``: AdamW without an LR schedule (schedulefree).

Schedule-Free AdamW (Defazio et al., 2024) trains at the point ``y``, an interpolation between
an averaged iterate ``x`` and the base sequence ``z``; the weights to evaluate and keep are
``x``. So:

- it needs a constant LR (warmup allowed): its averaging plays the part of the decay, and a
  decaying schedule on top decays twice (sd-scripts PR #1600);
- it is put in eval mode (parameters = ``x``) for validation, sampling and every save, and
  back in train mode after (OneTrainer PR #779); see ``trainer/optimizers/modes.py``.

Its own ``warmup_steps`` is not offered: the warmup is ``lr_scheduler.warmup_steps``, which
the loop applies to the LR the optimizer reads, so ``lr-plot`` shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainer.optimizers.base import OptimizerSpec, beta_problems
from trainer.optimizers.registry import register
from typedtables import doc

if TYPE_CHECKING:
    import torch


@register("schedule_free_adamw")
@dataclass(frozen=True)
class ScheduleFreeAdamW(OptimizerSpec):
    """Schedule-Free AdamW (schedulefree.AdamWScheduleFree); a constant LR, warmup allowed.

    y = (1 - beta1) z + beta1 x;  z -= lr g(y);  x = running average of z weighted by lr^power
    """

    package = "schedulefree"
    extra = "schedulefree"
    schedule_free = True

    weight_decay: float = doc("Weight decay of the UNet adapters (applied at y)", 0.0)
    beta1: float = doc("Interpolation between the average x and z (the momentum), in (0, 1)", 0.9)
    beta2: float = doc("Decay rate of the squared gradient's running mean", 0.999)
    eps: float = doc("Added to the denominator for numerical stability", 1e-8)
    r: float = doc("Polynomial weighting of the average by update count: (k+1)^r", 0.0)
    weight_lr_power: float = doc("The average weights each update by lr^weight_lr_power", 2.0)

    def range_problems(self, where: str) -> list[str]:
        p = super().range_problems(where) + beta_problems(self, where, ("beta1", "beta2"))
        if self.beta1 == 0:
            p.append(f"{where}.beta1: must be > 0 (eval mode divides by it)")
        if self.r < 0 or self.weight_lr_power < 0:
            p.append(f"{where}.r / {where}.weight_lr_power: must be >= 0")
        return p

    def create(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        from schedulefree import AdamWScheduleFree

        optimizer = AdamWScheduleFree(
            groups,
            lr=groups[0]["lr"],
            betas=(self.beta1, self.beta2),
            eps=self.eps,
            warmup_steps=0,
            r=self.r,
            weight_lr_power=self.weight_lr_power,
        )
        optimizer.train()  # it starts in eval mode and refuses to step there
        return optimizer
