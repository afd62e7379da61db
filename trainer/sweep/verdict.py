"""A fair verdict: rank configurations by their mean over seeds, and say whether the best one
beats the runner-up by more than the seed spread.

The rule, precisely. For each configuration, over its completed seeds: the mean of the final
validation losses, the sample standard deviation ``s`` (n − 1 in the denominator) and the
standard error of the mean ``SEM = s / sqrt(n)``. Configurations whose every seed completed
are ranked by mean (lower is better); configurations with a pruned, failed or unfinished
seed are listed after them and take no part in the verdict. The best beats the runner-up
**only if their intervals mean ± 2·SEM do not overlap**:

    mean_best + 2·SEM_best < mean_runner_up − 2·SEM_runner_up

Otherwise the two are reported as tied within seed noise. Each interval is roughly a 95 %
interval for its mean, so non-overlap is a conservative test: it calls a difference real
only when it stands well clear of what reseeding alone moves. With one seed there is no
spread to measure, and the report says that instead of naming a winner.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z = 2.0  # the interval half-width in standard errors


@dataclass(frozen=True)
class Summary:
    """One configuration's final validation losses over its seeds."""

    label: str
    values: tuple[float, ...]
    seeds: int  # seeds the configuration should have run

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def complete(self) -> bool:
        return self.n == self.seeds and self.n > 0

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n if self.n else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (n − 1); NaN for fewer than two seeds."""
        if self.n < 2:
            return math.nan
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))

    @property
    def sem(self) -> float:
        return self.std / math.sqrt(self.n) if self.n >= 2 else math.nan

    def interval(self) -> tuple[float, float]:
        """mean ± 2·SEM."""
        return self.mean - Z * self.sem, self.mean + Z * self.sem


@dataclass(frozen=True)
class Verdict:
    """The sweep's answer in one sentence, and which rule gave it."""

    kind: str  # "real", "tie", "one seed", "alone", "none"
    text: str
    best: Summary | None = None
    runner_up: Summary | None = None


def rank(summaries: Sequence[Summary]) -> list[Summary]:
    """Complete configurations by mean, then incomplete ones by mean (no values: last)."""
    return sorted(summaries, key=lambda s: (not s.complete, s.n == 0, s.mean if s.n else math.inf))


def decide(ranked: Sequence[Summary]) -> Verdict:
    """Apply the rule of the module docstring to the two best complete configurations."""
    done = [s for s in ranked if s.complete]
    if not done:
        return Verdict("none", "No configuration has finished all its seeds yet.")
    best = done[0]
    if len(done) == 1:
        return Verdict("alone", f"Only {best.label} has finished all its seeds.", best)
    second = done[1]
    gap = second.mean - best.mean
    if best.n < 2 or second.n < 2:
        return Verdict(
            "one seed",
            f"{best.label} has the lowest validation loss ({best.mean:.6g}, "
            f"{gap:.3g} below {second.label}), but with one seed per configuration there is "
            "no seed spread to compare that gap with: run several seeds "
            "(seeds = [0, 1, 2]) to know whether it is real.",
            best,
            second,
        )
    (b_lo, b_hi), (r_lo, r_hi) = best.interval(), second.interval()
    shown = f"[{b_lo:.6g}, {b_hi:.6g}] vs [{r_lo:.6g}, {r_hi:.6g}]"
    if b_hi < r_lo:
        return Verdict(
            "real",
            f"{best.label} beats {second.label} by more than the seed spread: mean "
            f"validation loss {best.mean:.6g} vs {second.mean:.6g} over {best.n} and "
            f"{second.n} seeds, and their mean ± 2·SEM intervals do not overlap ({shown}).",
            best,
            second,
        )
    return Verdict(
        "tie",
        f"{best.label} and {second.label} are tied within seed noise: the means differ by "
        f"{gap:.3g} ({best.mean:.6g} vs {second.mean:.6g}), but their mean ± 2·SEM "
        f"intervals overlap ({shown}). Either is fine; more seeds would narrow the intervals.",
        best,
        second,
    )
