"""The Schedule contract: a learning rate as a pure function of the optimizer-update index.

A schedule is a frozen dataclass. Its fields are its parameters, and so also the keys of the
``[lr_scheduler]`` TOML table and the text of its help. ``lr(step, total_steps, base_lr)``
gives the LR for update ``step`` (0-based: step 0 is the first optimizer update) of a run of
``total_steps`` updates. Nothing is stored between calls, so resuming, changing the run length
or plotting the curve can never drift from what training does.

Every schedule runs in two phases:

1. **Warmup**, the first ``W`` updates (``warmup_steps``: an int count, or a float in (0, 1)
   taken as a ratio of the run and rounded to the nearest update, halves up). With
   ``p = step / W`` the LR is ``f(p) * peak`` where ``peak`` is the schedule's value at the
   first update after warmup (the base LR for every built-in decay) and ``f`` starts at
   ``s = warmup_start_factor``::

       linear:       f(p) = s + (1 - s) * p
       cosine:       f(p) = s + (1 - s) * (1 - cos(pi * p)) / 2
       exponential:  f(p) = s ** (1 - p)          (needs s > 0)

   So step 0 gets ``s * peak`` and step ``W`` is the first update at the peak. With ``s = 0``
   and the linear shape this is exactly transformers' ``step / W`` warmup.
2. **The schedule's own curve** over the remaining ``n = total_steps - W`` updates, evaluated
   at ``t = step - W``. Every count or fraction a schedule takes (milestones, step sizes,
   cycle lengths, ``decay_ratio``) is measured on this post-warmup clock. A decaying curve
   reaches its end value at ``t = n``, one past the last update, as in transformers and
   ``torch.optim.lr_scheduler``; the last update therefore uses a small non-zero LR.
   From ``step = total_steps`` on the LR holds at its ``t = n`` value.

Decaying schedules (:class:`DecaySchedule`) also have a floor, ``min_lr_ratio`` (a fraction of
each param group's base LR) or ``min_lr`` (an absolute LR), and give
``lr = base_lr * d + floor * (1 - d)`` for their decay factor ``d`` (1 at the peak, 0 at the
floor), which is exact at both ends.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from typedtables import doc, field_problems

WarmupShape = Literal["linear", "cosine", "exponential"]


@dataclass(frozen=True)
class Schedule:
    """Base of every LR schedule: shared warmup fields and the ``lr()`` contract.

    Subclasses are ``@dataclass(frozen=True)``, give every field a one-line doc with
    :func:`typedtables.doc`, and implement :meth:`after_warmup` (or, for a decay
    towards a floor, subclass :class:`DecaySchedule` and implement ``decay``).
    """

    # The registered name. The registry sets it; until then it is "module:QualName", which
    # `registry.get` also accepts, so any importable schedule can be saved and rebuilt.
    name: ClassVar[str] = ""

    warmup_steps: int | float = doc(
        "Warmup length: an int count of optimizer updates, or a float in (0, 1) as a ratio of the "
        "run (rounded to the nearest update)",
        0,
    )
    warmup_shape: WarmupShape = doc(
        "Warmup curve from warmup_start_factor to the peak: linear, cosine or exponential",
        "linear",
    )
    warmup_start_factor: float = doc(
        "LR factor at update 0 of the warmup (0 starts from LR 0, as transformers does)", 0.0
    )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = f"{cls.__module__}:{cls.__qualname__}"

    def __post_init__(self) -> None:
        # A list given in Python becomes a tuple, so schedules stay immutable and hashable.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))

    # ------------------------------------------------------------------ the curve

    def lr(self, step: int, total_steps: int, base_lr: float) -> float:
        """The LR of one param group for one optimizer update.

        Args:
            step: 0-based index of the optimizer update (0 is the first update).
            total_steps: Optimizer updates in the whole run.
            base_lr: The param group's base (peak) LR.

        Returns:
            The LR to set before update ``step``.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        # Past the end the LR holds at its value for step = total_steps.
        step = min(step, total_steps)
        warmup = self.warmup_updates(total_steps)
        n = max(1, total_steps - warmup)
        if step < warmup:
            return self.warmup_factor(step, warmup) * self.after_warmup(0, n, base_lr)
        return self.after_warmup(min(step - warmup, n), n, base_lr)

    def lrs(self, step: int, total_steps: int, base_lrs: Sequence[float]) -> list[float]:
        """:meth:`lr` for every param group.

        Args:
            step: 0-based index of the optimizer update.
            total_steps: Optimizer updates in the whole run.
            base_lrs: One base LR per param group.

        Returns:
            One LR per param group, in order.
        """
        return [self.lr(step, total_steps, base) for base in base_lrs]

    def after_warmup(self, t: int, n: int, base_lr: float) -> float:
        """The LR ``t`` updates after warmup, out of ``n`` post-warmup updates (``0 <= t <= n``).

        Subclasses implement this (or ``DecaySchedule.decay``).
        """
        raise NotImplementedError(f"{type(self).__qualname__} does not implement after_warmup()")

    def warmup_updates(self, total_steps: int) -> int:
        """Warmup length in updates: the int count, or the ratio of ``total_steps`` rounded."""
        w = self.warmup_steps
        if isinstance(w, float):
            # Round half up: Python's round() would send 2.5 to 2 and 3.5 to 4.
            return max(0, math.floor(w * total_steps + 0.5))
        return max(0, int(w))

    def warmup_factor(self, step: int, warmup: int) -> float:
        """The warmup multiplier at ``step`` (``0 <= step < warmup``); see the module docs."""
        p = step / warmup
        s = self.warmup_start_factor
        if self.warmup_shape == "cosine":
            return s + (1.0 - s) * (0.5 * (1.0 - math.cos(math.pi * p)))
        if self.warmup_shape == "exponential":
            return s ** (1.0 - p) if s > 0 else 0.0
        return s + (1.0 - s) * p

    # ------------------------------------------------------------------ validation

    def problems(self, where: str = "lr_scheduler") -> list[str]:
        """Every problem with the field values, independent of the run length.

        Args:
            where: The TOML path of the table, used to name keys (``lr_scheduler.<key>``).

        Returns:
            Human messages, empty when the schedule is valid. Range checks only run once
            every field has the right type.
        """
        found = field_problems(self, where)
        return found or self.range_problems(where)

    def range_problems(self, where: str) -> list[str]:
        """Problems with well-typed field values; subclasses extend it (call ``super()``)."""
        p = []
        w = self.warmup_steps
        if isinstance(w, float) and not 0 < w < 1:
            p.append(
                f"{where}.warmup_steps: {w!r} is a float, so a ratio of the run, and must be in "
                "(0, 1); write an int for a count of updates"
            )
        elif isinstance(w, int) and w < 0:
            p.append(f"{where}.warmup_steps: {w} must be >= 0")
        if not 0 <= self.warmup_start_factor <= 1:
            p.append(f"{where}.warmup_start_factor: {self.warmup_start_factor} must be in [0, 1]")
        elif self.warmup_shape == "exponential" and self.warmup_start_factor == 0:
            p.append(
                f"{where}.warmup_start_factor: the exponential warmup needs a start factor > 0 "
                "(an exponential cannot start at 0), e.g. 0.01"
            )
        return p

    def check(
        self, total_steps: int, where: str = "lr_scheduler", base_lrs: Sequence[float] = ()
    ) -> list[str]:
        """Every problem of this schedule for a run of ``total_steps`` updates.

        Args:
            total_steps: Optimizer updates in the run.
            where: The TOML path of the table, used to name keys.
            base_lrs: The param groups' base LRs, when known, to check absolute floors.

        Returns:
            :meth:`problems` plus the run-length problems (warmup not shorter than the run,
            cycles that never restart...), empty when the schedule can run.
        """
        found = self.problems(where)
        if found:
            return found
        if total_steps < 1:
            return [f"{where}: a run of {total_steps} optimizer updates has nothing to schedule"]
        return self.run_problems(total_steps, where) + self.lr_problems(base_lrs, where)

    def run_problems(self, total_steps: int, where: str) -> list[str]:
        """Problems that depend on the run length; subclasses extend it (call ``super()``)."""
        warmup = self.warmup_updates(total_steps)
        if warmup < total_steps:
            return []
        w = self.warmup_steps
        said = (
            f"{w!r} of {total_steps} updates rounds to {warmup} warmup updates, which"
            if isinstance(w, float)
            else f"{warmup} warmup updates"
        )
        return [
            f"{where}.warmup_steps: {said} is not shorter than the run ({total_steps} updates); "
            "lower it or raise train.max_steps"
        ]

    def lr_problems(self, base_lrs: Sequence[float], where: str) -> list[str]:
        """Problems that depend on the base LRs; subclasses extend it (call ``super()``)."""
        return []

    # ------------------------------------------------------------------ identity

    def params(self) -> dict[str, Any]:
        """The field values as JSON-able data (tuples become lists), in field order."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }


@dataclass(frozen=True)
class DecaySchedule(Schedule):
    """A schedule that decays from the base LR towards a floor.

    Subclasses implement :meth:`decay`, a factor ``d`` from 1 (the peak) to 0 (the floor);
    the LR is ``base_lr * d + floor * (1 - d)``.
    """

    min_lr_ratio: float = doc(
        "Floor as a fraction of each param group's base LR (0 decays to 0)", 0.0
    )
    min_lr: float = doc(
        "Floor as an absolute LR, the same for every param group (exclusive with min_lr_ratio)",
        0.0,
    )

    def floor(self, base_lr: float) -> float:
        """The LR this schedule decays towards for a param group with ``base_lr``."""
        return self.min_lr if self.min_lr else self.min_lr_ratio * base_lr

    def after_warmup(self, t: int, n: int, base_lr: float) -> float:
        d = self.decay(t, n)
        return base_lr * d + self.floor(base_lr) * (1.0 - d)

    def decay(self, t: int, n: int) -> float:
        """The decay factor ``t`` updates after warmup, out of ``n`` (1 = peak, 0 = floor)."""
        raise NotImplementedError(f"{type(self).__qualname__} does not implement decay()")

    def range_problems(self, where: str) -> list[str]:
        p = super().range_problems(where)
        if not 0 <= self.min_lr_ratio <= 1:
            p.append(f"{where}.min_lr_ratio: {self.min_lr_ratio} must be in [0, 1]")
        if self.min_lr < 0:
            p.append(f"{where}.min_lr: {self.min_lr} must be >= 0")
        if self.min_lr and self.min_lr_ratio:
            p.append(
                f"{where}.min_lr / {where}.min_lr_ratio: both set ({self.min_lr!r} and "
                f"{self.min_lr_ratio!r}); keep one: min_lr is an absolute LR, min_lr_ratio a "
                "fraction of the base LR"
            )
        return p

    def absolute_floors(self) -> dict[str, float]:
        """The floor keys that hold an absolute LR, by name (checked against base LRs)."""
        return {"min_lr": self.min_lr}

    def lr_problems(self, base_lrs: Sequence[float], where: str) -> list[str]:
        p = super().lr_problems(base_lrs, where)
        for key, floor in self.absolute_floors().items():
            for i, base in enumerate(base_lrs):
                if floor > base:
                    p.append(
                        f"{where}.{key}: {floor!r} is above the base LR {base!r} of param "
                        f"group {i}, so its LR would rise instead of decay; lower it or use "
                        "min_lr_ratio"
                    )
        return p


@dataclass(frozen=True)
class EndLRSchedule(DecaySchedule):
    """A decay whose floor may also be given as ``lr_end``, the name transformers, diffusers
    and SimpleTuner use for ``polynomial`` and ``sine``; it is an absolute LR like ``min_lr``."""

    lr_end: float = doc(
        "Floor as an absolute LR (the peers' name; exclusive with min_lr and min_lr_ratio)", 0.0
    )

    def floor(self, base_lr: float) -> float:
        return self.lr_end if self.lr_end else super().floor(base_lr)

    def range_problems(self, where: str) -> list[str]:
        p = super().range_problems(where)
        if self.lr_end < 0:
            p.append(f"{where}.lr_end: {self.lr_end} must be >= 0")
        if self.lr_end and (self.min_lr or self.min_lr_ratio):
            p.append(f"{where}.lr_end: set together with min_lr / min_lr_ratio; keep one floor")
        return p

    def absolute_floors(self) -> dict[str, float]:
        return {**super().absolute_floors(), "lr_end": self.lr_end}
