"""``came``: confidence-guided, memory-efficient Adafactor (came-pytorch).

CAME (Luo et al., 2023) keeps Adafactor's factored second moment and scales the update by a
factored estimate of its instability, for Adam-like quality at Adafactor's memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainer.optimizers.base import OptimizerSpec, beta_problems
from trainer.optimizers.registry import register
from typedtables import doc

if TYPE_CHECKING:
    import torch


@register("came")
@dataclass(frozen=True)
class CAME(OptimizerSpec):
    """Confidence-guided Adaptive Memory Efficient optimizer (came_pytorch.CAME).

    u = clip(g / sqrt(v));  m = beta1 m + (1 - beta1) u;  p -= lr * m / sqrt(instability)
    """

    package = "came_pytorch"
    extra = "came"

    beta1: float = doc("Decay rate of the update's running mean", 0.9)
    beta2: float = doc("Decay rate of the squared gradient's factored statistics", 0.999)
    beta3: float = doc("Decay rate of the instability's factored statistics", 0.9999)
    eps1: float = doc("Regularizer added to the squared gradient", 1e-30)
    eps2: float = doc("Regularizer added to the instability", 1e-16)
    clip_threshold: float = doc("Clip the update's RMS to this", 1.0)

    def range_problems(self, where: str) -> list[str]:
        p = super().range_problems(where)
        p += beta_problems(self, where, ("beta1", "beta2", "beta3"))
        if self.eps1 <= 0 or self.eps2 <= 0 or self.clip_threshold <= 0:
            p.append(f"{where}.eps1 / {where}.eps2 / {where}.clip_threshold: must be > 0")
        return p

    def create(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        from came_pytorch import CAME as CAMEOpt

        return CAMEOpt(
            groups,
            lr=groups[0]["lr"],
            eps=(self.eps1, self.eps2),
            clip_threshold=self.clip_threshold,
            betas=(self.beta1, self.beta2, self.beta3),
        )
