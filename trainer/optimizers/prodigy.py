"""``prodigy``: Adam whose step size is estimated as it trains (prodigyopt).

Prodigy (Mishchenko & Defazio, 2023) keeps an estimate ``d`` of the distance to the solution
and steps with ``d · lr``: the LR is a multiplier of its own estimate, so it wants
``train.learning_rate = 1.0`` and is tuned with ``d_coef`` (sd-scripts #1929, kohya_ss PR
#3264). An LR schedule still applies on top of ``d`` (cosine is what its authors suggest).
The defaults are what its authors advise for diffusion models: ``safeguard_warmup``,
``use_bias_correction`` and ``weight_decay = 0.01`` (prodigyopt's own defaults are off, off
and 0). ``effective_lr`` in metrics.jsonl is the step size each update took, ``d · lr``
(times Adam's bias correction when ``use_bias_correction``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainer.optimizers.base import BaseLR, Findings, OptimizerSpec, beta_problems
from trainer.optimizers.registry import register
from typedtables import doc

if TYPE_CHECKING:
    import torch

    from schedulers import Schedule


@register("prodigy")
@dataclass(frozen=True)
class Prodigy(OptimizerSpec):
    """Adam with a step size it estimates itself (prodigyopt.Prodigy); base LR 1.0.

    p -= d · lr · m / (sqrt(v) + d · eps), d estimated from the gradients seen so far
    """

    package = "prodigyopt"
    extra = "prodigy"
    adapts_step_size = True

    weight_decay: float = doc(
        "Weight decay of the UNet adapters (decoupled unless decouple = false)", 1e-2
    )
    beta1: float = doc("Decay rate of the gradient's running mean", 0.9)
    beta2: float = doc("Decay rate of the squared gradient's running mean", 0.999)
    beta3: float = doc("Decay rate of the step-size statistics; 0 uses sqrt(beta2)", 0.0)
    eps: float = doc("Added to the denominator for numerical stability", 1e-8)
    decouple: bool = doc("AdamW-style decoupled weight decay (false: an L2 penalty)", True)
    use_bias_correction: bool = doc("Adam's bias correction of the moments", True)
    safeguard_warmup: bool = doc(
        "Keep the LR out of the d estimate's denominator, so a warmup or restarts cannot make "
        "d overshoot",
        True,
    )
    d0: float = doc("Initial estimate of d (rarely needs changing)", 1e-6)
    d_coef: float = doc(
        "Multiplier of the d estimate: the knob to tune (0.5 and 2.0 are usual)", 1.0
    )
    growth_rate: float = doc("Largest factor d may grow by per update; 0 = unbounded", 0.0)
    slice_p: int = doc(
        "Estimate d from every p-th element only (saves memory; ~11 is reasonable, 1 = exact)", 1
    )

    def range_problems(self, where: str) -> list[str]:
        p = super().range_problems(where) + beta_problems(self, where, ("beta1", "beta2", "beta3"))
        for key in ("d0", "d_coef"):
            if getattr(self, key) <= 0:
                p.append(f"{where}.{key}: {getattr(self, key)} must be > 0")
        if self.growth_rate != 0 and self.growth_rate < 1:
            p.append(f"{where}.growth_rate: {self.growth_rate} must be >= 1 (or 0 = unbounded)")
        if self.slice_p < 1:
            p.append(f"{where}.slice_p: {self.slice_p} must be >= 1")
        return p

    def interplay(
        self, lr_scheduler: Schedule, base_lrs: Sequence[BaseLR], where: str = "optimizer"
    ) -> Findings:
        found = super().interplay(lr_scheduler, base_lrs, where)
        for lr in base_lrs[1:]:
            first = base_lrs[0]  # the LR every other must equal
            if lr.value != first.value:
                found.errors.append(
                    f"{lr.key} = {lr.value!r} differs from {first.key} = {first.value!r}, but "
                    "Prodigy estimates one step size for all param groups and refuses "
                    f"different LRs; set {lr.key} = 0 (same as {first.key})"
                )
        restarts = lr_scheduler.name == "cosine_with_restarts"
        if (lr_scheduler.warmup_steps or restarts) and not self.safeguard_warmup:
            what = "restarts" if restarts else "warms up"
            found.warnings.append(
                f"{where}.safeguard_warmup: false while the LR schedule {what}; Prodigy's "
                "authors advise safeguard_warmup = true there: while the LR is small, training "
                "progresses slowly and d can be overestimated"
            )
        return found

    def create(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        from prodigyopt import Prodigy as ProdigyOpt

        return ProdigyOpt(
            groups,
            lr=groups[0]["lr"],
            betas=(self.beta1, self.beta2),
            beta3=self.beta3 or None,
            eps=self.eps,
            decouple=self.decouple,
            use_bias_correction=self.use_bias_correction,
            safeguard_warmup=self.safeguard_warmup,
            d0=self.d0,
            d_coef=self.d_coef,
            growth_rate=self.growth_rate or float("inf"),
            slice_p=self.slice_p,
        )

    def effective_lrs(self, optimizer: torch.optim.Optimizer) -> list[float]:
        # What prodigyopt's step() is about to use: dlr = d · lr · bias correction, with the
        # d it holds before the step (the step then updates d for the next one).
        out = []
        for group in optimizer.param_groups:
            factor = 1.0
            if group["use_bias_correction"]:
                k, (beta1, beta2) = group["k"], group["betas"]
                factor = ((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1))
            out.append(float(group["d"]) * group["lr"] * factor)
        return out
