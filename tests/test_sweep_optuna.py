"""What ``trainer/sweep/optuna_adapter.py`` relies on beyond Optuna's stable API, exercised
against the installed Optuna, which must be the locked one it was checked with."""

from __future__ import annotations

import logging
import re

import optuna
import pytest
from optuna.trial import TrialState
from sweep_helpers import REPO

from trainer.sweep import engine
from trainer.sweep.optuna_adapter import (
    CHECKED_WITH,
    OPTIMIZE_LOGGER,
    copied_numbers,
    heartbeat_options,
    queue_copy,
    quiet_caught,
    root_number,
)


def locked_version(package: str) -> str:
    text = (REPO / "requirements" / "cpu.lock").read_text(encoding="utf-8")
    found = re.search(rf"^{package}==(\S+)", text, re.MULTILINE)
    assert found, f"{package} is not pinned in requirements/cpu.lock"
    return found.group(1)


def test_the_adapter_was_checked_against_the_locked_optuna():
    locked = locked_version("optuna")
    assert locked == CHECKED_WITH, (
        f"requirements/cpu.lock now pins Optuna {locked}: check every item of "
        "trainer/sweep/optuna_adapter.py against it (this file exercises each), then set "
        "CHECKED_WITH"
    )
    assert optuna.__version__ == locked, (
        f"Optuna {optuna.__version__} is installed, the lock pins {locked}: "
        "pip install -c requirements/cpu.lock -e '.[dev]'"
    )


def fail(study: optuna.Study, trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    return study.tell(trial, state=TrialState.FAIL)


def test_a_copy_keeps_the_queued_values_attributes_and_ancestry():
    """A trial that died before it asked for its values: its copy still gets them (from the
    queue entry it copies), and knows the chain it belongs to."""
    study = optuna.create_study(sampler=engine.QueueOnlySampler())
    study.enqueue_trial({"x": "b"}, user_attrs={"slot": "s"})
    original = study.ask()
    assert root_number(fail(study, original)) == 0
    assert copied_numbers(study.get_trials()[0]) == []
    queue_copy(study, study.get_trials()[0])
    copy = study.get_trials()[1]
    assert copy.state == TrialState.WAITING and copy.user_attrs == {"slot": "s"}
    assert (root_number(copy), copied_numbers(copy)) == (0, [0])
    popped = study.ask()
    assert popped.number == 1
    assert popped.suggest_categorical("x", ["a", "b"]) == "b"  # not sampled: queued
    queue_copy(study, fail(study, popped))
    second = study.get_trials()[2]
    assert (root_number(second), copied_numbers(second)) == (0, [0, 1])
    assert study.ask().suggest_categorical("x", ["a", "b"]) == "b"


def test_the_rdb_storage_takes_the_heartbeat_and_the_same_copy_callback(tmp_path):
    """The heartbeat itself, with a real dead worker: test_sweep_spec.py's
    test_a_dead_workers_trial_on_an_rdb_is_found_by_its_heartbeat."""
    options = heartbeat_options(2, 6)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}", **options)
    assert storage.get_heartbeat_interval() == 2
    callback = storage.get_heartbeat_stale_trial_callback()
    assert callback is options["heartbeat_stale_trial_callback"]
    study = optuna.create_study(storage=storage)
    study.enqueue_trial({}, user_attrs={"slot": "s"})
    callback(study, fail(study, study.ask()))
    assert root_number(study.get_trials()[1]) == 0  # the same copies as queue_copy's


class Caught(Exception):
    pass


def test_caught_objective_errors_are_logged_where_quiet_caught_drops_them(monkeypatch):
    logger = logging.getLogger(OPTIMIZE_LOGGER)
    monkeypatch.setattr(logger, "filters", list(logger.filters))  # restored afterwards
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger.addHandler(handler)

    def objective(trial: optuna.Trial) -> float:
        raise Caught("reported elsewhere")

    def caught() -> list[logging.LogRecord]:
        return [r for r in records if r.exc_info and isinstance(r.exc_info[1], Caught)]

    try:
        study = optuna.create_study()
        study.optimize(objective, n_trials=1, catch=(Caught,))
        assert len(caught()) == 1, "Optuna logs a caught error, with its traceback, there"
        records.clear()
        quiet_caught(Caught)
        quiet_caught(Caught)  # once is enough: no second filter
        study.optimize(objective, n_trials=1, catch=(Caught,))
        assert caught() == []
        assert sum(getattr(f, "types", None) == (Caught,) for f in logger.filters) == 1
    finally:
        logger.removeHandler(handler)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL] * 2


def test_a_grid_trial_that_asks_the_sampler_is_a_bug_said_at_once():
    study = optuna.create_study(sampler=engine.QueueOnlySampler())
    with pytest.raises(RuntimeError, match="samples nothing"):
        study.ask().suggest_categorical("seed", [0, 1])
