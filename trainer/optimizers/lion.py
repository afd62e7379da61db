"""``lion``: the sign-of-momentum optimizer (lion-pytorch).

Lion (Chen et al., 2023) steps by the sign of an interpolated momentum, so every coordinate
moves by exactly ``lr``: its LR is usually 3-10× smaller than AdamW's, and its weight decay
3-10× larger, for the same ``lr · weight_decay``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainer.optimizers.base import OptimizerSpec, beta_problems
from trainer.optimizers.registry import register
from typedtables import doc

if TYPE_CHECKING:
    import torch


@register("lion")
@dataclass(frozen=True)
class Lion(OptimizerSpec):
    """EvoLved Sign Momentum (lion_pytorch.Lion); use a 3-10× smaller LR than AdamW.

    p -= lr * (sign(beta1 m + (1 - beta1) g) + weight_decay p);  m = beta2 m + (1 - beta2) g
    """

    package = "lion_pytorch"
    extra = "lion"

    beta1: float = doc("Interpolation of momentum and gradient inside the sign", 0.9)
    beta2: float = doc("Decay rate of the momentum", 0.99)

    def range_problems(self, where: str) -> list[str]:
        return super().range_problems(where) + beta_problems(self, where, ("beta1", "beta2"))

    def create(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        from lion_pytorch import Lion as LionOpt

        return LionOpt(groups, lr=groups[0]["lr"], betas=(self.beta1, self.beta2))
