"""``piecewise_constant``: LR multipliers held over ranges of updates (diffusers' step rules).

``step_rules = "1:10,0.1:20,0.01:30,0.005"`` means: multiplier 1 for updates ``t < 10``, 0.1
for ``10 <= t < 20``, 0.01 for ``20 <= t < 30`` and 0.005 from then on. Formula::

    lr(t) = base_lr * m_i   for the first rule "m_i:b_i" with t < b_i, else the last m

These are the semantics of diffusers' ``get_piecewise_constant_schedule``: the numbers after
the colons are update indices where a rule ends, not lengths (its docstring's "the next 20
steps" describes lengths, but the code, and this schedule, use boundaries). Boundaries count
updates after warmup and must increase.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

from schedulers.base import Schedule
from schedulers.registry import register
from typedtables import doc, increasing_from_one


@functools.cache
def parse_step_rules(text: str) -> tuple[tuple[int, ...], tuple[float, ...], tuple[str, ...]]:
    """Parse ``"m1:b1,m2:b2,...,m_last"``.

    Returns:
        ``(boundaries, multipliers, problems)``: one more multiplier than boundaries, and
        the problems found (empty when the text is valid).
    """
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    if not parts:
        return (), (), ("required, e.g. '1:100,0.1:200,0.01' (multiplier:end_update, ..., last)",)
    bounds: list[int] = []
    mults: list[float] = []
    problems: list[str] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        value, colon, end = part.partition(":")
        if last and colon:
            problems.append(
                f"the last rule {part!r} must be a bare multiplier (it applies to every later "
                "update), e.g. append ',0.01'"
            )
        elif not last and not colon:
            problems.append(f"rule {part!r} must be 'multiplier:end_update'")
        try:
            mult = float(value)
            if not mult >= 0:
                raise ValueError
            mults.append(mult)
        except ValueError:
            problems.append(f"multiplier {value.strip()!r} in {part!r} is not a number >= 0")
        if colon and not last:
            try:
                bounds.append(int(end))
            except ValueError:
                problems.append(f"end update {end.strip()!r} in {part!r} is not an integer")
    if not problems and not increasing_from_one(bounds):
        problems.append(f"end updates {bounds} must be >= 1 and strictly increasing")
    return tuple(bounds), tuple(mults), tuple(problems)


@register("piecewise_constant")
@dataclass(frozen=True)
class PiecewiseConstant(Schedule):
    """Constant multipliers of the base LR over ranges of updates (diffusers' step_rules).

    lr = base_lr * m_i for the first rule "m_i:b_i" with t < b_i, else the last multiplier
    """

    step_rules: str = doc(
        "Rules 'multiplier:end_update,...,last_multiplier', e.g. '1:500,0.1:800,0.01' (required)",
        "",
    )

    def after_warmup(self, t: int, n: int, base_lr: float) -> float:
        bounds, mults, _ = parse_step_rules(self.step_rules)
        return base_lr * mults[bisect.bisect_right(bounds, t)]

    def range_problems(self, where: str) -> list[str]:
        p = super().range_problems(where)
        p += [f"{where}.step_rules: {msg}" for msg in parse_step_rules(self.step_rules)[2]]
        return p
