"""``exponential_ramp``: the LR rises geometrically to the base LR, the LR range test's curve.

Of the ``n`` updates after warmup, update ``t`` (0-based, ``0 <= t <= n - 1``) gets::

    lr = base_lr * start_factor ** (1 - t / (n - 1))

so the first update applies ``start_factor * base_lr`` and the last applies ``base_lr``, and
each update's LR is the one before times ``start_factor ** (-1 / (n - 1))``: torch's
``ExponentialLR`` started at ``start_factor * base_lr`` with that ``gamma``. This is the ramp
of the LR range test (Smith, 2017, "Cyclical Learning Rates for Training Neural Networks") as
pytorch-lr-finder runs it, reaching the end LR at the last update; fastai's ``lr_find`` stops
one step short of it. ``sdlora lr-find`` trains on it with ``base_lr = --max`` and
``start_factor = --min / --max``; a curve that rises past the base LR has no floor, and from
``t = n`` on it holds at the base LR, as every schedule holds its end value.
"""

from __future__ import annotations

from dataclasses import dataclass

from schedulers.base import Schedule
from schedulers.registry import register
from typedtables import doc


@register("exponential_ramp")
@dataclass(frozen=True)
class ExponentialRamp(Schedule):
    """A geometric rise from start_factor × the base LR to the base LR (the LR range test).

    lr = base_lr * start_factor ** (1 - t / (n - 1)),  t = 0 .. n - 1
    """

    start_factor: float = doc(
        "LR factor of the first update, in (0, 1]; the last update gets the base LR", 1e-4
    )

    def after_warmup(self, t: int, n: int, base_lr: float) -> float:
        if n <= 1:
            return base_lr
        p = min(t, n - 1) / (n - 1)
        return base_lr * self.start_factor ** (1.0 - p)

    def range_problems(self, where: str) -> list[str]:
        p = super().range_problems(where)
        if not 0 < self.start_factor <= 1:
            p.append(f"{where}.start_factor: {self.start_factor} must be in (0, 1]")
        return p
