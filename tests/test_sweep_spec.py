"""The sweep file: expansion into runs, checks before any trial starts, and the rule that
keeps two workers from running one trial twice."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from sweep_helpers import REPO, environment, write_sweep

from trainer.commands import cli
from trainer.config.load import ConfigError, load
from trainer.sweep import claims, expand, spec


def sweep_text(base: Path, body: str, head: str = "") -> str:
    return f'base = "{base}"\n{head}\n{body}'


@pytest.fixture
def base(tiny_model, tiny_data, tmp_path) -> Path:
    return write_sweep(tmp_path / "files", tiny_model, tiny_data).parent / "base.toml"


def load_spec(tmp_path: Path, text: str) -> spec.Spec:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return spec.load(path, str(tmp_path / "out"))


def test_grid_of_tables_and_keys_expands_to_the_commands_a_user_would_type(base, tmp_path):
    s = load_spec(
        tmp_path,
        sweep_text(
            base,
            """
[set]
"lr_scheduler.warmup_steps" = 2      # lands on every trial's own schedule table
[grid]
lr_scheduler = [{ name = "linear" }, { name = "cosine", min_lr_ratio = 0.1 }]
train.learning_rate = [1e-4, 1e-3]   # bare dotted key: the same as "train.learning_rate"
""",
            "seeds = [3, 4]",
        ),
    )
    runs = expand.build_runs(s, s.points)
    assert len(runs) == 8 and [r.seed for r in runs[:4]] == [3, 3, 3, 3]  # seed-major
    assert runs[0].point.label == "linear, learning_rate=0.0001"
    assert list(runs[3].flags) == [
        'lr_scheduler={name = "cosine", min_lr_ratio = 0.1}',
        "lr_scheduler.warmup_steps=2",
        "train.learning_rate=0.001",
        "train.seed=3",
    ]
    # The flags mean what `--set` means: the same config as loading with them.
    for run in runs:
        assert run.config == load(base, [*run.flags, "output_dir='sweep-run'"])
    cfg = runs[3].config
    assert (cfg.lr_scheduler.name, cfg.lr_scheduler.warmup_steps) == ("cosine", 2)
    assert cfg.lr_scheduler.min_lr_ratio == 0.1 and cfg.train.learning_rate == 1e-3
    assert len({r.key for r in runs}) == 8  # one folder per configuration and seed
    again = expand.build_runs(s, s.points)
    assert [r.key for r in again] == [r.key for r in runs]  # deterministic folders


def test_a_table_without_name_sets_only_its_keys(base, tmp_path):
    s = load_spec(
        tmp_path,
        sweep_text(base, "[[trials]]\nname = 'wide'\nlora = { rank = 8, alpha = 8.0 }\n"),
    )
    (run,) = expand.build_runs(s, s.points)
    assert list(run.flags[:2]) == ["lora.rank=8", "lora.alpha=8.0"]
    assert run.config.lora.target_modules == load(base).lora.target_modules


def test_invalid_trials_are_all_reported_before_any_trial_starts(base, tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(
        sweep_text(
            base,
            """
[grid]
lr_scheduler = [
  { name = "cosine" },
  { name = "cosine", num_cycles = 2 },          # a key cosine does not take
  { name = "cosine_with_restarts" },            # restarts need num_cycles
]
"train.learning_rate" = [1e-3, -1.0]
""",
        )
    )
    out = tmp_path / "out"
    assert cli.main(["sweep", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "trial 'cosine(num_cycles=2), learning_rate=0.001' (seed 0)" in err
    assert "lr_scheduler.num_cycles" in err
    assert "cosine_with_restarts" in err and "num_cycles" in err
    assert "train.learning_rate: -1.0 must be > 0" in err
    assert not out.exists(), "nothing was created: no study, no trial folder"


def test_sweep_level_problems_name_their_keys(base, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_spec(tmp_path, sweep_text(base, "[grid]\nlr = 1e-3\n", "seeds = [0, 0]\nbogus = 1"))
    text = "\n".join(err.value.problems)
    assert "bogus" in text and "seeds" in text and "grid.lr: expected a list" in text


def test_the_objective_needs_a_validation_set(base, tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text(
        sweep_text(base, '[set]\n"validation.fraction" = 0.0\n[grid]\n"train.seed" = [1, 2]\n')
    )
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "every trial: validation.fraction / validation.path" in capsys.readouterr().err


def test_shipped_sweeps_load_and_expand():
    for path in sorted((REPO / "configs" / "sweeps").glob("*.toml")):
        s = spec.load(path)
        runs = expand.build_runs(s, s.points)
        labels = {r.point.label for r in runs}
        if path.name == "tiny_run_length.toml":  # one schedule at three run lengths
            assert len(labels) == 3 and len({r.config.lr_scheduler for r in runs}) == 1
        else:
            assert len(labels) >= 4, f"{path.name}: compare 4 schedules"
        assert all(r.config.validation.fraction > 0 for r in runs)


def test_only_the_first_queued_copy_of_a_run_is_claimed():
    """Two workers queueing one new study at once: each run is queued twice. Whichever
    worker pops a copy, only the lowest-numbered copy of each slot is run; a re-queued copy of
    a dead worker's trial is run; a fresh trial of a grid never is."""
    study = optuna.create_study()
    for _ in range(2):  # both workers queue both runs
        for slot in ("a", "b"):
            study.enqueue_trial({"seed": 0}, user_attrs={claims.SLOT: slot})
    trials = study.get_trials()
    claimable = [t.number for t in trials if claims.claim_problem(t, trials, None) is None]
    assert claimable == [0, 1]
    # Trial 0's worker dies: Optuna's retry callback re-queues a copy of it.
    running = study.ask()
    assert running.number == 0
    assert claims.requeue(study, running.number)
    assert not claims.requeue(study, running.number), "only once"
    fresh = optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING)
    study.add_trial(fresh)
    trials = study.get_trials()
    copy = trials[4]
    assert claims.root_number(copy) == 0
    assert claims.claim_problem(copy, trials, None) is None
    assert claims.claim_problem(trials[2], trials, None) is not None  # second copy of "a"
    assert claims.claim_problem(trials[5], trials, None) is not None  # not a queued run
    assert claims.claim_problem(trials[5], trials, budget=1) is None  # a [search]'s first


def test_a_study_of_another_sweep_is_refused(tmp_path):
    study = optuna.create_study()
    claims.check_fingerprint(study, "abc", "here")
    claims.check_fingerprint(study, "abc", "here")
    with pytest.raises(ConfigError, match="made by a sweep with other trials"):
        claims.check_fingerprint(study, "xyz", "here")


def test_queued_trials_get_their_values_from_the_queue(base, tmp_path):
    """Each queued trial's parameters, as the queue hands them out, are its own run's."""
    from trainer.sweep import engine

    s = load_spec(
        tmp_path,
        sweep_text(
            base,
            '[grid]\nlr_scheduler = [{ name = "linear" }, { name = "cosine" }]\n'
            '"train.learning_rate" = [1e-4, 1e-3, 1e-2]\n',
            "seeds = [0, 1]",
        ),
    )
    runs = {r.key: r for r in expand.build_runs(s, s.points)}
    space = engine.grid_space(s)
    study = optuna.create_study(sampler=engine.make_sampler(s))
    assert claims.enqueue_missing(study, list(runs.values())) == 12
    assert claims.enqueue_missing(study, list(runs.values())) == 0
    seen = []

    def objective(trial: optuna.Trial) -> float:
        values = {k: trial.suggest_categorical(k, space[k]) for k in space}
        slot = trial.user_attrs[claims.SLOT]
        assert values == runs[slot].params
        seen.append(slot)
        return 1.0

    study.optimize(objective, n_trials=12)
    assert sorted(seen) == sorted(runs)
    assert not study.get_trials(states=(optuna.trial.TrialState.WAITING,)), "all popped"
    # A trial asked for beyond the queue gets no made-up values from the grid's sampler.
    with pytest.raises(RuntimeError, match="samples nothing"):
        study.ask().suggest_categorical("seed", space["seed"])


def test_a_dead_workers_trial_on_the_journal_is_queued_again_once(tmp_path):
    """The journal has no heartbeat: a worker's liveness is its flock, which the kernel
    drops when the worker dies. A trial of a dead worker is failed and copied back into the
    queue exactly once; a live worker's trial is left alone."""
    from trainer.sweep import engine

    storage = engine.open_storage(None, tmp_path, 60)
    study = optuna.create_study(storage=storage, study_name="s")
    for slot in ("a", "b"):
        study.enqueue_trial({}, user_attrs={claims.SLOT: slot})
    dead, alive, me = (claims.WorkerLock(tmp_path) for _ in range(3))
    for worker in (dead, alive):
        study.ask().set_user_attr(claims.WORKER, worker.info)
    dead.close()  # what the kernel does when that worker's process dies
    assert claims.take_over_dead(study, storage, tmp_path, me) == [0]
    assert claims.take_over_dead(study, storage, tmp_path, me) == []
    trials = study.get_trials()
    states = [t.state.name for t in trials]
    assert states == ["FAIL", "RUNNING", "WAITING"]
    assert trials[2].user_attrs[claims.SLOT] == "a" and claims.root_number(trials[2]) == 0
    alive.close()
    me.close()


DEAD_WORKER = """
import os, sys, time
import optuna
from trainer.sweep import engine
storage = engine.open_storage(sys.argv[1], sys.argv[2], 1)
study = optuna.load_study(study_name="s", storage=storage)
def objective(trial):
    time.sleep(0.5)
    os._exit(0)
study.optimize(objective, n_trials=1)
"""


@pytest.mark.slow
def test_a_dead_workers_trial_on_an_rdb_is_found_by_its_heartbeat(tmp_path):
    """With an RDB storage, Optuna's heartbeat: a running trial silent for the grace period
    (3 heartbeats) is failed and copied back into the queue by the next worker that looks."""
    from trainer.sweep import engine

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    storage = engine.open_storage(url, tmp_path, 1)
    study = optuna.create_study(storage=storage, study_name="s")
    study.enqueue_trial({}, user_attrs={claims.SLOT: "a"})
    # Its worker pops it, beats (Optuna's heartbeat thread beats at once), then dies.
    done = subprocess.run(
        [sys.executable, "-c", DEAD_WORKER, url, str(tmp_path)],
        cwd=REPO, env=environment(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert [t.state.name for t in study.get_trials()] == ["RUNNING"]
    me = claims.WorkerLock(tmp_path)
    assert claims.take_over_dead(study, storage, tmp_path, me) == []  # still within grace
    time.sleep(3 * 1 + 1)
    assert claims.take_over_dead(study, storage, tmp_path, me) == [0]
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "WAITING"]
    me.close()
