"""``linear``: a straight line from the base LR to the floor.

Formula (``t`` updates after warmup, out of ``n``; ``d`` mixes base LR and floor)::

    d(t) = (n - t) / n
    lr   = base_lr * d + floor * (1 - d)

With no floor this is transformers' ``get_linear_schedule_with_warmup``.
"""

from __future__ import annotations

from dataclasses import dataclass

from schedulers.base import DecaySchedule
from schedulers.registry import register


@register("linear")
@dataclass(frozen=True)
class Linear(DecaySchedule):
    """Linear decay from the base LR to the floor, reached one update after the run.

    d = (n - t) / n;  lr = base_lr * d + floor * (1 - d)
    """

    def decay(self, t: int, n: int) -> float:
        return (n - t) / n
