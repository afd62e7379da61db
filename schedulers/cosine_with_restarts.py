"""``cosine_with_restarts``: SGDR, cosine decays that restart at the peak (warm restarts).

The updates after warmup are cut into cycles. Either ``num_cycles`` cycles fill the run, or
the first cycle is ``first_cycle_steps`` long (PyTorch's ``T_0``) and they repeat until the
end; each cycle is ``cycle_mult`` (``T_mult``) times longer than the one before. In cycle
``i`` (from 0), at position ``u`` of its length ``L``::

    peak_i = cycle_decay ** i
    d      = peak_i * (1 + cos(pi * u / L)) / 2                          restart = "hard"
    d      = peak_i * u / R                      for u < R,  i >= 1      restart = "soft"
             peak_i * (1 + cos(pi * (u - R) / (L - R))) / 2   otherwise
    lr     = base_lr * d + floor * (1 - d)

``"hard"`` jumps straight back to the peak (SGDR). ``"soft"`` ramps linearly from the floor
to the new peak over ``R = restart_warmup_steps`` updates, then runs its cosine over the rest
of the cycle; the first cycle follows the main warmup and has no ramp.

- ``num_cycles = k`` with ``cycle_mult = 1`` is diffusers' / transformers'
  ``get_cosine_with_hard_restarts_schedule_with_warmup(num_cycles=k)``.
- ``first_cycle_steps = T_0``, ``cycle_mult = T_mult``, ``min_lr = eta_min`` and no warmup is
  ``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts``.

It restarts for real (diffusers #1232 once dropped ``num_cycles`` and never restarted; a
single cycle is refused here), and it depends only on the update index, never on gradient
accumulation (SimpleTuner #96 halved its restarts under accumulation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from schedulers.base import DecaySchedule
from schedulers.registry import register
from typedtables import doc


@register("cosine_with_restarts")
@dataclass(frozen=True)
class CosineWithRestarts(DecaySchedule):
    """Cosine decays to the floor that restart at the peak (SGDR), hard or soft.

    cycle i, position u of length L:  d = cycle_decay**i * (1 + cos(pi * u / L)) / 2
    soft restarts ramp d from 0 to cycle_decay**i over restart_warmup_steps first
    """

    num_cycles: int = doc(
        "Cycles that fill the post-warmup run, >= 2 (set this or first_cycle_steps)", 0
    )
    first_cycle_steps: int = doc(
        "Length of the first cycle in updates, PyTorch's T_0 (set this or num_cycles)", 0
    )
    cycle_mult: float = doc(
        "Each cycle is this many times longer than the last (T_mult), >= 1", 1.0
    )
    cycle_decay: float = doc("Each cycle's peak is this times the last one's, in (0, 1]", 1.0)
    restart: Literal["hard", "soft"] = doc(
        "hard jumps back to the peak; soft ramps up over restart_warmup_steps", "hard"
    )
    restart_warmup_steps: int = doc(
        "Updates of linear ramp from the floor at each soft restart (restart = 'soft')", 0
    )

    def decay(self, t: int, n: int) -> float:
        if t >= n:
            return 0.0
        index, pos, length, frac = self.cycle(t, n)
        peak = self.cycle_decay**index
        ramp = self.restart_warmup_steps
        if self.restart == "soft" and index > 0 and ramp:
            if pos < ramp:
                return peak * (pos / ramp)
            frac = (pos - ramp) / (length - ramp)
        return peak * (0.5 * (1.0 + math.cos(math.pi * frac)))

    def cycle(self, t: int, n: int) -> tuple[int, float, float, float]:
        """Where update ``t`` (after warmup, of ``n``) falls.

        Returns:
            ``(index, position, length, fraction)``: the cycle's 0-based index, ``t``'s
            position in it and its length in updates, and ``position / length``.
        """
        k, first, mult = self.num_cycles, self.first_cycle_steps, self.cycle_mult
        if mult == 1:
            if first:
                index, pos = divmod(t, first)
                return index, pos, first, pos / first
            # Integer arithmetic finds the cycle exactly, even where t * k / n is a whole
            # number that floating point would land just below.
            index, rem = divmod(k * t, n)
            return index, rem / k, n / k, rem / n
        length = first or n * (mult - 1) / (mult**k - 1)
        start, index = 0.0, 0
        while t >= start + length:
            start += length
            length *= mult
            index += 1
        return index, t - start, length, (t - start) / length

    def range_problems(self, where: str) -> list[str]:
        p = super().range_problems(where)
        k, first = self.num_cycles, self.first_cycle_steps
        if (k > 0) == (first > 0) or k < 0 or first < 0:
            p.append(
                f"{where}.num_cycles / {where}.first_cycle_steps: set exactly one, as a "
                f"positive number (got {k} and {first})"
            )
        elif k == 1:
            p.append(f'{where}.num_cycles: 1 cycle never restarts; use >= 2, or name = "cosine"')
        if self.cycle_mult < 1:
            p.append(f"{where}.cycle_mult: {self.cycle_mult} must be >= 1")
        if not 0 < self.cycle_decay <= 1:
            p.append(f"{where}.cycle_decay: {self.cycle_decay} must be in (0, 1]")
        ramp = self.restart_warmup_steps
        if ramp < 0:
            p.append(f"{where}.restart_warmup_steps: {ramp} must be >= 0")
        elif self.restart == "soft" and ramp == 0:
            p.append(f"{where}.restart_warmup_steps: restart = 'soft' needs a ramp of >= 1 update")
        elif self.restart == "hard" and ramp:
            p.append(
                f"{where}.restart_warmup_steps: only used with restart = 'soft'; set that or "
                "drop this key"
            )
        return p

    def run_problems(self, total_steps: int, where: str) -> list[str]:
        p = super().run_problems(total_steps, where)
        if p:
            return p
        n = total_steps - self.warmup_updates(total_steps)
        if self.first_cycle_steps >= n:
            p.append(
                f"{where}.first_cycle_steps: {self.first_cycle_steps} is not shorter than the "
                f"{n} updates after warmup, so the LR never restarts; lower it"
            )
            return p
        if self.num_cycles > n:
            p.append(
                f"{where}.num_cycles: {self.num_cycles} cycles do not fit in the {n} updates "
                "after warmup"
            )
            return p
        if self.restart == "soft":
            # The shortest cycle with a ramp is the second one.
            _, _, first_length, _ = self.cycle(0, n)
            second = first_length * self.cycle_mult
            if self.restart_warmup_steps >= second:
                p.append(
                    f"{where}.restart_warmup_steps: {self.restart_warmup_steps} is not shorter "
                    f"than the second cycle ({second:g} updates); lower it"
                )
        return p
