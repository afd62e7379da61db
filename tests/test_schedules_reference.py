"""Every schedule against an independent library implementation, at every update.

References: ``torch.optim.lr_scheduler``, transformers' ``get_scheduler`` and diffusers'
``get_scheduler``. They are stepped the way a training loop steps them (``optimizer.step()``
then ``lr_scheduler.step()``), and ``get_last_lr()`` before update ``i`` is compared with our
``lr(i, ...)``. For torch schedulers whose ``.step()`` is recursive (CosineAnnealingLR,
PolynomialLR, StepLR, MultiStepLR, LinearLR) the closed form ``_get_closed_form_lr()`` is
compared too; both agree with ours to 1e-12 of the base LR (the recursion drifts ~1e-15 over
1000 updates, measured when these tests were written).
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from diffusers.optimization import get_scheduler as diffusers_get_scheduler
from torch.optim import lr_scheduler as torch_lr
from transformers.optimization import get_scheduler as transformers_get_scheduler

import schedulers

TOL = 1e-12  # of the base LR
BASES = (1e-4, 1e-6)
RUNS = [(0, 100), (10, 100), (95, 100), (3, 7), (0, 1), (0, 10), (2, 10), (100, 1000)]


def reference_lrs(make, base_lr: float, total: int, closed_form: bool = False) -> list[float]:
    """Step a torch LR scheduler like a training loop; the LR before each of ``total`` updates."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base_lr)
    lr_scheduler = make(optimizer)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about _get_closed_form_lr outside step()
        for _ in range(total):
            if closed_form:
                out.append(float(lr_scheduler._get_closed_form_lr()[0]))
            else:
                out.append(float(lr_scheduler.get_last_lr()[0]))
            optimizer.step()
            lr_scheduler.step()
    return out


def ours(schedule: schedulers.Schedule, base_lr: float, total: int) -> list[float]:
    return [schedule.lr(i, total, base_lr) for i in range(total)]


def assert_same(got: list[float], want: list[float], base_lr: float) -> None:
    assert len(got) == len(want)
    worst = max((abs(a - b), i) for i, (a, b) in enumerate(zip(got, want, strict=True)))
    assert worst[0] <= TOL * base_lr, f"update {worst[1]}: {got[worst[1]]!r} != {want[worst[1]]!r}"


def hf(name: str, warmup: int, total: int, **kwargs):
    return lambda opt: transformers_get_scheduler(
        name, opt, num_warmup_steps=warmup, num_training_steps=total,
        scheduler_specific_kwargs=kwargs,
    )  # fmt: skip


def dm(name: str, warmup: int, total: int, **kwargs):
    return lambda opt: diffusers_get_scheduler(
        name, opt, num_warmup_steps=warmup, num_training_steps=total, **kwargs
    )


# ---------------------------------------------------------------- transformers and diffusers


@pytest.mark.parametrize(("warmup", "total"), RUNS)
@pytest.mark.parametrize("name", ["linear", "cosine", "constant_with_warmup"])
def test_simple_schedules_match_transformers_and_diffusers(name, warmup, total):
    for base in BASES:
        schedule = schedulers.get(name)(warmup_steps=warmup)
        got = ours(schedule, base, total)
        assert_same(got, reference_lrs(hf(name, warmup, total), base, total), base)
        assert_same(got, reference_lrs(dm(name, warmup, total), base, total), base)


@pytest.mark.parametrize(("warmup", "total"), RUNS)
def test_constant_matches_transformers_constant(warmup, total):
    # transformers' "constant" has no warmup; ours with warmup 0 is the same curve.
    make = functools.partial(transformers_get_scheduler, "constant")
    assert_same(
        ours(schedulers.get("constant")(), 1e-4, total), reference_lrs(make, 1e-4, total), 1e-4
    )


@pytest.mark.parametrize(("warmup", "total"), RUNS)
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5])
def test_cosine_floor_matches_transformers_cosine_with_min_lr(ratio, warmup, total):
    for base in BASES:
        by_ratio = schedulers.get("cosine")(warmup_steps=warmup, min_lr_ratio=ratio)
        want = reference_lrs(
            hf("cosine_with_min_lr", warmup, total, min_lr_rate=ratio), base, total
        )
        assert_same(ours(by_ratio, base, total), want, base)
        if ratio:
            absolute = schedulers.get("cosine")(warmup_steps=warmup, min_lr=ratio * base)
            want = reference_lrs(
                hf("cosine_with_min_lr", warmup, total, min_lr=ratio * base), base, total
            )
            assert_same(ours(absolute, base, total), want, base)


@pytest.mark.parametrize(("warmup", "total"), [(0, 100), (10, 100), (7, 97), (0, 1000), (50, 1000)])
@pytest.mark.parametrize("cycles", [2, 3, 5, 7])
def test_hard_restarts_match_transformers_and_diffusers(cycles, warmup, total):
    for base in BASES:
        schedule = schedulers.get("cosine_with_restarts")(warmup_steps=warmup, num_cycles=cycles)
        got = ours(schedule, base, total)
        name = "cosine_with_restarts"
        assert_same(
            got, reference_lrs(hf(name, warmup, total, num_cycles=cycles), base, total), base
        )
        assert_same(
            got, reference_lrs(dm(name, warmup, total, num_cycles=cycles), base, total), base
        )


@pytest.mark.parametrize(("warmup", "total"), RUNS)
@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("lr_end_ratio", [0.0, 1e-3, 0.1])
def test_polynomial_matches_transformers_lr_end(lr_end_ratio, power, warmup, total):
    for base in BASES:
        lr_end = lr_end_ratio * base
        schedule = schedulers.get("polynomial")(warmup_steps=warmup, power=power, min_lr=lr_end)
        want = reference_lrs(
            hf("polynomial", warmup, total, lr_end=lr_end, power=power), base, total
        )
        assert_same(ours(schedule, base, total), want, base)


@pytest.mark.parametrize(("warmup", "total"), RUNS)
@pytest.mark.parametrize("power", [1.0, 3.0])
def test_polynomial_matches_diffusers_fixed_lr_end(power, warmup, total):
    # diffusers' get_scheduler cannot pass lr_end: it is always 1e-7.
    base = 1e-4
    schedule = schedulers.get("polynomial")(warmup_steps=warmup, power=power, min_lr=1e-7)
    want = reference_lrs(dm("polynomial", warmup, total, power=power), base, total)
    assert_same(ours(schedule, base, total), want, base)


@pytest.mark.parametrize(
    "rules", ["1:10,0.1:20,0.01:30,0.005", "0.5:3,2", "1", "2:1,1:2,0.5:50,0.25:99,0.1"]
)
@pytest.mark.parametrize("total", [1, 10, 100])
def test_piecewise_constant_matches_diffusers(rules, total):
    schedule = schedulers.get("piecewise_constant")(step_rules=rules)
    make = functools.partial(diffusers_get_scheduler, "piecewise_constant", step_rules=rules)
    assert_same(ours(schedule, 1e-4, total), reference_lrs(make, 1e-4, total), 1e-4)


@pytest.mark.parametrize(("warmup", "total"), RUNS)
@pytest.mark.parametrize("timescale", [0, 1, 50, 10_000])
def test_inverse_sqrt_matches_transformers(timescale, warmup, total):
    for base in BASES:
        schedule = schedulers.get("inverse_sqrt")(warmup_steps=warmup, timescale=timescale)
        kwargs = {"timescale": timescale} if timescale else {}  # transformers' default: the warmup
        make = functools.partial(
            transformers_get_scheduler,
            "inverse_sqrt",
            num_warmup_steps=warmup,
            scheduler_specific_kwargs=kwargs,
        )
        assert_same(ours(schedule, base, total), reference_lrs(make, base, total), base)


@pytest.mark.parametrize(("warmup", "total"), [(0, 100), (10, 100), (95, 100), (3, 7), (100, 1000)])
@pytest.mark.parametrize("decay_ratio", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("decay_shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize(("warmup_shape", "min_lr_ratio"), [("linear", 0.0), ("cosine", 0.1)])
def test_wsd_matches_transformers(
    warmup_shape, min_lr_ratio, decay_shape, decay_ratio, warmup, total
):
    for base in BASES:
        schedule = schedulers.get("warmup_stable_decay")(
            warmup_steps=warmup,
            warmup_shape=warmup_shape,
            # transformers warms up from min_lr_ratio, not from 0
            warmup_start_factor=min_lr_ratio,
            min_lr_ratio=min_lr_ratio,
            decay_ratio=decay_ratio,
            decay_shape=decay_shape,
        )
        decay_updates = schedule.decay_updates(total - warmup)
        make = hf(
            "warmup_stable_decay", warmup, total, num_decay_steps=decay_updates,
            decay_type=decay_shape, warmup_type=warmup_shape, min_lr_ratio=min_lr_ratio,
        )  # fmt: skip
        assert_same(ours(schedule, base, total), reference_lrs(make, base, total), base)


# ---------------------------------------------------------------- torch.optim.lr_scheduler


def both_forms(make, base: float, total: int) -> list[list[float]]:
    return [reference_lrs(make, base, total), reference_lrs(make, base, total, closed_form=True)]


@pytest.mark.parametrize("total", [1, 10, 100, 1000])
@pytest.mark.parametrize(("step_size", "gamma"), [(1, 0.9), (7, 0.5), (30, 0.1), (1000, 0.1)])
def test_step_matches_torch_step_lr(step_size, gamma, total):
    for base in BASES:
        schedule = schedulers.get("step")(step_size=step_size, gamma=gamma)
        make = functools.partial(torch_lr.StepLR, step_size=step_size, gamma=gamma)
        for want in both_forms(make, base, total):
            assert_same(ours(schedule, base, total), want, base)


@pytest.mark.parametrize("total", [1, 10, 100, 1000])
@pytest.mark.parametrize(
    ("milestones", "gamma"), [([3], 0.1), ([30, 80], 0.1), ([1, 2, 3, 50, 999], 0.7)]
)
def test_multistep_matches_torch_multistep_lr(milestones, gamma, total):
    for base in BASES:
        schedule = schedulers.get("multistep")(milestones=milestones, gamma=gamma)
        make = functools.partial(torch_lr.MultiStepLR, milestones=milestones, gamma=gamma)
        for want in both_forms(make, base, total):
            assert_same(ours(schedule, base, total), want, base)


@pytest.mark.parametrize("total", [1, 2, 10, 100, 1000])
@pytest.mark.parametrize("eta_ratio", [0.0, 0.01, 0.5])
def test_cosine_matches_torch_cosine_annealing(eta_ratio, total):
    for base in BASES:
        schedule = schedulers.get("cosine")(min_lr=eta_ratio * base)
        make = functools.partial(torch_lr.CosineAnnealingLR, T_max=total, eta_min=eta_ratio * base)
        for want in both_forms(make, base, total):
            assert_same(ours(schedule, base, total), want, base)


@pytest.mark.parametrize("total", [10, 100, 1000])
@pytest.mark.parametrize(("t0", "t_mult"), [(1, 1), (3, 1), (10, 1), (3, 2), (5, 3), (7, 2)])
@pytest.mark.parametrize("eta_ratio", [0.0, 0.1])
def test_restarts_match_torch_cosine_annealing_warm_restarts(eta_ratio, t0, t_mult, total):
    for base in BASES:
        if t0 >= total:
            pytest.skip("a first cycle as long as the run never restarts (refused by check())")
        schedule = schedulers.get("cosine_with_restarts")(
            first_cycle_steps=t0, cycle_mult=t_mult, min_lr=eta_ratio * base
        )
        assert schedule.check(total) == []
        make = functools.partial(
            torch_lr.CosineAnnealingWarmRestarts, T_0=t0, T_mult=t_mult, eta_min=eta_ratio * base
        )
        assert_same(ours(schedule, base, total), reference_lrs(make, base, total), base)


@pytest.mark.parametrize("total", [1, 10, 100, 1000])
@pytest.mark.parametrize("power", [1.0, 0.9, 2.0])
def test_polynomial_matches_torch_polynomial_lr(power, total):
    for base in BASES:
        schedule = schedulers.get("polynomial")(power=power)
        make = functools.partial(torch_lr.PolynomialLR, total_iters=total, power=power)
        for want in both_forms(make, base, total):
            assert_same(ours(schedule, base, total), want, base)


@pytest.mark.parametrize("total", [1, 10, 100, 1000])
@pytest.mark.parametrize("end_factor", [0.0, 0.1, 0.5])
def test_linear_matches_torch_linear_lr_decay(end_factor, total):
    for base in BASES:
        schedule = schedulers.get("linear")(min_lr_ratio=end_factor)
        make = functools.partial(
            torch_lr.LinearLR, start_factor=1.0, end_factor=end_factor, total_iters=total
        )
        for want in both_forms(make, base, total):
            assert_same(ours(schedule, base, total), want, base)


@pytest.mark.parametrize(("warmup", "total"), [(1, 10), (10, 100), (95, 100), (100, 1000)])
@pytest.mark.parametrize("start", [0.01, 0.1, 0.5])
def test_linear_warmup_matches_torch_linear_lr(start, warmup, total):
    # torch's LinearLR ramps start_factor → 1 over total_iters, then holds: our linear warmup.
    base = 1e-4
    schedule = schedulers.get("constant")(warmup_steps=warmup, warmup_start_factor=start)
    make = functools.partial(torch_lr.LinearLR, start_factor=start, total_iters=warmup)
    for want in both_forms(make, base, total):
        assert_same(ours(schedule, base, total), want, base)


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_polynomial_lr_end_is_the_transformers_key(power):
    """`lr_end` (the key the peers use) gives exactly transformers' curve, like `min_lr`."""
    base, total, warmup, lr_end = 1e-4, 50, 5, 1e-6
    by_end = schedulers.get("polynomial")(warmup_steps=warmup, power=power, lr_end=lr_end)
    by_min = schedulers.get("polynomial")(warmup_steps=warmup, power=power, min_lr=lr_end)
    assert ours(by_end, base, total) == ours(by_min, base, total)
    want = reference_lrs(hf("polynomial", warmup, total, lr_end=lr_end, power=power), base, total)
    assert_same(ours(by_end, base, total), want, base)


def test_sine_floor_is_lr_end_and_both_floors_are_refused():
    sine = schedulers.get("sine")(period=10, lr_end=1e-6)
    assert sine.lr(5, 100, 1e-4) == pytest.approx(1e-6, abs=1e-18)  # mid-wave: the floor
    both = schedulers.get("sine")(period=10, lr_end=1e-6, min_lr_ratio=0.1)
    assert any("lr_end" in p for p in both.problems())
    assert any("lr_end" in p for p in sine.check(100, base_lrs=[1e-7]))


@pytest.mark.parametrize("total", [2, 10, 100, 1000])
@pytest.mark.parametrize("start_factor", [1e-6, 1e-3, 0.5])
def test_exponential_ramp_matches_torch_exponential_lr(start_factor, total):
    # torch's ExponentialLR started at start_factor · base, with the gamma that reaches the
    # base LR at the last update: the LR range test's curve.
    for base in BASES:
        schedule = schedulers.get("exponential_ramp")(start_factor=start_factor)
        gamma = (1.0 / start_factor) ** (1.0 / (total - 1))
        make = functools.partial(torch_lr.ExponentialLR, gamma=gamma)
        for want in both_forms(make, start_factor * base, total):
            assert_same(ours(schedule, base, total), want, base)
        assert schedule.lr(total - 1, total, base) == base
        assert schedule.lr(0, total, base) == start_factor * base
