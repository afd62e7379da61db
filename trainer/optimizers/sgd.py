"""``sgd``: torch's SGD, with optional (Nesterov) momentum."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainer.optimizers import kernels
from trainer.optimizers.base import OptimizerSpec
from trainer.optimizers.registry import register
from typedtables import doc

if TYPE_CHECKING:
    import torch


@register("sgd")
@dataclass(frozen=True)
class SGD(OptimizerSpec):
    """Stochastic gradient descent with optional momentum (torch.optim.SGD).

    b = momentum * b + (1 - dampening) * (g + weight_decay * p);  p -= lr * b
    """

    weight_decay: float = doc("L2 penalty added to the UNet adapters' gradients", 0.0)
    momentum: float = doc("Momentum factor; 0 is plain SGD", 0.0)
    dampening: float = doc("Dampening of the momentum", 0.0)
    nesterov: bool = doc("Nesterov momentum (needs momentum > 0 and dampening = 0)", False)
    impl: kernels.Impl = doc(kernels.IMPL_DOC, "auto")

    def range_problems(self, where: str) -> list[str]:
        p = super().range_problems(where)
        if self.momentum < 0:
            p.append(f"{where}.momentum: {self.momentum} must be >= 0")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            p.append(
                f"{where}.nesterov: Nesterov momentum needs {where}.momentum > 0 and "
                f"{where}.dampening = 0"
            )
        return p

    def create(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        import torch

        return kernels.build(
            torch.optim.SGD,
            self.impl,
            groups,
            lr=groups[0]["lr"],
            momentum=self.momentum,
            dampening=self.dampening,
            nesterov=self.nesterov,
        )

    def device_problems(self, device: torch.device, where: str = "optimizer") -> list[str]:
        import torch

        return kernels.device_problems(torch.optim.SGD, self.impl, device, where)
