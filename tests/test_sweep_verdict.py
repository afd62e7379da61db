"""The significance verdict on constructed cases, against the rule written out by hand."""

from __future__ import annotations

import math
import statistics

import pytest

from trainer.sweep.verdict import Summary, decide, rank


def test_a_gap_smaller_than_the_seed_spread_is_a_tie():
    # Means 1.00 and 1.01, seed spread about 0.05: the intervals overlap.
    best = Summary("cosine", (0.95, 1.00, 1.05), 3)
    runner = Summary("linear", (0.96, 1.01, 1.06), 3)
    verdict = decide(rank([runner, best]))
    assert verdict.kind == "tie"
    assert verdict.best is best and verdict.runner_up is runner
    assert "tied within seed noise" in verdict.text


def test_a_gap_larger_than_the_seed_spread_is_real():
    best = Summary("cosine", (0.999, 1.000, 1.001), 3)
    runner = Summary("linear", (1.099, 1.100, 1.101), 3)
    verdict = decide(rank([runner, best]))
    assert verdict.kind == "real"
    assert verdict.text.startswith("cosine beats linear by more than the seed spread")


def test_the_rule_is_non_overlap_of_mean_plus_minus_two_sem():
    values = (1.0, 1.2, 1.4)
    s = Summary("a", values, 3)
    sem = statistics.stdev(values) / math.sqrt(3)  # an independent computation
    assert s.mean == pytest.approx(1.2)
    assert s.sem == pytest.approx(sem)
    assert s.interval() == pytest.approx((1.2 - 2 * sem, 1.2 + 2 * sem))
    # Just inside and just outside the boundary the verdict flips.
    gap = 2 * sem + 2 * sem
    for delta, kind in ((-1e-6, "tie"), (1e-6, "real")):
        other = Summary("b", tuple(v + gap + delta for v in values), 3)
        assert decide(rank([s, other])).kind == kind


def test_one_seed_names_no_winner_and_incomplete_configurations_do_not_compete():
    a, b = Summary("a", (1.0,), 1), Summary("b", (2.0,), 1)
    assert decide(rank([b, a])).kind == "one seed"
    pruned = Summary("pruned", (0.1,), 3)  # lowest mean, but only one of three seeds finished
    done = [Summary("x", (1.0, 1.1, 1.2), 3), Summary("y", (1.0, 1.1, 1.3), 3)]
    ranked = rank([pruned, *done])
    assert ranked[-1] is pruned
    assert decide(ranked).best.label == "x"
    assert decide([]).kind == "none"
