"""``polynomial``: ``(1 - t/n) ** power`` from the base LR to the floor.

Formula (``t`` updates after warmup, out of ``n``)::

    d(t) = (1 - t / n) ** power
    lr   = base_lr * d + floor * (1 - d)

With ``lr_end`` (or ``min_lr``, the same absolute floor) this is transformers'
``get_polynomial_decay_schedule_with_warmup(lr_end=lr_end, power=power)`` for a param group
whose base LR is the optimizer's default LR. (diffusers' ``get_scheduler`` fixes ``lr_end``
at 1e-7; here the floor is whatever you set, 0 by default.) Without warmup or floor it is
``torch.optim.lr_scheduler.PolynomialLR(total_iters=n, power=power)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from schedulers.base import EndLRSchedule
from schedulers.registry import register
from typedtables import doc


@register("polynomial")
@dataclass(frozen=True)
class Polynomial(EndLRSchedule):
    """Polynomial decay from the base LR to the floor (power 1 is linear).

    d = (1 - t / n) ** power;  lr = base_lr * d + floor * (1 - d)
    lr_end (or min_lr) is the absolute floor, as in transformers.
    """

    power: float = doc("Exponent of the decay; 1 is linear, 2 quadratic, 0.5 square root", 1.0)

    def decay(self, t: int, n: int) -> float:
        return (1.0 - t / n) ** self.power

    def range_problems(self, where: str) -> list[str]:
        p = super().range_problems(where)
        if self.power <= 0:
            p.append(f"{where}.power: {self.power} must be > 0")
        return p
