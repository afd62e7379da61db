"""Loading schedules from TOML tables: every problem reported at once, each naming its key;
run-length checks; help text."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import tomllib
from plot_schedules import EXAMPLES

import schedulers
from schedulers import ScheduleConfigError, from_table


def problems_of(table: dict, where: str = "lr_scheduler") -> list[str]:
    with pytest.raises(ScheduleConfigError) as err:
        from_table(table, where=where)
    return err.value.problems


def test_every_problem_is_reported_at_once_with_its_key_and_a_hint():
    table = tomllib.loads(
        """
        name = "cosine"
        warmup_step = 10             # typo
        warmup_shape = "cosin"       # typo in a choice
        warmup_start_factor = true   # bool is not a number
        min_lr = 1e-6
        min_lr_ratio = 0.1           # both floors
        lr_end = 1e-7                # a peer's name for min_lr
        num_cycles = 2               # a key of another schedule
        num_training_steps = 100     # the run length is not a schedule key
        """
    )
    found = problems_of(table)
    assert len(found) == 7, found
    expect = [
        "lr_scheduler.warmup_step: unknown key for the 'cosine' schedule; did you mean "
        "lr_scheduler.warmup_steps?",
        'lr_scheduler.warmup_shape: "cosin" is not one of "linear" | "cosine" | "exponential"; '
        'did you mean "cosine"?',
        "lr_scheduler.warmup_start_factor: expected float, got bool True",
        "lr_scheduler.lr_end: unknown key for the 'cosine' schedule; sdlora calls it "
        "lr_scheduler.min_lr",
        "lr_scheduler.num_cycles: unknown key for the 'cosine' schedule; it is a key of: "
        "cosine_with_restarts. To switch, replace the whole table, e.g. "
        "--set 'lr_scheduler={name = \"cosine\"}'",
        "lr_scheduler.num_training_steps: unknown key for the 'cosine' schedule; the run length "
        "comes from train.max_steps (or train.epochs)",
    ]
    for message in expect:
        assert message in found
    assert any(
        p.startswith("lr_scheduler.min_lr / lr_scheduler.min_lr_ratio: both set") for p in found
    )
    assert all(p.startswith("lr_scheduler.") for p in found)


def test_unknown_key_without_a_close_match_lists_the_keys():
    (message,) = problems_of({"name": "linear", "zzz": 1})
    assert message.endswith(
        "its keys are: name, warmup_steps, warmup_shape, warmup_start_factor, min_lr_ratio, min_lr"
    )


def test_error_str_lists_every_problem():
    with pytest.raises(ScheduleConfigError) as err:
        from_table({"name": "step", "gamma": 2.0, "step_size": 0})
    text = str(err.value)
    assert text.startswith("2 problem(s) in the LR schedule:")
    assert "  - lr_scheduler.step_size: 0 must be >= 1 (required)" in text
    assert "  - lr_scheduler.gamma: 2.0 must be in (0, 1]" in text


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({}, "lr_scheduler.name: required; one of constant, "),
        ({"name": 3}, "lr_scheduler.name: expected a schedule name (str), got int 3"),
        (
            {"name": "cosin"},
            "lr_scheduler.name: unknown LR schedule 'cosin'; did you mean 'cosine'?",
        ),
        (
            {"name": "no_such_pkg_xyz.mod:Cls"},
            "lr_scheduler.name: LR schedule 'no_such_pkg_xyz.mod:Cls': module "
            "'no_such_pkg_xyz.mod' not found",
        ),
    ],
)
def test_name_problems(table, message):
    (found,) = problems_of(table)
    assert found.startswith(message), found


def test_not_a_table():
    assert problems_of(["cosine"]) == ["[lr_scheduler]: expected a table, got list"]  # type: ignore[arg-type]


def test_where_prefixes_every_key():
    found = problems_of({"name": "linear", "min_lr": -1.0, "bogus": 1}, where="sweep.lr_scheduler")
    assert all(p.startswith("sweep.lr_scheduler.") for p in found) and len(found) == 2


@pytest.mark.parametrize(
    ("key", "value", "schedule", "message"),
    [
        ("warmup_steps", True, "cosine", "expected int | float, got bool True"),
        ("warmup_steps", "10", "cosine", "expected int | float, got str '10'"),
        ("warmup_steps", 1.0, "cosine", "1.0 is a float, so a ratio of the run"),
        ("warmup_steps", -3, "cosine", "-3 must be >= 0"),
        ("warmup_start_factor", 1.5, "cosine", "1.5 must be in [0, 1]"),
        ("warmup_start_factor", 0.0, "exp", "the exponential warmup needs a start factor > 0"),
        ("min_lr_ratio", 1.2, "linear", "1.2 must be in [0, 1]"),
        ("min_lr_ratio", float("nan"), "linear", "expected a finite float, got nan"),
        ("min_lr", float("inf"), "linear", "expected a finite float, got inf"),
        ("min_lr", -1e-6, "linear", "-1e-06 must be >= 0"),
        ("power", 0, "polynomial", "0.0 must be > 0"),
        ("period", 1, "sine", "1 must be 0 (the whole run) or >= 2"),
        ("beta", 2, "rex", "2.0 must be in [0, 1]"),
        ("step_size", 2.5, "step", "expected int, got float 2.5"),
        ("gamma", 0, "step", "0.0 must be in (0, 1]"),
        ("milestones", [5, 3], "multistep", "[5, 3] must be >= 1 and strictly increasing"),
        ("milestones", [1, "2"], "multistep", "expected list of int, got list [1, '2']"),
        ("milestones", 5, "multistep", "expected list of int, got int 5"),
        ("timescale", -1, "inverse_sqrt", "-1 must be >= 0"),
        ("decay_ratio", 1.5, "warmup_stable_decay", "1.5 must be in [0, 1]"),
        ("decay_shape", "sqrt", "warmup_stable_decay", '"sqrt" is not one of'),
        ("cycle_mult", 0.5, "cosine_with_restarts", "0.5 must be >= 1"),
        ("cycle_decay", 0, "cosine_with_restarts", "0.0 must be in (0, 1]"),
        ("restart", "warm", "cosine_with_restarts", '"warm" is not one of "hard" | "soft"'),
    ],
)
def test_out_of_range_and_wrong_type(key, value, schedule, message):
    base = {"name": schedule}
    if schedule == "exp":
        base = {"name": "cosine", "warmup_shape": "exponential"}
    elif schedule == "cosine_with_restarts":
        base["num_cycles"] = 2
    elif schedule == "step" and key != "step_size":
        base["step_size"] = 10
    elif schedule == "multistep" and key != "milestones":
        base["milestones"] = [10]
    found = problems_of({**base, key: value})
    assert any(p.startswith(f"lr_scheduler.{key}: {message}") for p in found), found


RULES = "lr_scheduler.step_rules: "
CYCLES = "lr_scheduler.num_cycles / lr_scheduler.first_cycle_steps: set exactly one"
RAMP = "lr_scheduler.restart_warmup_steps: "


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"name": "step"}, "lr_scheduler.step_size: 0 must be >= 1 (required)"),
        ({"name": "multistep"}, "lr_scheduler.milestones: required, e.g. [600, 900]"),
        ({"name": "piecewise_constant"}, RULES + "required"),
        ({"step_rules": "1:10,0.1:20"}, RULES + "the last rule '0.1:20' must be a bare multiplier"),
        ({"step_rules": "1,0.1"}, RULES + "rule '1' must be 'multiplier:end_update'"),
        ({"step_rules": "x:10,0.1"}, RULES + "multiplier 'x' in 'x:10' is not a number >= 0"),
        ({"step_rules": "1:1.5,0.1"}, RULES + "end update '1.5' in '1:1.5' is not an integer"),
        (
            {"step_rules": "1:20,0.5:10,0.1"},
            RULES + "end updates [20, 10] must be >= 1 and strictly",
        ),
        ({"name": "cosine_with_restarts"}, CYCLES),
        ({"num_cycles": 2, "first_cycle_steps": 10}, CYCLES),
        ({"num_cycles": 1}, "lr_scheduler.num_cycles: 1 cycle never restarts"),
        ({"num_cycles": 2, "restart": "soft"}, RAMP + "restart = 'soft' needs a ramp"),
        ({"num_cycles": 2, "restart_warmup_steps": 5}, RAMP + "only used with restart = 'soft'"),
    ],
)
def test_cross_field_problems(table, message):
    if "name" not in table:
        kind = "piecewise_constant" if "step_rules" in table else "cosine_with_restarts"
        table = {"name": kind, **table}
    assert any(p.startswith(message) for p in problems_of(table)), problems_of(table)


def test_int_for_float_is_accepted_and_stored_as_float():
    schedule = from_table({"name": "cosine", "min_lr_ratio": 0, "warmup_steps": 0.25})
    assert schedule.min_lr_ratio == 0.0 and isinstance(schedule.min_lr_ratio, float)
    assert schedule.warmup_steps == 0.25
    assert isinstance(from_table({"name": "cosine", "warmup_steps": 5}).warmup_steps, int)


# ---------------------------------------------------------------- run-length checks


def test_warmup_not_shorter_than_the_run_is_reported():
    schedule = from_table({"name": "cosine", "warmup_steps": 120})
    assert schedule.check(100) == [
        "lr_scheduler.warmup_steps: 120 warmup updates is not shorter than the run (100 updates); "
        "lower it or raise train.max_steps"
    ]
    assert schedule.check(100, where="x")[0].startswith("x.warmup_steps: 120 warmup")
    assert from_table({"name": "linear", "warmup_steps": 100}).check(100) != []
    assert from_table({"name": "linear", "warmup_steps": 99}).check(100) == []


def test_warmup_ratio_rounding_to_the_whole_run_is_reported():
    (message,) = from_table({"name": "linear", "warmup_steps": 0.999}).check(100)
    assert message.startswith(
        "lr_scheduler.warmup_steps: 0.999 of 100 updates rounds to 100 warmup updates, which is "
        "not shorter than the run"
    )


def test_check_includes_field_problems_for_schedules_built_in_python():
    schedule = schedulers.get("cosine")(min_lr_ratio=3.0)
    assert schedule.check(100) == ["lr_scheduler.min_lr_ratio: 3.0 must be in [0, 1]"]
    assert schedulers.get("cosine")(warmup_steps="5").check(100) == [  # type: ignore[arg-type]
        "lr_scheduler.warmup_steps: expected int | float, got str '5'"
    ]


@pytest.mark.parametrize(
    ("table", "total", "message"),
    [
        (
            {"first_cycle_steps": 90, "warmup_steps": 10},
            100,
            "lr_scheduler.first_cycle_steps: 90 is not shorter than the 90 updates after warmup, "
            "so the LR never restarts",
        ),
        ({"num_cycles": 20}, 10, "lr_scheduler.num_cycles: 20 cycles do not fit in the 10 updates"),
        (
            {"num_cycles": 4, "restart": "soft", "restart_warmup_steps": 25},
            100,
            RAMP + "25 is not shorter than the second cycle (25 updates)",
        ),
        (
            {"name": "cosine"},
            0,
            "lr_scheduler: a run of 0 optimizer updates has nothing to schedule",
        ),
    ],
)
def test_run_length_problems(table, total, message):
    found = from_table({"name": "cosine_with_restarts", **table}).check(total)
    assert any(p.startswith(message) for p in found), found


def test_absolute_floor_above_a_base_lr_is_reported_when_base_lrs_are_given():
    schedule = from_table({"name": "cosine", "min_lr": 5e-5})
    assert schedule.check(100) == []
    assert schedule.check(100, base_lrs=[1e-4, 1e-5]) == [
        "lr_scheduler.min_lr: 5e-05 is above the base LR 1e-05 of param group 1, so its LR would "
        "rise instead of decay; lower it or use min_lr_ratio"
    ]


# ---------------------------------------------------------------- round trips and help


@pytest.mark.parametrize(("title", "table"), EXAMPLES, ids=[t for t, _ in EXAMPLES])
def test_params_round_trip_through_json_and_from_table(title, table):
    schedule = from_table(table)
    params = json.loads(json.dumps(schedule.params()))
    assert params == schedule.params()
    again = from_table({"name": schedule.name, **params})
    assert again == schedule and type(again) is type(schedule)


@pytest.mark.parametrize("name", schedulers.available())
def test_describe_lists_every_key_with_type_default_and_doc(name):
    text = schedulers.describe(name)
    assert text.splitlines()[0] == name
    cls = schedulers.get(name)
    assert cls.__doc__.strip().splitlines()[0] in text

    for f in dataclasses.fields(cls):
        assert f"    {f.name} (" in text and f.metadata["doc"] in text
    assert "warmup_steps (int | float, default 0): Warmup length" in text


def test_describe_shows_lists_and_choices():
    text = schedulers.describe("multistep")
    assert "milestones (list of int, default []):" in text
    assert 'restart ("hard" | "soft", default "hard")' in schedulers.describe(
        "cosine_with_restarts"
    )


# ---------------------------------------------------------------- docs/schedules.md


DOCS = Path(__file__).resolve().parents[1] / "docs"


def toml_default(value) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


# The table lives in docs/schedules.md alone (the README links it).
@pytest.mark.parametrize("doc_file", [DOCS / "schedules.md"], ids=["docs"])
@pytest.mark.parametrize("name", schedulers.available())
def test_docs_table_lists_every_schedule_with_its_keys_and_defaults(name, doc_file):
    assert (DOCS / "lr_schedules.png").is_file()
    lines = doc_file.read_text().splitlines()
    (row,) = [line for line in lines if line.startswith(f"| `{name}` |")]
    cls = schedulers.get(name)
    keys = row.split(" | ")[1]
    shared = {f.name for f in dataclasses.fields(schedulers.DecaySchedule)}
    assert ("*floor*" in keys) == issubclass(cls, schedulers.DecaySchedule)
    for f in dataclasses.fields(cls):
        if f.name not in shared:
            assert f"`{f.name} = {toml_default(f.default)}`" in keys
