"""The sweep's verdict: every configuration placed as tied with the best or behind it, from
paired t-tests with a correction for comparing many configurations at once.

**Paired.** Runs with the same seed share the LoRA's initialisation, the data order, the noise
and the timesteps, so configuration ``k``'s result on seed ``s`` is paired with every other
configuration's result on seed ``s``. The differences ``y[k, s] - y[best, s]`` cancel what the
seed moves in both, which is most of the seed-to-seed spread. Each difference of means gets
scipy's paired t-test (``scipy.stats.ttest_rel``: the t statistic on ``n - 1`` degrees of
freedom, its two-sided p-value and its t-based confidence interval).

**Corrected for every pair (Holm).** The best configuration is the one with the best mean, so
it is chosen from the data: the comparisons with it are the most extreme pairs of the sweep,
not ``K - 1`` pairs fixed in advance. Holm's correction over only those ``K - 1`` would call a
difference real more often than its level when all configurations are equal (the simulation in
``tests/test_sweep_verdict.py`` measures it above 6 % at a stated 5 % with three
configurations, and more with eight). So the family is **every pair** of finished
configurations, ``K (K - 1) / 2`` paired tests, and Holm's step-down correction
(``statsmodels.stats.multitest.multipletests``, method ``"holm"``) controls the chance of any
false "behind" at the level for any dependence between the tests: every pair the data could
have picked is already counted. A configuration is *behind* the best when its pair's
Holm-adjusted p-value is at most the level; otherwise it is *tied* with the best.

Why not Hsu's multiple comparisons with the best (MCB): its intervals for ``mu_i - min mu_j``
are constrained to contain 0, and "not the best" there includes "tied for best", so with two
equal configurations it calls one "not the best" 10 % of the time at a stated 95 %; it also
pools one variance over all configurations, which close schedules (moving together seed by
seed) do not share with distant ones. The per-pair paired test needs neither.

**Seeds to resolve a tie.** For a tied configuration, statsmodels' power of the paired t-test
(``TTestPower.solve_power``) gives the seeds at which a gap of the observed size, at the
observed spread of the paired differences, would be detected 80 % of the time at the strictest
step of the correction (level / number of pairs).

Configurations with an unfinished, pruned or failed seed take no part (a pruned seed was
stopped because it looked worse, so its finished seeds are not a fair sample); they are named
with what is missing. With one seed there is no spread, and the verdict says so.
"""

from __future__ import annotations

import gc
import itertools
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np

from trainer.sweep.objectives import Objective

LEVEL = 0.95  # confidence level of every interval; the tests' level is 1 - LEVEL
ALPHA = 1 - LEVEL
POWER = 0.8  # "seeds to resolve": detected this often
MAX_SEEDS = 1000  # beyond this, "seeds to resolve" is reported as more than it


@dataclass(frozen=True)
class Summary:
    """One configuration's results on one objective: a value per finished seed."""

    label: str
    values: dict[int, float]  # seed -> value, finished seeds only
    seeds: tuple[int, ...]  # every seed the configuration should run
    missing: dict[int, str] = field(default_factory=dict)  # seed -> state, unfinished seeds

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def complete(self) -> bool:
        return self.n > 0 and all(s in self.values for s in self.seeds)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.values.values()))) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (n - 1); NaN below two seeds."""
        return float(np.std(list(self.values.values()), ddof=1)) if self.n > 1 else math.nan

    def row(self) -> list[float]:
        return [self.values[s] for s in self.seeds]


@dataclass(frozen=True)
class Comparison:
    """A configuration against the best, over their shared seeds.

    ``gap`` and its interval are in the objective's units, positive when the configuration is
    worse than the best (higher loss, or lower score).
    """

    label: str
    place: str  # "behind", "tied", "identical"
    gap: float
    low: float  # LEVEL interval of the gap, this pair alone (scipy's confidence_interval)
    high: float
    low_all: float  # the same at LEVEL over every pair at once (Bonferroni)
    high_all: float
    t: float
    df: int
    p: float  # two-sided paired t-test
    p_holm: float  # Holm-adjusted over every pair
    seeds_needed: int | None = None  # for a tie: seeds that would resolve it (see module)


@dataclass(frozen=True)
class Verdict:
    """The sweep's answer on one objective: a sentence, how it was reached, and the numbers."""

    kind: str  # "placed", "identical", "one seed", "alone", "none"
    text: str  # one sentence
    method: str  # how: the test, the level, the seeds, the correction
    objective: Objective
    best: Summary | None = None
    comparisons: tuple[Comparison, ...] = ()
    unplaced: tuple[Summary, ...] = ()
    pairs: int = 0

    @property
    def behind(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.place == "behind"]

    @property
    def tied(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.place != "behind"]


# ---------------------------------------------------------------- the procedure, vectorised


@contextmanager
def _quick_gc() -> Iterator[None]:
    """statsmodels' Holm branch calls ``gc.collect()`` on every call, which costs a tenth of a
    second in a process holding torch; frozen objects are skipped by it (``gc.freeze``)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@dataclass(frozen=True)
class Tests:
    """The verdict's numbers for S sweeps of K configurations at once (arrays lead with S)."""

    best: np.ndarray  # (S,) index of the best configuration
    gap: np.ndarray  # (S, K) mean paired difference to the best, worse = positive
    t: np.ndarray  # (S, K)
    p: np.ndarray  # (S, K) two-sided; 1 where a configuration equals the best on every seed
    p_holm: np.ndarray  # (S, K) Holm-adjusted over all K (K - 1) / 2 pairs
    low: np.ndarray  # (S, K)
    high: np.ndarray
    low_all: np.ndarray
    high_all: np.ndarray
    sd: np.ndarray  # (S, K) sample standard deviation of the paired differences
    identical: np.ndarray  # (S, K) bool: equal to the best on every seed
    pairs: int

    @property
    def behind(self) -> np.ndarray:
        """(S, K) bool: the configuration is behind the best at the level."""
        return (self.p_holm <= ALPHA) & (self.gap > 0)


def paired_tests(values: np.ndarray, lower_is_better: bool = True) -> Tests:
    """The verdict's procedure on ``values`` of shape (S, K, n): S sweeps, K configurations,
    n seeds (column ``s`` of every configuration is the same seed). One sweep is S = 1; the
    simulation in the tests runs thousands through this same function.
    """
    from scipy import stats
    from statsmodels.stats.multitest import multipletests

    y = np.asarray(values, dtype=float)
    if y.ndim != 3 or y.shape[1] < 2 or y.shape[2] < 2:
        raise ValueError(f"need (sweeps, >= 2 configurations, >= 2 seeds), got {y.shape}")
    y = y if lower_is_better else -y  # lower is better from here on
    sweeps, k = y.shape[:2]
    best = np.argmin(y.mean(axis=2), axis=1)
    pairs = list(itertools.combinations(range(k), 2))
    first, second = (np.array(side) for side in zip(*pairs, strict=True))
    reference = y[np.arange(sweeps), best][:, None, :]  # (S, 1, n)
    with warnings.catch_warnings():
        # Equal results make the differences constant: scipy warns and returns NaN; that
        # case is decided below, by the values themselves.
        warnings.simplefilter("ignore", RuntimeWarning)
        every = stats.ttest_rel(y[:, first], y[:, second], axis=-1)
        to_best = stats.ttest_rel(y, reference, axis=-1)
        ci = to_best.confidence_interval(LEVEL)
        ci_all = to_best.confidence_interval(1 - ALPHA / len(pairs))
    pair_p = np.nan_to_num(every.pvalue, nan=1.0)  # NaN: differences all zero, no evidence
    with _quick_gc():
        holm = np.stack([multipletests(p, ALPHA, method="holm")[1] for p in pair_p])
    index = {pair: i for i, pair in enumerate(pairs)}
    p_holm = np.ones((sweeps, k))
    for s in range(sweeps):
        for j in range(k):
            b = int(best[s])
            if j != b:
                p_holm[s, j] = holm[s, index[(min(j, b), max(j, b))]]
    diffs = y - reference
    identical = np.all(diffs == 0, axis=2)
    return Tests(
        best=best,
        gap=diffs.mean(axis=2),
        t=np.asarray(to_best.statistic),
        p=np.where(identical, 1.0, np.nan_to_num(to_best.pvalue, nan=1.0)),
        p_holm=p_holm,
        low=np.asarray(ci.low),
        high=np.asarray(ci.high),
        low_all=np.asarray(ci_all.low),
        high_all=np.asarray(ci_all.high),
        sd=diffs.std(axis=2, ddof=1),
        identical=identical,
        pairs=len(pairs),
    )


def seeds_to_resolve(gap: float, sd: float, pairs: int) -> int | None:
    """Seeds at which a paired t-test at the strictest Holm step (level / pairs) detects a
    gap of this size at this spread with probability POWER (statsmodels' ``TTestPower``);
    None when there is no gap to resolve."""
    from statsmodels.stats.power import TTestPower

    if not gap > 0 or not math.isfinite(gap) or not sd > 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            nobs = TTestPower().solve_power(
                effect_size=gap / sd, alpha=ALPHA / pairs, power=POWER, alternative="two-sided"
            )
        except (ValueError, RuntimeError, ArithmeticError):
            return MAX_SEEDS + 1
    nobs = float(np.squeeze(nobs))
    return MAX_SEEDS + 1 if not math.isfinite(nobs) or nobs > MAX_SEEDS else math.ceil(nobs)


# ---------------------------------------------------------------- one sweep


def rank(summaries: Sequence[Summary], objective: Objective) -> list[Summary]:
    """Complete configurations best first, then the others (by mean of what finished)."""
    sign = 1 if objective.lower_is_better else -1

    def key(s: Summary) -> tuple[bool, bool, float]:
        return (not s.complete, s.n == 0, sign * s.mean if s.n else math.inf)

    return sorted(summaries, key=key)


def decide(summaries: Sequence[Summary], objective: Objective) -> Verdict:
    """Place every configuration whose seeds all finished; name the others."""
    ranked = rank(summaries, objective)
    done = [s for s in ranked if s.complete]
    unplaced = tuple(s for s in ranked if not s.complete)
    if not done:
        return Verdict("none", "No configuration has finished all its seeds yet.", "", objective,
                       unplaced=unplaced)  # fmt: skip
    best = done[0]
    if len(done) == 1:
        text = f"Only {best.label} has finished all its seeds; there is nothing to compare it with."
        return Verdict("alone", _with_unplaced(text, unplaced), "", objective, best,
                       unplaced=unplaced)  # fmt: skip
    if best.n < 2:
        text = (
            f"{best.label} has the {objective.best_word} {objective.title} "
            f"({best.mean:.6g}), but with one seed per configuration there is no seed spread "
            "to tell a real gap from luck: run several seeds (seeds = [0, 1, 2]) to know."
        )
        method = "One seed: configurations are ranked by their value, without a test."
        return Verdict("one seed", _with_unplaced(text, unplaced), method, objective, best,
                       unplaced=unplaced)  # fmt: skip
    tests = paired_tests(np.array([[s.row() for s in done]]), objective.lower_is_better)
    b = int(tests.best[0])  # done[0] by the ranking; the test's own choice is the one used
    best = done[b]
    comparisons = tuple(_comparison(s, tests, j) for j, s in enumerate(done) if j != b)
    kind = "identical" if all(c.place == "identical" for c in comparisons) else "placed"
    method = _method(objective, best, tests.pairs, len(done))
    verdict = Verdict(kind, "", method, objective, best, comparisons, unplaced, tests.pairs)
    return replace(verdict, text=_with_unplaced(sentence(verdict), unplaced))


def _comparison(s: Summary, tests: Tests, j: int) -> Comparison:
    def at(a: np.ndarray) -> float:
        return float(a[0, j])

    place = "behind" if tests.behind[0, j] else "tied"
    if tests.identical[0, j]:
        place = "identical"
    needed = None
    if place == "tied":
        needed = seeds_to_resolve(at(tests.gap), at(tests.sd), tests.pairs)
        # The test at these seeds did not resolve it: at least one seed more, whatever the
        # power calculation (an average over luck) says.
        needed = None if needed is None else max(needed, s.n + 1)
    return Comparison(
        s.label, place, at(tests.gap), at(tests.low), at(tests.high), at(tests.low_all),
        at(tests.high_all), at(tests.t), s.n - 1, at(tests.p), at(tests.p_holm), needed,
    )  # fmt: skip


def _method(objective: Objective, best: Summary, pairs: int, configs: int) -> str:
    seeds = best.n
    return (
        f"How: each configuration is compared with {best.label} seed by seed (the same "
        f"{seeds} seeds, so what a seed does to both cancels), by a paired t-test "
        f"(scipy.stats.ttest_rel, {seeds - 1} degrees of freedom), on the {objective.title}. "
        f"Intervals are {LEVEL:.0%} t-intervals of the gap. "
        + (
            f"With {configs} configurations there are {pairs} pairs; Holm's correction over "
            "all of them keeps the chance that any configuration is called behind by luck "
            f"alone at or below {ALPHA:.0%}, whichever configuration came out best."
            if pairs > 1
            else f"A gap is called real when the test's p-value is at most {ALPHA:.2g}: by "
            f"luck alone that happens less than {ALPHA:.0%} of the time."
        )
    )


def _gaps(comparisons: Sequence[Comparison]) -> str:
    return _join([f"{c.label} by {c.gap:.3g}" for c in comparisons])


def sentence(verdict: Verdict) -> str:
    """The verdict in one sentence."""
    best, objective = verdict.best, verdict.objective
    assert best is not None
    configs = len(verdict.comparisons) + 1
    head = (
        f"{best.label} has the {objective.best_word} {objective.title} "
        f"({best.mean:.6g}, mean of {best.n} seeds)"
    )
    if verdict.kind == "identical":
        who = "Both" if configs == 2 else f"All {configs}"
        return (
            f"{who} configurations gave the identical {objective.title} on every seed "
            f"(mean {best.mean:.6g}): they train the same thing, or differ in nothing it "
            "measures."
        )
    parts = []
    same = [c.label for c in verdict.comparisons if c.place == "identical"]
    tied = [c for c in verdict.comparisons if c.place == "tied"]
    if same:
        parts.append(f"{_join(same)} gave identical results on every seed")
    if tied:
        verb = "is" if len(tied) == 1 else "are"
        parts.append(f"{_join([_tie(c) for c in tied])} {verb} tied with it")
    if verdict.behind:
        parts.append(f"behind it: {_gaps(verdict.behind)}")
    if not verdict.behind:
        parts.append("no configuration is shown to be behind it")
    return f"{head}; " + "; ".join(parts) + "."


def _tie(c: Comparison) -> str:
    """A tied configuration with its gap and the seeds that would resolve it."""
    if c.seeds_needed is None:
        return c.label
    if c.seeds_needed > MAX_SEEDS:
        return f"{c.label} (by {c.gap:.3g}: a tie in practice, over {MAX_SEEDS} seeds to resolve)"
    return f"{c.label} (by {c.gap:.3g}; about {c.seeds_needed} seeds would resolve it)"


def _join(items: Sequence[str]) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


MISSING_WORDS = {
    "pruned": "pruned (stopped early as worse)",
    "failed": "failed (see its train.log; --retry-failed runs it again)",
    "running": "still running",
    "waiting": "waiting to run",
    "complete": "finished without recording it",
}


def unplaced_reason(s: Summary) -> str:
    """Why a configuration is not placed, in words: which seeds, in which state."""
    states: dict[str, list[int]] = {}
    for seed in s.seeds:
        if seed not in s.values:
            states.setdefault(s.missing.get(seed, "not started"), []).append(seed)
    parts = []
    for state, seeds in states.items():
        which = "seed" + ("s " if len(seeds) > 1 else " ") + _join([str(x) for x in seeds])
        parts.append(f"{which} {MISSING_WORDS.get(state, state)}")
    return f"{s.n} of {len(s.seeds)} seeds finished; " + "; ".join(parts)


def _with_unplaced(text: str, unplaced: Sequence[Summary]) -> str:
    if not unplaced:
        return text
    names = _join([f"{s.label} ({s.n} of {len(s.seeds)} seeds)" for s in unplaced])
    return text[:-1] + f"; not placed, with seeds unfinished, pruned or failed: {names}."
