"""``warmup_stable_decay`` (WSD): warmup, a long plateau at the base LR, then a short decay.

Of the ``n`` updates after warmup, the last ``D = round(decay_ratio * n)`` decay and the
``S = n - D`` before them hold the base LR. Formula (``t`` updates after warmup)::

    d(t) = 1                   for t < S
    p    = (t - S) / D         otherwise, and d(t) =
           1 - p                    decay_shape = "linear"
           (1 + cos(pi * p)) / 2    decay_shape = "cosine"
           1 - sqrt(p)              decay_shape = "1-sqrt"
    lr   = base_lr * d + floor * (1 - d)

This is transformers' ``get_wsd_schedule`` with ``num_decay_steps = D``,
``num_stable_steps = S``; transformers warms up from ``min_lr_ratio``, so set
``warmup_start_factor`` to the same value to reproduce it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from schedulers.base import DecaySchedule
from schedulers.registry import register
from typedtables import doc


@register("warmup_stable_decay")
@dataclass(frozen=True)
class WarmupStableDecay(DecaySchedule):
    """Warmup, a plateau at the base LR, then a decay over the last part of the run.

    D = round(decay_ratio * n), S = n - D;  d = 1 for t < S, else shape((t - S) / D)
    """

    decay_ratio: float = doc(
        "Fraction of the post-warmup updates spent decaying, at the end, in [0, 1]", 0.1
    )
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = doc(
        "Shape of the final decay: linear, cosine or 1-sqrt", "cosine"
    )

    def decay_updates(self, n: int) -> int:
        """Updates in the decay phase, out of ``n`` post-warmup updates (rounded half up)."""
        return math.floor(self.decay_ratio * n + 0.5)

    def decay(self, t: int, n: int) -> float:
        d = self.decay_updates(n)
        stable = n - d
        if t < stable:
            return 1.0
        p = (t - stable) / max(1, d)
        if self.decay_shape == "linear":
            return 1.0 - p
        if self.decay_shape == "1-sqrt":
            return 1.0 - math.sqrt(p)
        return 0.5 * (1.0 + math.cos(math.pi * p))

    def range_problems(self, where: str) -> list[str]:
        p = super().range_problems(where)
        if not 0 <= self.decay_ratio <= 1:
            p.append(f"{where}.decay_ratio: {self.decay_ratio} must be in [0, 1]")
        return p
