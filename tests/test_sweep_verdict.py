"""The sweep's verdict against scipy and statsmodels, and its error rate and power simulated.

The simulations run the verdict's own procedure (``verdict.paired_tests``, which ``decide``
calls for one sweep) on thousands of synthetic sweeps at once, the best configuration chosen
from the data as in a real sweep.
"""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from trainer.sweep.objectives import OBJECTIVES
from trainer.sweep.verdict import (
    ALPHA,
    LEVEL,
    POWER,
    Summary,
    decide,
    paired_tests,
    seeds_to_resolve,
    unplaced_reason,
)

FINAL = OBJECTIVES["final"]
SWEEPS = 2000
# The simulated rate of an event of probability ALPHA is within this of it 99.7 % of the time.
SAMPLING = 3 * math.sqrt(ALPHA * (1 - ALPHA) / SWEEPS)


def config(label: str, values, seeds=None) -> Summary:
    seeds = tuple(range(len(values))) if seeds is None else seeds
    return Summary(label, dict(zip(seeds, values, strict=True)), seeds)


# ---------------------------------------------------------------- against scipy


FIXED = {
    "a": (0.512, 0.498, 0.530, 0.505, 0.521),
    "b": (0.530, 0.519, 0.541, 0.530, 0.529),
    "c": (0.515, 0.502, 0.529, 0.509, 0.529),
    "d": (0.609, 0.575, 0.640, 0.598, 0.615),
}


def test_paired_intervals_and_p_values_equal_scipys_own():
    verdict = decide([config(k, v) for k, v in FIXED.items()], FINAL)
    assert verdict.best.label == "a"  # the lowest mean
    best = np.array(FIXED["a"])
    for c in verdict.comparisons:
        mine = np.array(FIXED[c.label])
        reference = stats.ttest_rel(mine, best)
        ci = reference.confidence_interval(LEVEL)
        assert c.t == pytest.approx(reference.statistic, rel=1e-12)
        assert c.p == pytest.approx(reference.pvalue, rel=1e-12)
        assert c.df == reference.df == 4
        assert (c.low, c.high) == pytest.approx((ci.low, ci.high), rel=1e-12)
        assert c.gap == pytest.approx(np.mean(mine - best), rel=1e-12)
        # The interval is the t-interval of the mean paired difference: scipy's one-sample
        # interval of the differences agrees.
        one = stats.ttest_1samp(mine - best, 0.0).confidence_interval(LEVEL)
        assert (c.low, c.high) == pytest.approx((one.low, one.high), rel=1e-9)
        every = stats.ttest_rel(mine, best).confidence_interval(1 - ALPHA / verdict.pairs)
        assert (c.low_all, c.high_all) == pytest.approx((every.low, every.high), rel=1e-12)


def test_holm_covers_every_pair_as_its_definition_says():
    """Holm over the 6 pairs of 4 configurations, checked against the step-down rule written
    out: sort the p-values, multiply the i-th smallest by (m - i + 1), keep them increasing."""
    labels = list(FIXED)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    raw = [stats.ttest_rel(FIXED[labels[i]], FIXED[labels[j]]).pvalue for i, j in pairs]
    order = np.argsort(raw)
    adjusted, running = np.empty(len(raw)), 0.0
    for rank, k in enumerate(order):
        running = max(running, min(1.0, (len(raw) - rank) * raw[k]))
        adjusted[k] = running
    assert multipletests(raw, ALPHA, method="holm")[1] == pytest.approx(adjusted)
    verdict = decide([config(k, v) for k, v in FIXED.items()], FINAL)
    assert verdict.pairs == 6
    for c in verdict.comparisons:
        pair = tuple(sorted((labels.index(c.label), 0)))
        assert c.p_holm == pytest.approx(adjusted[pairs.index(pair)], rel=1e-12)
        assert c.place == ("behind" if c.p_holm <= ALPHA else "tied")
    places = {c.label: c.place for c in verdict.comparisons}
    assert places == {"b": "behind", "c": "tied", "d": "behind"}
    assert verdict.text.startswith("a has the lowest final validation loss (0.5132, mean of 5")
    (tie,) = verdict.tied
    assert f"c (by {tie.gap:.3g}; about {tie.seeds_needed} seeds would resolve it) is tied" in (
        verdict.text
    )
    assert "behind it: b by" in verdict.text


def test_the_issues_example_is_resolved_by_pairing():
    """Every seed favours cosine, by 0.00038 ± 0.00010: paired, t = 6.9 on 2 degrees of
    freedom; unpaired, the mean ± 2·SEM intervals of the old rule overlap."""
    cosine = (1.16115, 1.16046, 1.16064)
    restarts = (1.16153, 1.16093, 1.16092)
    verdict = decide([config("cosine_with_restarts", restarts), config("cosine", cosine)], FINAL)
    (c,) = verdict.comparisons
    assert verdict.best.label == "cosine" and c.place == "behind"
    assert c.t == pytest.approx(6.86, abs=0.01) and c.df == 2
    assert c.gap == pytest.approx(0.00038, abs=1e-5)
    assert c.low > 0
    sem = [stats.sem(x) for x in (cosine, restarts)]
    assert np.mean(cosine) + 2 * sem[0] > np.mean(restarts) - 2 * sem[1]  # the old rule: a tie
    assert "behind it: cosine_with_restarts by 0.000377" in verdict.text
    assert "paired t-test" in verdict.method and "3 seeds" in verdict.method


def test_higher_is_better_picks_the_highest_score():
    scores = {"x": (0.30, 0.31, 0.29), "y": (0.20, 0.22, 0.21)}
    verdict = decide([config(k, v) for k, v in scores.items()], OBJECTIVES["clip_t"])
    (c,) = verdict.comparisons
    assert verdict.best.label == "x" and c.label == "y"
    assert c.gap == pytest.approx(0.09)  # worse = positive, in the score's units
    reference = stats.ttest_rel(np.negative(scores["y"]), np.negative(scores["x"]))
    assert c.p == pytest.approx(reference.pvalue)
    assert verdict.text.startswith("x has the highest CLIP-T")


# ---------------------------------------------------------------- degenerate cases


def test_identical_results_are_named_identical():
    same = (1.0, 1.1, 1.2)
    verdict = decide([config("a", same), config("b", same)], FINAL)
    assert verdict.kind == "identical"
    assert verdict.comparisons[0].place == "identical"
    assert verdict.text.startswith(
        "Both configurations gave the identical final validation loss on every seed (mean 1.1)"
    )
    mixed = decide([config("a", same), config("b", same), config("c", (1.5, 1.6, 1.7))], FINAL)
    assert [c.place for c in mixed.comparisons] == ["identical", "behind"]
    assert "b gave identical results on every seed" in mixed.text


def test_one_seed_ranks_without_a_test():
    verdict = decide([config("a", (1.0,)), config("b", (0.9,))], FINAL)
    assert verdict.kind == "one seed" and verdict.best.label == "b"
    assert "no seed spread" in verdict.text and verdict.comparisons == ()


def test_unfinished_and_pruned_seeds_are_named_and_not_placed():
    seeds = (0, 1, 2)
    done = [config("x", (1.0, 1.1, 1.2), seeds), config("y", (1.0, 1.1, 1.3), seeds)]
    pruned = Summary("pruned", {0: 0.1}, seeds, {1: "pruned", 2: "waiting"})
    verdict = decide([pruned, *done], FINAL)
    assert verdict.best.label == "x"  # the pruned configuration's low value does not count
    assert verdict.unplaced == (pruned,)
    assert "not placed, with seeds unfinished, pruned or failed: pruned (1 of 3 seeds)" in (
        verdict.text
    )
    assert unplaced_reason(pruned) == (
        "1 of 3 seeds finished; seed 1 pruned (stopped early as worse); seed 2 waiting to run"
    )
    assert decide([pruned], FINAL).kind == "none"
    alone = decide([done[0], pruned], FINAL)
    assert alone.kind == "alone" and "nothing to compare" in alone.text


def test_seeds_to_resolve_a_tie_reach_the_power_by_scipys_noncentral_t():
    """The seeds the verdict names for a tie detect the observed gap at the observed spread
    with probability POWER at the strictest Holm step, and one seed fewer does not; power
    from scipy's noncentral t, independently of statsmodels' solver."""
    gap, sd, pairs = 0.004, 0.006, 6
    n = seeds_to_resolve(gap, sd, pairs)

    def power(seeds: int) -> float:
        crit = stats.t.ppf(1 - ALPHA / pairs / 2, seeds - 1)
        nc = gap / sd * math.sqrt(seeds)
        return stats.nct.sf(crit, seeds - 1, nc) + stats.nct.cdf(-crit, seeds - 1, nc)

    assert power(n) >= POWER > power(n - 1)
    tie = decide([config("a", (1.000, 1.010, 1.004)), config("b", (1.006, 1.008, 1.012))], FINAL)
    (c,) = tie.comparisons
    assert c.place == "tied" and c.seeds_needed == seeds_to_resolve(c.gap, np.std(
        np.subtract((1.006, 1.008, 1.012), (1.000, 1.010, 1.004)), ddof=1), 1)  # fmt: skip
    assert seeds_to_resolve(0.0, 0.1, 3) is None


# ---------------------------------------------------------------- simulation


def synthetic(rng, configs: int, seeds: int, gaps=None) -> np.ndarray:
    """SWEEPS sweeps: a shared per-seed effect (what pairing cancels), three times the
    configuration-and-seed noise, plus each configuration's true gap."""
    shared = 3.0 * rng.standard_normal((SWEEPS, 1, seeds))
    own = rng.standard_normal((SWEEPS, configs, seeds))
    true = np.zeros(configs) if gaps is None else np.asarray(gaps, dtype=float)
    return 1.0 + shared + own + true[None, :, None]


@pytest.mark.parametrize(("configs", "seeds"), [(2, 3), (2, 5), (4, 3), (8, 5)])
def test_aa_sweeps_call_a_difference_real_at_no_more_than_the_level(configs, seeds):
    """All configurations drawn from one distribution: the share of sweeps in which the
    verdict calls any configuration behind the data-chosen best is at most 5 % (within
    sampling error). With two configurations Holm does nothing and the test is exact."""
    rng = np.random.default_rng(1000 * configs + seeds)
    tests = paired_tests(synthetic(rng, configs, seeds))
    rate = tests.behind.any(axis=1).mean()
    assert rate <= ALPHA + SAMPLING, rate
    if configs == 2:
        assert abs(rate - ALPHA) <= SAMPLING, rate


def test_holm_over_only_the_comparisons_with_the_best_would_exceed_the_level():
    """Why the correction counts every pair: the best is the lowest of K means, so its K - 1
    comparisons are the most extreme pairs; Holm over those alone (the same p-values) calls
    an A/A difference real well above 5 %."""
    rng = np.random.default_rng(7)
    tests = paired_tests(synthetic(rng, 8, 5))
    best_only = []
    gc.freeze()  # statsmodels' Holm calls gc.collect() every time: let it skip what exists
    try:
        for s in range(SWEEPS):
            others = [j for j in range(8) if j != tests.best[s]]
            best_only.append(multipletests(tests.p[s, others], ALPHA, method="holm")[0].any())
    finally:
        gc.unfreeze()
    assert np.mean(best_only) > ALPHA + SAMPLING
    assert tests.behind.any(axis=1).mean() <= ALPHA + SAMPLING


def test_power_at_one_paired_sd_and_five_seeds_matches_the_noncentral_t():
    """Two configurations, a true gap of one standard deviation of the paired difference,
    five seeds: the verdict calls the worse one behind as often as the paired t-test's
    theoretical power says (scipy's noncentral t)."""
    rng = np.random.default_rng(5)
    paired_sd = math.sqrt(2.0)  # each configuration's own noise has sd 1
    tests = paired_tests(synthetic(rng, 2, 5, gaps=[0.0, paired_sd]))
    right = ((tests.best == 0) & tests.behind[:, 1]).mean()
    wrong = ((tests.best == 1) & tests.behind[:, 0]).mean()
    crit = stats.t.ppf(1 - ALPHA / 2, 4)
    nc = 1.0 * math.sqrt(5)  # the gap in paired sds, times sqrt(n)
    expected = stats.nct.sf(crit, 4, nc)
    assert 0.3 < expected < 0.6  # a power where sampling error is largest: a fair check
    assert abs(right - expected) <= 3 * math.sqrt(expected * (1 - expected) / SWEEPS)
    assert wrong <= 3 * math.sqrt(stats.nct.cdf(-crit, 4, nc) / SWEEPS) + 0.001
