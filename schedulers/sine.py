"""``sine``: an LR that oscillates between the base LR and the floor, ``period`` updates a wave.

Formula (``t`` updates after warmup; ``P = period``, or the ``n`` post-warmup updates if 0)::

    d(t) = (1 + cos(2 * pi * t / P)) / 2
    lr   = base_lr * d + floor * (1 - d)

It is a sinusoid shifted to start at its peak, where warmup leaves off: base LR at ``t = 0``,
the floor at ``t = P/2``, the base LR again at ``t = P``. Compared with SimpleTuner's ``sine``
(which this replaces): one full wave takes exactly ``period`` updates, not twice that; the
floor is ``lr_end`` (or ``min_lr`` / ``min_lr_ratio``; SimpleTuner ignored ``lr_end`` and
bottomed out at half the base LR); and being a pure function of the update index it cannot
drift on resume or under gradient accumulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from schedulers.base import EndLRSchedule
from schedulers.registry import register
from typedtables import doc


@register("sine")
@dataclass(frozen=True)
class Sine(EndLRSchedule):
    """A wave between the base LR and the floor, starting at the peak.

    d = (1 + cos(2 * pi * t / period)) / 2;  lr = base_lr * d + floor * (1 - d)
    """

    period: int = doc(
        "Updates in one full wave (peak → floor → peak); 0 makes it the whole post-warmup run", 0
    )

    def decay(self, t: int, n: int) -> float:
        period = self.period or n
        return 0.5 * (1.0 + math.cos(2.0 * math.pi * (t / period)))

    def range_problems(self, where: str) -> list[str]:
        p = super().range_problems(where)
        if self.period < 0 or self.period == 1:
            p.append(
                f"{where}.period: {self.period} must be 0 (the whole run) or >= 2 "
                "(a 1-update wave never leaves the peak)"
            )
        return p
