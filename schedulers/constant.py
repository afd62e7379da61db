"""``constant``: the base LR for every update, after an optional warmup.

Formula (``t`` counts updates after warmup)::

    lr(t) = base_lr
"""

from __future__ import annotations

from dataclasses import dataclass

from schedulers.base import Schedule
from schedulers.registry import register


@register("constant")
@dataclass(frozen=True)
class Constant(Schedule):
    """The base LR at every update (after the warmup, if any).

    lr = base_lr
    """

    def after_warmup(self, t: int, n: int, base_lr: float) -> float:
        return base_lr
