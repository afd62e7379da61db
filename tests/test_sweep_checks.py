"""What a sweep file can get wrong, found before any trial runs and all at once; and what a
rerun after failed trials says. No trial trains here: the studies are built by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import optuna
import pytest
from sweep_helpers import REPO, write_sweep

from trainer.commands import cli
from trainer.config.load import ConfigError, load
from trainer.sweep import claims, engine, expand, process, results, spec, worker


@pytest.fixture
def base(tiny_model, tiny_data, tmp_path) -> Path:
    return write_sweep(tmp_path / "files", tiny_model, tiny_data).parent / "base.toml"


def write(tmp_path: Path, base: Path, text: str, name: str = "s") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'base = "{base}"\n{text}')
    return path


def sweep_error(capsys, *argv: str) -> str:
    """Run ``sdlora sweep``; it must refuse (exit 2) with one error and no traceback."""
    assert cli.main(["sweep", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


# ---------------------------------------------------------------- list-valued grid axes


def test_a_grid_over_lists_runs_what_the_same_trial_list_runs(base, tmp_path):
    """A grid axis whose values are lists (target_modules) expands to the runs that the same
    lists as [[trials]] give, and each queued trial gets its own run's values."""
    lists = '[["to_q", "to_k"], ["to_v"]]'
    grid = spec.load(write(tmp_path, base, f'[grid]\n"lora.target_modules" = {lists}\n'))
    trials = spec.load(
        write(
            tmp_path,
            base,
            '[[trials]]\n"lora.target_modules" = ["to_q", "to_k"]\n'
            '[[trials]]\n"lora.target_modules" = ["to_v"]\n',
            "t",
        )
    )
    runs = expand.check(grid, [])
    listed = expand.check(trials, [])
    assert [r.key for r in runs] == [r.key for r in listed]  # the same folders, so weights
    assert [r.config for r in runs] == [r.config for r in listed]
    for run, modules in zip(runs, (("to_q", "to_k"), ("to_v",)), strict=True):
        assert run.config.lora.target_modules == modules
        assert run.config == load(base, [*run.flags, "output_dir='sweep-run'"])
    space = engine.grid_space(grid)
    study = optuna.create_study(sampler=engine.make_sampler(grid))
    assert claims.enqueue_missing(study, runs) == 2  # raised TypeError: unhashable list
    by_slot = {r.key: r for r in runs}

    def objective(trial: optuna.Trial) -> float:
        values = {k: trial.suggest_categorical(k, space[k]) for k in space}
        assert values == by_slot[trial.user_attrs[claims.SLOT]].params
        return 1.0

    study.optimize(objective, n_trials=2)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "COMPLETE"]


def test_a_grid_optuna_cannot_take_is_refused_before_the_study_exists(
    base, tmp_path, monkeypatch, capsys
):
    """Whatever Optuna rejects as a grid's parameters is found by the checks, before the
    study is created and given this sweep's fingerprint (which a corrected sweep file could
    not reuse)."""

    def refuse(spec):
        raise TypeError("unhashable type: 'list'")

    monkeypatch.setattr(engine, "grid_space", refuse)
    path = write(tmp_path, base, '[grid]\n"train.learning_rate" = [1e-3, 1e-4]\n')
    out = tmp_path / "out"
    err = sweep_error(capsys, str(path), "--out", str(out))
    assert "[grid]: Optuna's categorical parameters cannot take these values (unhashable" in err
    assert not out.exists(), "no study, no journal"


# ---------------------------------------------------------------- seeds


def test_an_empty_seeds_list_is_an_error_naming_the_key(base, tmp_path):
    path = write(tmp_path, base, 'seeds = []\n[grid]\n"train.learning_rate" = [1e-3, 1e-4]\n')
    with pytest.raises(ConfigError) as err:
        spec.load(path)
    assert any(p.startswith("seeds: an empty list trains nothing") for p in err.value.problems)


def test_a_seed_in_set_is_the_seed_of_every_run(base, tmp_path):
    """[set] "train.seed" = 7 without seeds means seeds = [7] (it was overridden by the base
    config's seed)."""
    assert load(base).train.seed != 7
    s = spec.load(
        write(tmp_path, base, '[set]\n"train.seed" = 7\n[grid]\n"train.learning_rate" = [1e-3]\n')
    )
    (run,) = expand.check(s, [])
    assert run.seed == 7 and run.config.train.seed == 7
    flags = ["train.learning_rate=0.001", "train.seed=7", "output_dir='sweep-run'"]
    assert run.config == load(base, flags)
    assert list(run.flags).count("train.seed=7") == 1


def test_a_seed_set_or_varied_beside_seeds_is_an_error_that_says_use_seeds(base, tmp_path):
    cases = {
        'seeds = [1]\n[set]\n"train.seed" = 7\n[grid]\n"train.learning_rate" = [1e-3]\n': (
            "set.train.seed: the seeds are given by seeds = [1]"
        ),
        '[grid]\n"train.seed" = [1, 2]\n': "grid.train.seed: the seed is not varied",
        "[[trials]]\ntrain = { seed = 1 }\n": "trials[0].train.seed: the seed is not varied",
    }
    for text, expected in cases.items():
        with pytest.raises(ConfigError) as err:
            spec.load(write(tmp_path, base, text))
        assert any(p.startswith(expected) for p in err.value.problems), err.value.problems
        assert "seeds = [" in str(err.value)


# ---------------------------------------------------------------- every problem at once


def test_every_problem_of_a_sweep_comes_back_at_once(base, tmp_path, capsys):
    """The sweep file's own keys, the runs' configs, the launch flags and --storage: one
    error, before anything is created."""
    path = write(
        tmp_path,
        base,
        'seeds = [0, 0]\nbogus = 1\nlaunch = ["--num_processes", "two"]\n'
        '[set]\n"train.batch_size" = 64\n'
        '[grid]\n"train.learning_rate" = [1e-3, -1.0]\n',
    )
    out = tmp_path / "out"
    err = sweep_error(capsys, str(path), "--out", str(out), "--storage", "nosuchdb://x/y")
    for expected in (
        "bogus: unknown key",
        "seeds: [0, 0] repeats a seed",
        "--num_processes needs a whole number",
        "--storage nosuchdb://x/y: not an Optuna RDB URL",
        "train.learning_rate: -1.0 must be > 0",
        "train.batch_size: 14 examples cannot fill one batch of 64",
    ):
        assert expected in err, expected
    assert not out.exists()


def test_the_sdxl_recipe_in_a_sweep_reports_its_model_vae_and_data_at_once(
    tiny_sdxl, tmp_path, monkeypatch, capsys
):
    """configs/sdxl.toml as a sweep's base: its VAE and its dataset are checked with the
    rest even though train.max_steps fixes the run length (they were left to the trials)."""
    monkeypatch.chdir(tmp_path)  # data.path = "data/my-images" is relative: not here
    path = write(
        tmp_path,
        REPO / "configs" / "sdxl.toml",
        f'[set]\n"model.pretrained" = "{tiny_sdxl}"\n"model.vae" = "no-such-vae"\n'
        '[grid]\n"train.learning_rate" = [1e-4, 2e-4]\n',
    )
    err = sweep_error(capsys, str(path), "--out", str(tmp_path / "out"))
    assert "every trial: model.vae = 'no-such-vae'" in err
    assert "every trial: data.path = 'data/my-images'" in err
    assert "every trial: validation.fraction / validation.path" in err


def test_a_problem_is_named_for_the_trials_it_concerns_only(base, tmp_path, capsys):
    missing = tmp_path / "no-model"
    path = write(
        tmp_path,
        base,
        f'seeds = [0, 1]\n[grid]\n"model.pretrained" = ["{load(base).model.pretrained}", '
        f'"{missing}"]\n',
    )
    err = sweep_error(capsys, str(path), "--out", str(tmp_path / "out"))
    (line,) = [x for x in err.splitlines() if "no such folder" in x]
    assert line.count("trial ") == 2 and "every trial" not in line
    assert f"pretrained={missing}' (seed 0)" in line and f"pretrained={missing}' (seed 1)" in line


# ---------------------------------------------------------------- --storage


@pytest.mark.skipif(importlib.util.find_spec("MySQLdb") is not None, reason="MySQLdb installed")
def test_a_storage_url_without_its_driver_names_the_package_to_install(capsys):
    (problem,) = engine.storage_problems("mysql://user:secret@db-host/sweeps")
    assert "'MySQLdb' is not installed: pip install mysqlclient" in problem
    assert "mysql+pymysql://" in problem and "postgresql://" in problem
    assert "secret" not in problem
    if importlib.util.find_spec("pymysql") is None:
        (problem,) = engine.storage_problems("mysql+pymysql://u@h/db")
        assert "'pymysql' is not installed: pip install pymysql;" in problem
    # What the sweep extra supports needs nothing more.
    assert engine.storage_problems("postgresql://u@h/db") == []
    assert engine.storage_problems("sqlite:///sweep.db") == []


# ---------------------------------------------------------------- a rerun after failures


def fail_every_trial(path: Path, out: Path) -> spec.Spec:
    """What a first attempt whose every run failed leaves in the sweep's journal."""
    s = spec.load(path, str(out))
    runs = expand.check(s, [])
    storage = engine.open_storage(None, s.sweep_dir, 60)
    study = engine.open_study(s, storage)
    claims.check_fingerprint(study, worker.sweep_fingerprint(s, runs), str(path))
    space = engine.grid_space(s)
    claims.enqueue_missing(study, runs)

    def objective(trial: optuna.Trial) -> float:  # as the worker's, with every run failing
        for key in space:
            trial.suggest_categorical(key, space[key])
        trial.set_user_attr(claims.ERROR, "error: boom")
        raise worker.RunFailed("error: boom")

    study.optimize(objective, n_trials=len(runs), catch=(worker.RunFailed,))
    assert [t.state.name for t in study.get_trials()] == ["FAIL"] * len(runs)
    return s


def test_a_rerun_after_failed_trials_names_them_and_exits_1(base, tmp_path, capsys):
    path = write(tmp_path, base, 'seeds = [3]\n[grid]\n"train.learning_rate" = [1e-3, 1e-4]\n')
    out = tmp_path / "out"
    s = fail_every_trial(path, out)
    for extra in ((), ("--report-only",)):
        assert cli.main(["sweep", str(path), "--out", str(out), *extra]) == 1
        text = capsys.readouterr()
        assert "No configuration has finished all its seeds" in text.out
        assert "2 run(s) of this sweep failed" in text.err
        assert "--retry-failed" in text.err
        for run in expand.build_runs(s, s.points):
            log = run.folder(s) / process.LOG_NAME
            assert f"{run.point.label} · seed 3 (optuna trial" in text.err
            assert str(log) in text.err


def test_a_failed_search_trial_blames_its_first_unfinished_seed(base, tmp_path):
    s = spec.load(
        write(
            tmp_path,
            base,
            'seeds = [0, 1]\nn_trials = 1\n[search]\n"train.learning_rate" = '
            "{ low = 1e-4, high = 1e-3, log = true }\n",
        ),
        str(tmp_path / "out"),
    )
    study = optuna.create_study()
    trial = study.ask()
    trial.suggest_float("train.learning_rate", 1e-4, 1e-3, log=True)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    collected = results.collect(s, study, [])
    assert [(r.run.seed, r.state) for r in collected] == [(0, "failed"), (1, "not run")]


def test_a_search_trial_whose_runs_cannot_be_built_is_named_not_dropped(base, tmp_path, caplog):
    """The report has no row for a sampled configuration that does not build; the trial and
    the error are named in the log instead of vanishing without a word."""
    s = spec.load(
        write(
            tmp_path,
            base,
            'n_trials = 1\n[search]\n"train.learning_rate" = { low = -1.0, high = 1e-3 }\n',
        ),
        str(tmp_path / "out"),
    )
    study = optuna.create_study()
    study.enqueue_trial({"train.learning_rate": -0.5})  # what the sampler could have drawn
    bad = study.ask()
    assert bad.suggest_float("train.learning_rate", -1.0, 1e-3) == -0.5
    study.tell(bad, state=optuna.trial.TrialState.FAIL)
    with caplog.at_level("WARNING", logger="sdlora"):
        collected = results.collect(s, study, [])
    assert bad.number not in {r.trial for r in collected}
    (line,) = [r.getMessage() for r in caplog.records if f"trial {bad.number}:" in r.getMessage()]
    assert "left out of the report" in line and "ConfigError" in line
    assert "train.learning_rate" in line
