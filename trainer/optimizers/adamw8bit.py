"""``adamw8bit``: AdamW with its moments stored in 8 bits (bitsandbytes).

About a quarter of AdamW's optimizer memory for large tensors. Whether it runs depends on the
device and the bitsandbytes build, so it is tried on the training device (one tiny update)
before any model is loaded, and refused there with bitsandbytes' own reason if it fails.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainer.optimizers.base import OptimizerSpec, beta_problems
from trainer.optimizers.registry import register
from typedtables import doc

if TYPE_CHECKING:
    import torch


@register("adamw8bit")
@dataclass(frozen=True)
class AdamW8bit(OptimizerSpec):
    """AdamW with 8-bit block-wise quantized moments (bitsandbytes.optim.AdamW8bit).

    The update is AdamW's; m and v are stored in 8 bits per 256-value block.
    """

    package = "bitsandbytes"
    extra = "adamw8bit"

    weight_decay: float = doc("Decoupled weight decay of the UNet adapters", 1e-2)
    beta1: float = doc("Decay rate of the gradient's running mean", 0.9)
    beta2: float = doc("Decay rate of the squared gradient's running mean", 0.999)
    eps: float = doc("Added to the denominator for numerical stability", 1e-8)
    min_8bit_size: int = doc(
        "Tensors with fewer elements keep 32-bit state (bitsandbytes' default; a rank-16 "
        "LoRA matrix of an SD-1.5 attention layer has 5,120 to 20,480)",
        4096,
    )

    def range_problems(self, where: str) -> list[str]:
        p = super().range_problems(where) + beta_problems(self, where, ("beta1", "beta2"))
        if self.min_8bit_size < 0:
            p.append(f"{where}.min_8bit_size: {self.min_8bit_size} must be >= 0")
        return p

    def create(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(
            groups,
            lr=groups[0]["lr"],
            betas=(self.beta1, self.beta2),
            eps=self.eps,
            min_8bit_size=self.min_8bit_size,
        )

    def device_problems(self, device: torch.device, where: str = "optimizer") -> list[str]:
        # bitsandbytes' kernels exist per device and build; one real 8-bit update says more
        # than any version table.
        try:
            import bitsandbytes as bnb
            import torch

            probe = torch.zeros(4096, device=device, requires_grad=True)
            optimizer = bnb.optim.AdamW8bit([probe], lr=1e-3, min_8bit_size=0)
            probe.grad = torch.ones_like(probe)
            optimizer.step()
        except Exception as err:
            version = getattr(sys.modules.get("bitsandbytes"), "__version__", "?")
            reason = (str(err).strip().splitlines() or [""])[0]
            return [
                f"{where}.name: 'adamw8bit' cannot run on this device ({device.type}): "
                f"bitsandbytes {version} failed with {type(err).__name__}: {reason}. Use "
                f'{where}.name = "adamw" here, or train on a GPU bitsandbytes supports'
            ]
        return []
