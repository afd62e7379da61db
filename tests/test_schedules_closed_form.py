"""Schedules without a library reference, against closed forms written out here, plus the
warmup, floor and edge-case rules every schedule shares (docs/schedules.md)."""

from __future__ import annotations

import math

import pytest
from plot_schedules import EXAMPLES

import schedulers
from schedulers.base import DecaySchedule

BASE = 1e-4
TOL = 1e-12


def curve(schedule, total: int, base: float = BASE) -> list[float]:
    return [schedule.lr(i, total, base) for i in range(total)]


def assert_close(got: list[float], want: list[float], base: float = BASE) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert abs(a - b) <= TOL * base, f"update {i}: {a!r} != {b!r}"


def with_warmup(decayed, warmup: int, total: int, base: float, start: float = 0.0):
    """Closed form of the shared linear warmup in front of a post-warmup curve ``decayed(t, n)``."""
    n = total - warmup
    peak = decayed(0, n)
    return [
        (start + (1 - start) * i / warmup) * peak if i < warmup else decayed(i - warmup, n)
        for i in range(total)
    ]


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize(("warmup", "total"), [(0, 100), (10, 100), (0, 7), (50, 1000)])
@pytest.mark.parametrize("period", [0, 2, 10, 33, 300])
@pytest.mark.parametrize("floor", [{}, {"min_lr_ratio": 0.1}, {"min_lr": 3e-6}])
def test_sine_closed_form(floor, period, warmup, total):
    schedule = schedulers.get("sine")(warmup_steps=warmup, period=period, **floor)
    low = floor.get("min_lr", floor.get("min_lr_ratio", 0.0) * BASE)

    def sine(t, n):
        p = period or n
        return low + (BASE - low) * (1 + math.cos(2 * math.pi * t / p)) / 2

    assert_close(curve(schedule, total), with_warmup(sine, warmup, total, BASE))


def test_sine_period_is_one_full_wave_and_floor_is_honoured():
    # SimpleTuner's sine took twice `period` for a wave and bottomed out at half the base LR.
    schedule = schedulers.get("sine")(period=40, min_lr=1e-6)
    lrs = curve(schedule, 200)
    inner = range(1, 199)
    assert [i for i in inner if lrs[i - 1] < lrs[i] > lrs[i + 1]] == [40, 80, 120, 160]
    assert [i for i in inner if lrs[i - 1] > lrs[i] < lrs[i + 1]] == [20, 60, 100, 140, 180]
    assert [lrs[i] for i in (0, 40, 80)] == [BASE] * 3
    assert min(lrs) == pytest.approx(1e-6, rel=1e-12) and lrs[20] == min(lrs)


@pytest.mark.parametrize(("warmup", "total"), [(0, 100), (10, 100), (0, 3), (100, 1000)])
@pytest.mark.parametrize("beta", [1.0, 0.9, 0.5, 0.0])
@pytest.mark.parametrize("ratio", [0.0, 0.05])
def test_rex_closed_form(ratio, beta, warmup, total):
    schedule = schedulers.get("rex")(warmup_steps=warmup, beta=beta, min_lr_ratio=ratio)
    low = ratio * BASE

    def rex(t, n):
        z = t / n
        # arXiv:2107.04197: (1 - z) / (1/2 + (1 - beta z)/2), written as 2(1 - z) / (2 - beta z)
        return low + (BASE - low) * 2 * (1 - z) / (2 - beta * z)

    assert_close(curve(schedule, total), with_warmup(rex, warmup, total, BASE))


def test_rex_beta_zero_is_linear():
    rex = schedulers.get("rex")(warmup_steps=5, beta=0.0)
    assert_close(curve(rex, 50), curve(schedulers.get("linear")(warmup_steps=5), 50))


def sgdr_reference(t, n, lengths, decay, soft_ramp, low):
    """Independent SGDR: walk an explicit list of cycle lengths."""
    start = 0
    for i, length in enumerate(lengths):
        if t < start + length:
            u = t - start
            peak = low + (BASE - low) * decay**i
            if soft_ramp and i > 0:
                if u < soft_ramp:
                    return low + (peak - low) * u / soft_ramp
                v = (u - soft_ramp) / (length - soft_ramp)
                return low + (peak - low) * (1 + math.cos(math.pi * v)) / 2
            return low + (peak - low) * (1 + math.cos(math.pi * u / length)) / 2
        start += length
    return low


@pytest.mark.parametrize(("warmup", "total"), [(0, 100), (10, 130), (100, 1000)])
@pytest.mark.parametrize(
    "cycles",
    [
        {"num_cycles": 2},
        {"num_cycles": 4},
        {"num_cycles": 3, "cycle_mult": 2.0},
        {"num_cycles": 3, "cycle_mult": 1.5},
        {"first_cycle_steps": 9},
        {"first_cycle_steps": 10, "cycle_mult": 2.0},
        {"first_cycle_steps": 7, "cycle_mult": 1.5},
    ],
)
@pytest.mark.parametrize(
    "shape",
    [
        {},
        {"cycle_decay": 0.5},
        {"restart": "soft", "restart_warmup_steps": 3},
        {"restart": "soft", "restart_warmup_steps": 5, "cycle_decay": 0.8, "min_lr_ratio": 0.1},
    ],
)
def test_restarts_closed_form(shape, cycles, warmup, total):
    schedule = schedulers.get("cosine_with_restarts")(warmup_steps=warmup, **cycles, **shape)
    assert schedule.check(total) == []
    n = total - warmup
    mult = cycles.get("cycle_mult", 1.0)
    if "num_cycles" in cycles:
        k = cycles["num_cycles"]
        first = n / k if mult == 1 else n * (mult - 1) / (mult**k - 1)
    else:
        first = cycles["first_cycle_steps"]
    lengths = [first * mult**i for i in range(200)]

    def sgdr(t, n):
        return sgdr_reference(
            t, n, lengths, shape.get("cycle_decay", 1.0), shape.get("restart_warmup_steps", 0),
            shape.get("min_lr_ratio", 0.0) * BASE,
        )  # fmt: skip

    assert_close(curve(schedule, total), with_warmup(sgdr, warmup, total, BASE))


@pytest.mark.parametrize("cycles", [2, 3, 5, 10])
@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_restarts_restart_and_ignore_gradient_accumulation(cycles, accumulation):
    # diffusers #1232 never restarted; SimpleTuner #96 halved the restarts under accumulation.
    # A loop that asks for the LR once per optimizer update sees every restart, whatever the
    # number of micro-batches per update.
    updates, warmup = 200, 20
    schedule = schedulers.get("cosine_with_restarts")(warmup_steps=warmup, num_cycles=cycles)
    seen, update = [], 0
    for micro in range(updates * accumulation):
        if (micro + 1) % accumulation == 0:  # gradients synced: one optimizer update
            seen.append(schedule.lr(update, updates, BASE))
            update += 1
    rises = [i for i in range(warmup + 1, updates) if seen[i] > seen[i - 1]]
    assert len(rises) == cycles - 1
    assert seen == curve(schedule, updates)


@pytest.mark.parametrize("shape", ["linear", "cosine", "exponential"])
@pytest.mark.parametrize("start", [0.0, 0.01, 0.3])
@pytest.mark.parametrize(("warmup", "total"), [(1, 10), (10, 100), (95, 100), (400, 1000)])
def test_warmup_shapes_closed_form(shape, start, warmup, total):
    if shape == "exponential" and start == 0:
        pytest.skip("refused by problems(): an exponential cannot start at 0")
    schedule = schedulers.get("cosine")(
        warmup_steps=warmup, warmup_shape=shape, warmup_start_factor=start
    )
    assert schedule.problems() == []
    n = total - warmup
    for i in range(total):
        if i < warmup:
            p = i / warmup
            factor = {
                "linear": start + (1 - start) * p,
                "cosine": start + (1 - start) * (1 - math.cos(math.pi * p)) / 2,
                "exponential": start * (1 / start) ** p if start else 0.0,
            }[shape]
            want = factor * BASE
        else:
            want = BASE * (1 + math.cos(math.pi * (i - warmup) / n)) / 2
        assert abs(schedule.lr(i, total, BASE) - want) <= TOL * BASE, i
    # step 0 is start * base; step W is the first update at the peak, exactly
    assert schedule.lr(0, total, BASE) == pytest.approx(start * BASE, rel=1e-15, abs=0)
    assert schedule.lr(warmup, total, BASE) == BASE


@pytest.mark.parametrize(
    ("ratio", "total", "updates"),
    [(0.1, 1000, 100), (0.05, 30, 2), (0.07, 100, 7), (0.5, 3, 2), (0.25, 2, 1), (0.01, 10, 0)],
)
def test_warmup_ratio_resolves_to_nearest_update_halves_up(ratio, total, updates):
    by_ratio = schedulers.get("linear")(warmup_steps=ratio)
    assert by_ratio.warmup_updates(total) == updates
    by_count = schedulers.get("linear")(warmup_steps=updates)
    assert curve(by_ratio, total) == curve(by_count, total)


@pytest.mark.parametrize(("warmup", "total"), [(0, 100), (10, 100), (0, 1000), (30, 1000)])
@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("decay_ratio", [0.1, 0.25, 1.0])
def test_wsd_closed_form(decay_ratio, shape, warmup, total):
    schedule = schedulers.get("warmup_stable_decay")(
        warmup_steps=warmup, decay_ratio=decay_ratio, decay_shape=shape, min_lr_ratio=0.05
    )
    low = 0.05 * BASE

    def wsd(t, n):
        d = math.floor(decay_ratio * n + 0.5)
        if t < n - d:
            return BASE
        p = (t - (n - d)) / d
        f = {"linear": 1 - p, "cosine": (1 + math.cos(math.pi * p)) / 2, "1-sqrt": 1 - p**0.5}
        return low + (BASE - low) * f[shape]

    assert_close(curve(schedule, total), with_warmup(wsd, warmup, total, BASE))


def test_counts_run_on_the_post_warmup_clock():
    # Milestones, step sizes and step rules count updates after warmup (docs/schedules.md).
    w = 5
    step = schedulers.get("step")(warmup_steps=w, step_size=10, gamma=0.5)
    assert step.lr(w + 9, 100, BASE) == BASE and step.lr(w + 10, 100, BASE) == BASE * 0.5
    multi = schedulers.get("multistep")(warmup_steps=w, milestones=[3, 8], gamma=0.1)
    assert [multi.lr(w + t, 100, 1.0) for t in (2, 3, 7, 8)] == [1.0, 0.1, 0.1, 0.1**2]
    rules = schedulers.get("piecewise_constant")(warmup_steps=w, step_rules="1:4,0.5")
    assert [rules.lr(w + t, 100, 1.0) for t in (0, 3, 4)] == [1.0, 1.0, 0.5]


# ---------------------------------------------------------------- every schedule


def example_schedules() -> list[schedulers.Schedule]:
    return [schedulers.from_table(table) for _, table in EXAMPLES]


def test_examples_cover_every_builtin_and_fit_the_plotted_run():
    schedules = example_schedules()
    assert {s.name for s in schedules} == set(schedulers.available())
    assert all(s.check(1000, base_lrs=[1e-4]) == [] for s in schedules)


@pytest.mark.parametrize(("title", "table"), EXAMPLES, ids=[t for t, _ in EXAMPLES])
@pytest.mark.parametrize(("total", "base"), [(10, 1e-6), (1, 1e-4), (1000, 1e-4), (3, 1.0)])
def test_every_schedule_is_finite_bounded_and_pure(title, table, total, base):
    # Some of these runs are refused by check() (warmup as long as the run, more cycles than
    # updates); the curve must still be finite, bounded and pure, never a crash.
    schedule = schedulers.from_table(table)
    lrs = curve(schedule, total, base)
    assert all(math.isfinite(x) and 0 <= x <= base * (1 + 1e-15) for x in lrs)
    assert lrs == curve(schedule, total, base)  # pure: same answer every time
    # Past the last update the LR holds at its value for step = total_steps.
    assert schedule.lr(total + 7, total, base) == schedule.lr(total, total, base)


@pytest.mark.parametrize("name", sorted(schedulers.available()))
def test_one_update_run_uses_the_peak(name):
    table = dict(next(t for _, t in EXAMPLES if t["name"] == name), warmup_steps=0)
    if name == "cosine_with_restarts":
        table = {"name": name, "first_cycle_steps": 1}
    schedule = schedulers.from_table(table)
    assert schedule.lr(0, 1, 1e-4) == 1e-4


NOT_DECAYING = ("constant", "constant_with_warmup", "exponential_ramp", "piecewise_constant")


@pytest.mark.parametrize("name", [n for n in schedulers.available() if n not in NOT_DECAYING])
def test_every_decay_has_a_floor(name):
    assert issubclass(schedulers.get(name), DecaySchedule)


def test_extreme_warmup_95_of_100():
    schedule = schedulers.get("cosine")(warmup_steps=95)
    assert schedule.check(100) == []
    lrs = curve(schedule, 100)
    assert lrs[0] == 0.0 and lrs[94] == 94 / 95 * BASE and lrs[95] == BASE
    assert lrs[99] == BASE * (1 + math.cos(math.pi * 4 / 5)) / 2


def test_absolute_floor_is_shared_by_param_groups():
    schedule = schedulers.get("linear")(min_lr=1e-6)
    assert schedule.lrs(100, 100, [1e-4, 5e-5]) == [1e-6, 1e-6]
    ratio = schedulers.get("linear")(min_lr_ratio=0.1)
    assert ratio.lrs(100, 100, [1e-4, 5e-5]) == pytest.approx([1e-5, 5e-6], rel=1e-15)


def test_bad_arguments_raise():
    schedule = schedulers.get("cosine")()
    with pytest.raises(ValueError, match="step must be >= 0"):
        schedule.lr(-1, 10, BASE)
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        schedule.lr(0, 0, BASE)


def test_schedules_are_frozen_and_hashable():
    schedule = schedulers.get("multistep")(milestones=[1, 2])
    assert schedule.milestones == (1, 2)  # a list given in Python becomes a tuple
    with pytest.raises(AttributeError):
        schedule.gamma = 0.5  # type: ignore[misc]
    assert hash(schedule) == hash(schedulers.get("multistep")(milestones=(1, 2)))
