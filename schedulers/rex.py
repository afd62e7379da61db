"""``rex``: the REX profile, "Reflected EXponential" decay (Chen, Wolfe & Kyrillidis, 2022).

From "REX: Revisiting Budgeted Training with an Improved Schedule", MLSys 2022
(arXiv:2107.04197). With ``z = t / n``::

    d(z) = (1 - z) / (1/2 + (1 - beta * z) / 2)
    lr   = base_lr * d + floor * (1 - d)

``beta = 1`` is the paper's formula, ``(1 - z) / (1 - z/2)``: it stays high longer than linear
and drops steeply at the end. The authors' reference code uses 0.9; ``beta = 0`` is linear.
"""

from __future__ import annotations

from dataclasses import dataclass

from schedulers.base import DecaySchedule
from schedulers.registry import register
from typedtables import doc


@register("rex")
@dataclass(frozen=True)
class Rex(DecaySchedule):
    """REX decay from the base LR to the floor (arXiv:2107.04197).

    z = t / n;  d = (1 - z) / (1/2 + (1 - beta * z) / 2);  lr = base_lr * d + floor * (1 - d)
    """

    beta: float = doc(
        "Shape in [0, 1]: 1 is the paper's REX curve, 0.9 the authors' code, 0 is linear", 1.0
    )

    def decay(self, t: int, n: int) -> float:
        z = t / n
        return (1.0 - z) / (0.5 + 0.5 * (1.0 - self.beta * z))

    def range_problems(self, where: str) -> list[str]:
        p = super().range_problems(where)
        if not 0 <= self.beta <= 1:
            p.append(f"{where}.beta: {self.beta} must be in [0, 1]")
        return p
