"""``constant_with_warmup``: ``constant`` under the name diffusers and transformers use.

Formula: warmup to the base LR over ``warmup_steps`` updates, then ``lr = base_lr``.
"""

from __future__ import annotations

from dataclasses import dataclass

from schedulers.constant import Constant
from schedulers.registry import register


@register("constant_with_warmup")
@dataclass(frozen=True)
class ConstantWithWarmup(Constant):
    """Warmup to the base LR, then hold it (the same curve as ``constant``).

    lr = base_lr after warmup
    """
