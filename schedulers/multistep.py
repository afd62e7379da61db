"""``multistep``: multiply the LR by ``gamma`` at each milestone (PyTorch's ``MultiStepLR``).

Formula (``t`` updates after warmup; ``k(t)`` = milestones ``<= t``)::

    d(t) = gamma ** k(t)
    lr   = base_lr * d + floor * (1 - d)

With no warmup or floor this is ``torch.optim.lr_scheduler.MultiStepLR(milestones, gamma)``.
Milestones count updates after warmup, like every count a schedule takes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from schedulers.base import DecaySchedule
from schedulers.registry import register
from typedtables import doc, increasing_from_one


@register("multistep")
@dataclass(frozen=True)
class MultiStep(DecaySchedule):
    """Drop the LR by a factor gamma at each milestone update.

    d = gamma ** (number of milestones <= t);  lr = base_lr * d + floor * (1 - d)
    """

    milestones: tuple[int, ...] = doc(
        "Updates after warmup at which the LR drops, increasing, e.g. [600, 900] (required)", ()
    )
    gamma: float = doc("Factor applied at each milestone, in (0, 1]", 0.1)

    def decay(self, t: int, n: int) -> float:
        return self.gamma ** bisect.bisect_right(self.milestones, t)

    def range_problems(self, where: str) -> list[str]:
        p = super().range_problems(where)
        m = self.milestones
        if not m:
            p.append(f"{where}.milestones: required, e.g. [600, 900]")
        elif not increasing_from_one(m):
            p.append(f"{where}.milestones: {list(m)} must be >= 1 and strictly increasing")
        if not 0 < self.gamma <= 1:
            p.append(f"{where}.gamma: {self.gamma} must be in (0, 1]")
        return p
