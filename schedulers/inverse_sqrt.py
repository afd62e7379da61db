"""``inverse_sqrt``: decay with the inverse square root of time (transformers' schedule).

Formula (``t`` updates after warmup; ``tau`` = ``timescale``)::

    d(t) = 1 / sqrt((t + tau) / tau)
    lr   = base_lr * d + floor * (1 - d)

``timescale = 0`` uses the warmup length, or 10000 without warmup, as transformers'
``get_inverse_sqrt_schedule`` does; with no floor the two agree. It never reaches the floor:
``d`` halves every time ``t + tau`` quadruples.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from schedulers.base import DecaySchedule
from schedulers.registry import register
from typedtables import doc

DEFAULT_TIMESCALE = 10_000


@register("inverse_sqrt")
@dataclass(frozen=True)
class InverseSqrt(DecaySchedule):
    """Inverse-square-root decay from the base LR (towards the floor).

    d = 1 / sqrt((t + timescale) / timescale);  lr = base_lr * d + floor * (1 - d)
    """

    timescale: int = doc(
        "Updates over which the LR falls to 1/sqrt(2) of the peak; 0 = the warmup length "
        "(10000 without warmup)",
        0,
    )

    def lr(self, step: int, total_steps: int, base_lr: float) -> float:
        if self.timescale:
            return super().lr(step, total_steps, base_lr)
        # The default timescale is the warmup length, which needs the run length to resolve.
        tau = self.warmup_updates(total_steps) or DEFAULT_TIMESCALE
        return dataclasses.replace(self, timescale=tau).lr(step, total_steps, base_lr)

    def decay(self, t: int, n: int) -> float:
        tau = self.timescale or DEFAULT_TIMESCALE
        return 1.0 / math.sqrt((t + tau) / tau)

    def range_problems(self, where: str) -> list[str]:
        p = super().range_problems(where)
        if self.timescale < 0:
            p.append(f"{where}.timescale: {self.timescale} must be >= 0 (0 = the warmup length)")
        return p
