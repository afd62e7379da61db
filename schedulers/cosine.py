"""``cosine``: half a cosine wave from the base LR down to the floor.

Formula (``t`` updates after warmup, out of ``n``)::

    d(t) = (1 + cos(pi * t / n)) / 2
    lr   = base_lr * d + floor * (1 - d)

transformers' ``get_cosine_schedule_with_warmup`` (floor 0) and
``get_cosine_with_min_lr_schedule_with_warmup`` (``min_lr_ratio`` = ``min_lr_rate``), and
``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=n, eta_min=min_lr)`` without warmup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from schedulers.base import DecaySchedule
from schedulers.registry import register


@register("cosine")
@dataclass(frozen=True)
class Cosine(DecaySchedule):
    """Half-cosine decay from the base LR to the floor.

    d = (1 + cos(pi * t / n)) / 2;  lr = base_lr * d + floor * (1 - d)
    """

    def decay(self, t: int, n: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * (t / n)))
