"""``step``: multiply the LR by ``gamma`` every ``step_size`` updates (PyTorch's ``StepLR``).

Formula (``t`` updates after warmup)::

    d(t) = gamma ** (t // step_size)
    lr   = base_lr * d + floor * (1 - d)

With no warmup or floor this is ``torch.optim.lr_scheduler.StepLR(step_size, gamma)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from schedulers.base import DecaySchedule
from schedulers.registry import register
from typedtables import doc


@register("step")
@dataclass(frozen=True)
class Step(DecaySchedule):
    """Drop the LR by a factor gamma every step_size updates.

    d = gamma ** (t // step_size);  lr = base_lr * d + floor * (1 - d)
    """

    step_size: int = doc("Updates between two drops (required, >= 1)", 0)
    gamma: float = doc("Factor applied at each drop, in (0, 1]", 0.1)

    def decay(self, t: int, n: int) -> float:
        return self.gamma ** (t // self.step_size)

    def range_problems(self, where: str) -> list[str]:
        p = super().range_problems(where)
        if self.step_size < 1:
            p.append(f"{where}.step_size: {self.step_size} must be >= 1 (required)")
        if not 0 < self.gamma <= 1:
            p.append(f"{where}.gamma: {self.gamma} must be in (0, 1]")
        return p
