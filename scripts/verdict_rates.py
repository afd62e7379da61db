"""Simulate the sweep verdict's false-positive rate and power (the numbers in docs/sweeps.md).

A/A: every configuration drawn from one distribution (a shared per-seed effect plus each
run's own noise); the rate is the share of sweeps in which the verdict calls any configuration
behind the best it picked from the data. "Holm vs best only" applies Holm to just the K - 1
comparisons with that best, to show why the verdict counts every pair. Power: two
configurations a true gap of one paired standard deviation apart, against the paired t-test's
theoretical power from scipy's noncentral t.

Usage:
    python scripts/verdict_rates.py [--sweeps 20000] [--seed 0]
"""

from __future__ import annotations

import argparse
import gc
import math

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests

from trainer.sweep.verdict import ALPHA, paired_tests


def draw(rng, sweeps: int, configs: int, seeds: int, gap: float = 0.0) -> np.ndarray:
    shared = 3.0 * rng.standard_normal((sweeps, 1, seeds))
    values = 1.0 + shared + rng.standard_normal((sweeps, configs, seeds))
    values[:, -1] += gap
    return values


def best_only_rate(tests, configs: int) -> float:
    gc.freeze()  # statsmodels' Holm calls gc.collect() every time
    try:
        hits = [
            multipletests(tests.p[s, [j for j in range(configs) if j != tests.best[s]]],
                          ALPHA, method="holm")[0].any()
            for s in range(len(tests.best))
        ]  # fmt: skip
    finally:
        gc.unfreeze()
    return float(np.mean(hits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    se = math.sqrt(ALPHA * (1 - ALPHA) / args.sweeps)
    print(f"A/A, {args.sweeps} sweeps each (sampling error ±{se:.4f} at 5 %)")
    print("| configurations | seeds | verdict (Holm, every pair) | Holm vs best only |")
    print("|---|---|---|---|")
    for configs, seeds in ((2, 3), (2, 5), (3, 3), (4, 3), (4, 5), (8, 3), (8, 5)):
        tests = paired_tests(draw(rng, args.sweeps, configs, seeds))
        rate = tests.behind.any(axis=1).mean()
        print(f"| {configs} | {seeds} | {rate:.4f} | {best_only_rate(tests, configs):.4f} |")
    tests = paired_tests(draw(rng, args.sweeps, 2, 5, gap=math.sqrt(2)))
    right = ((tests.best == 0) & tests.behind[:, 1]).mean()
    crit = stats.t.ppf(1 - ALPHA / 2, 4)
    print(f"power, gap of one paired sd, 5 seeds: simulated {right:.4f}, "
          f"noncentral t {stats.nct.sf(crit, 4, math.sqrt(5)):.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
