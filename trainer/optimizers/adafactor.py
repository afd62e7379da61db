"""``adafactor``: Adafactor with factored second moments (transformers).

Adafactor (Shazeer & Stern, 2018) stores row and column statistics instead of a full second
moment. sdlora always gives it an explicit LR (``relative_step = false``, ``warmup_init =
false``), so the LR schedule drives it like any other optimizer; with ``scale_parameter`` the
step is further scaled by each tensor's RMS (which is 0 for a fresh LoRA B matrix, hence off
by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainer.optimizers.base import OptimizerSpec
from trainer.optimizers.registry import register
from typedtables import doc

if TYPE_CHECKING:
    import torch


@register("adafactor")
@dataclass(frozen=True)
class Adafactor(OptimizerSpec):
    """Adafactor (transformers.optimization.Adafactor) driven by the LR schedule.

    v ≈ row ⊗ col statistics of g²;  u = clip(g / sqrt(v));  p -= lr * u
    """

    beta1: float = doc("Decay rate of a first moment; 0 keeps none (Adafactor's default)", 0.0)
    eps1: float = doc("Regularizer added to the squared gradient", 1e-30)
    eps2: float = doc("Smallest parameter scale, with scale_parameter", 1e-3)
    clip_threshold: float = doc("Clip the update's RMS to this", 1.0)
    decay_rate: float = doc("Second-moment decay: beta2 = 1 - (step)^decay_rate", -0.8)
    scale_parameter: bool = doc("Scale the step by each tensor's RMS (relative steps)", False)

    def range_problems(self, where: str) -> list[str]:
        p = super().range_problems(where)
        if not 0 <= self.beta1 < 1:
            p.append(f"{where}.beta1: {self.beta1} must be in [0, 1) (0 = no first moment)")
        if self.eps1 <= 0 or self.eps2 <= 0 or self.clip_threshold <= 0:
            p.append(f"{where}.eps1 / {where}.eps2 / {where}.clip_threshold: must be > 0")
        if self.decay_rate >= 0:
            p.append(f"{where}.decay_rate: {self.decay_rate} must be < 0")
        return p

    def create(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        from transformers.optimization import Adafactor as AdafactorOpt

        return AdafactorOpt(
            groups,
            lr=groups[0]["lr"],
            eps=(self.eps1, self.eps2),
            clip_threshold=self.clip_threshold,
            decay_rate=self.decay_rate,
            beta1=self.beta1 or None,
            weight_decay=self.weight_decay,
            scale_parameter=self.scale_parameter,
            relative_step=False,
            warmup_init=False,
        )
