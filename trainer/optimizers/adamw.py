"""``adamw``: torch's AdamW, the default optimizer.

Decoupled weight decay (Loshchilov & Hutter), on the fused or foreach kernel where the device
offers it (``impl``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainer.optimizers import kernels
from trainer.optimizers.base import OptimizerSpec, beta_problems
from trainer.optimizers.registry import register
from typedtables import doc

if TYPE_CHECKING:
    import torch


@register("adamw")
@dataclass(frozen=True)
class AdamW(OptimizerSpec):
    """Adam with decoupled weight decay (torch.optim.AdamW); the default.

    p -= lr * (m̂ / (sqrt(v̂) + eps) + weight_decay * p)
    """

    weight_decay: float = doc("Decoupled weight decay of the UNet adapters", 1e-2)
    beta1: float = doc("Decay rate of the gradient's running mean", 0.9)
    beta2: float = doc("Decay rate of the squared gradient's running mean", 0.999)
    eps: float = doc("Added to the denominator for numerical stability", 1e-8)
    amsgrad: bool = doc("Use the running maximum of the second moment (AMSGrad)", False)
    impl: kernels.Impl = doc(kernels.IMPL_DOC, "auto")

    def range_problems(self, where: str) -> list[str]:
        return super().range_problems(where) + beta_problems(self, where, ("beta1", "beta2"))

    def create(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        import torch

        return kernels.build(
            torch.optim.AdamW,
            self.impl,
            groups,
            betas=(self.beta1, self.beta2),
            eps=self.eps,
            amsgrad=self.amsgrad,
        )

    def device_problems(self, device: torch.device, where: str = "optimizer") -> list[str]:
        import torch

        return kernels.device_problems(torch.optim.AdamW, self.impl, device, where)
