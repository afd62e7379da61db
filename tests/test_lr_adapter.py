"""The torch LRScheduler adapter and the saved JSON state: exact LRs, exact resume."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import schedulers
from schedulers import ScheduleConfigError, ScheduleLR, schedule_from_state, schedule_state

BASE_LRS = [1e-4, 3e-5]
TOTAL = 40
SCHEDULES = [
    {"name": "cosine", "warmup_steps": 5, "min_lr_ratio": 0.1},
    {"name": "linear", "warmup_steps": 0.1, "warmup_shape": "cosine"},
    {
        "name": "cosine_with_restarts",
        "warmup_steps": 4,
        "num_cycles": 3,
        "restart": "soft",
        "restart_warmup_steps": 3,
        "cycle_decay": 0.8,
    },
    {"name": "sine", "period": 12, "min_lr": 1e-6},
    {"name": "multistep", "milestones": [10, 20], "gamma": 0.5},
    {"name": "piecewise_constant", "warmup_steps": 2, "step_rules": "1:10,0.3:25,0.1"},
    {"name": "inverse_sqrt", "warmup_steps": 6},
    {"name": "warmup_stable_decay", "warmup_steps": 3, "decay_ratio": 0.3},
]


def make_optimizer(base_lrs=BASE_LRS) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in base_lrs]
    return torch.optim.AdamW(groups)


def run(lr_scheduler: ScheduleLR, updates: int) -> list[list[float]]:
    """LRs the optimizer holds before each of ``updates`` updates, stepping like a loop."""
    optimizer = lr_scheduler.optimizer
    seen = []
    for _ in range(updates):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        lr_scheduler.step()
    return seen


@pytest.mark.parametrize("table", SCHEDULES, ids=[t["name"] for t in SCHEDULES])
def test_adapter_lrs_are_the_schedule_lrs_exactly(table):
    schedule = schedulers.from_table(table)
    lr_scheduler = ScheduleLR(make_optimizer(), schedule, TOTAL)
    seen = run(lr_scheduler, TOTAL)
    assert seen == [schedule.lrs(i, TOTAL, BASE_LRS) for i in range(TOTAL)]
    assert lr_scheduler.last_epoch == TOTAL
    assert lr_scheduler.get_last_lr() == schedule.lrs(TOTAL, TOTAL, BASE_LRS)


@pytest.mark.parametrize("table", SCHEDULES, ids=[t["name"] for t in SCHEDULES])
def test_resume_from_any_step_gives_the_identical_lr_sequence(table):
    schedule = schedulers.from_table(table)
    reference = run(ScheduleLR(make_optimizer(), schedule, TOTAL), TOTAL)
    for stop in range(TOTAL + 1):
        first = ScheduleLR(make_optimizer(), schedule, TOTAL)
        before = run(first, stop)
        state = json.loads(json.dumps(first.state_dict()))
        # A fresh process: a new optimizer (its LR state NOT restored) and a new adapter.
        resumed = ScheduleLR(make_optimizer(), schedulers.get("constant")(), TOTAL)
        resumed.load_state_dict(state)
        assert resumed.schedule == schedule and resumed.last_epoch == stop
        after = run(resumed, TOTAL - stop)
        assert before + after == reference  # exact equality, not approx


def test_state_dict_is_json_and_has_the_documented_shape():
    schedule = schedulers.from_table(SCHEDULES[0])
    lr_scheduler = ScheduleLR(make_optimizer(), schedule, TOTAL)
    run(lr_scheduler, 7)
    state = lr_scheduler.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert state == {
        "format": 1,
        "name": "cosine",
        "params": {
            "warmup_steps": 5,
            "warmup_shape": "linear",
            "warmup_start_factor": 0.0,
            "min_lr_ratio": 0.1,
            "min_lr": 0.0,
        },
        "total_steps": TOTAL,
        "step": 7,
        "base_lrs": BASE_LRS,
        "last_lrs": schedule.lrs(7, TOTAL, BASE_LRS),
    }
    assert state == schedule_state(schedule, TOTAL, 7, BASE_LRS, schedule.lrs(7, TOTAL, BASE_LRS))


def test_state_round_trips_every_builtin_through_json():
    from plot_schedules import EXAMPLES

    for _, table in EXAMPLES:
        schedule = schedulers.from_table(table)
        state = json.loads(json.dumps(schedule_state(schedule, 1000, 10, [1e-4], [1e-4])))
        assert schedule_from_state(state) == schedule


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"format": 2},
            "lr_scheduler state: format 2 is not 1, the only format this version reads",
        ),
        (
            {"name": "cosin"},
            "lr_scheduler.name: unknown LR schedule 'cosin'; did you mean 'cosine'?",
        ),
        ({"params": {"warmup_steps": 5, "bogus": 1}}, "lr_scheduler.bogus: unknown key"),
        ({"params": [1]}, "lr_scheduler state: params must be a dict"),
    ],
)
def test_bad_states_are_refused_clearly(change, message):
    state = schedule_state(schedulers.get("cosine")(), 10, 0, [1.0], [1.0])
    with pytest.raises(ScheduleConfigError) as err:
        schedule_from_state({**state, **change})
    assert err.value.problems[0].startswith(message)


def test_missing_keys_are_named():
    with pytest.raises(ScheduleConfigError) as err:
        schedule_from_state({"format": 1, "name": "cosine"})
    assert err.value.problems == [
        "lr_scheduler state: missing params, total_steps, step, base_lrs, last_lrs"
    ]


def test_load_state_with_other_param_groups_is_refused():
    state = ScheduleLR(make_optimizer(), schedulers.get("cosine")(), 10).state_dict()
    target = ScheduleLR(make_optimizer([1e-4]), schedulers.get("cosine")(), 10)
    with pytest.raises(ValueError, match="2 base LRs but the optimizer has 1 param groups"):
        target.load_state_dict(state)


def test_schedule_that_does_not_fit_the_run_is_refused_at_construction():
    with pytest.raises(ScheduleConfigError) as err:
        ScheduleLR(make_optimizer(), schedulers.get("cosine")(warmup_steps=50), 50)
    assert err.value.problems[0].startswith("lr_scheduler.warmup_steps: 50 warmup updates")


def test_step_with_an_epoch_jumps_to_the_closed_form():
    schedule = schedulers.get("cosine")(warmup_steps=3)
    lr_scheduler = ScheduleLR(make_optimizer(), schedule, TOTAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates step(epoch)
        lr_scheduler.step(17)
    assert lr_scheduler.get_last_lr() == schedule.lrs(17, TOTAL, BASE_LRS)
    assert [g["lr"] for g in lr_scheduler.optimizer.param_groups] == schedule.lrs(
        17, TOTAL, BASE_LRS
    )


def test_last_epoch_resumes_like_torch():
    # torch convention: last_epoch=k means update k is done; the next LR is for k + 1.
    schedule = schedulers.get("linear")()
    optimizer = make_optimizer()
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    lr_scheduler = ScheduleLR(optimizer, schedule, TOTAL, last_epoch=9)
    assert lr_scheduler.get_last_lr() == schedule.lrs(10, TOTAL, BASE_LRS)


def test_plugin_schedule_by_dotted_path_survives_a_state_round_trip(tmp_path, monkeypatch):
    (tmp_path / "adapter_plug.py").write_text(
        "from dataclasses import dataclass\n"
        "from schedulers import Schedule\n\n\n"
        "@dataclass(frozen=True)\n"
        "class Flat(Schedule):\n"
        '    """Half the base LR."""\n\n'
        "    def after_warmup(self, t, n, base_lr):\n"
        "        return base_lr / 2\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    schedule = schedulers.from_table({"name": "adapter_plug:Flat", "warmup_steps": 2})
    lr_scheduler = ScheduleLR(make_optimizer(), schedule, 10)
    run(lr_scheduler, 3)
    state = json.loads(json.dumps(lr_scheduler.state_dict()))
    assert state["name"] == "adapter_plug:Flat"
    resumed = ScheduleLR(make_optimizer(), schedulers.get("constant")(), 10)
    resumed.load_state_dict(state)
    assert resumed.get_last_lr() == [5e-5, 1.5e-5]
