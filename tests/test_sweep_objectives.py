"""The sweep's objectives: the ``objective`` key, the checks on it, Optuna's directions and
the Pareto front; and a real A/A sweep on the tiny model with a CLIP objective beside the
loss."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from sweep_helpers import LAUNCH, run_sweep, summary, sweep_command, write_sweep

from trainer.config.load import ConfigError
from trainer.sweep import engine, expand, spec
from trainer.sweep.figures import pareto_front
from trainer.sweep.objectives import OBJECTIVES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def base(tiny_model, tiny_data, tmp_path) -> Path:
    return write_sweep(tmp_path / "files", tiny_model, tiny_data).parent / "base.toml"


def read(tmp_path: Path, text: str) -> tuple[spec.Spec, list[str]]:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return spec.read(path, str(tmp_path / "out"))


GRID = '[grid]\nlr_scheduler = [{ name = "constant" }, { name = "linear" }]\n'


def test_objective_defaults_to_the_final_loss_and_takes_a_name_or_two(base, tmp_path):
    s, problems = read(tmp_path, f'base = "{base}"\n{GRID}')
    assert problems == [] and [o.name for o in s.objectives] == ["final"]
    s, problems = read(tmp_path, f'base = "{base}"\nobjective = "best"\n{GRID}')
    assert problems == [] and s.objectives == (OBJECTIVES["best"],)
    s, problems = read(tmp_path, f'base = "{base}"\nobjective = ["final", "clip_t"]\n{GRID}')
    assert problems == [] and [o.direction for o in s.objectives] == ["minimize", "maximize"]
    shipped, problems = spec.read(REPO / "configs" / "sweeps" / "tiny_schedules.toml")
    assert problems == [] and [o.name for o in shipped.objectives] == ["final"]


def test_bad_objectives_are_named_with_the_fix(base, tmp_path):
    _, problems = read(tmp_path, f'base = "{base}"\nobjective = ["fianl", "best", "dino"]\n'
                       f'[pruner]\nname = "median"\n{GRID}')  # fmt: skip
    text = "\n".join(problems)
    assert (
        "objective: 'fianl' is not one of final, best, clip_t, clip_i, dino; did you mean" in text
    )
    assert "objective: give one or two" in text
    assert "pruner: Optuna prunes on one objective" in text


def test_an_image_score_objective_needs_the_runs_to_compute_it(base, tmp_path):
    s, problems = read(tmp_path, f'base = "{base}"\nobjective = "clip_i"\n{GRID}')
    with pytest.raises(ConfigError) as err:
        expand.check(s, ["--num_processes", "1"], problems)
    assert "objective = 'clip_i': the runs must compute it; add it to validation.scores" in str(
        err.value
    )


def test_the_study_takes_the_objectives_directions_and_refuses_others(base, tmp_path):
    s, _ = read(tmp_path, f'base = "{base}"\nobjective = ["final", "clip_t"]\n{GRID}')
    storage = optuna.storages.InMemoryStorage()
    study = engine.open_study(s, storage)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    assert engine.open_study(s, storage).user_attrs[engine.OBJECTIVE_ATTR] == ["final", "clip_t"]
    other, _ = read(tmp_path, f'base = "{base}"\nobjective = "best"\n{GRID}')
    with pytest.raises(ConfigError, match=r"made for objective = \['final', 'clip_t'\]"):
        engine.open_study(other, storage)


def test_pareto_front_matches_optunas_best_trials():
    """The front of configuration means, against Optuna's non-dominated trials of a study
    with the same directions and values."""
    objectives = (OBJECTIVES["final"], OBJECTIVES["clip_t"])
    points = {"a": (1.0, 0.30), "b": (1.1, 0.35), "c": (1.2, 0.33), "d": (0.9, 0.20),
              "e": (1.0, 0.25), "f": (1.0, 0.30)}  # fmt: skip
    study = optuna.create_study(directions=["minimize", "maximize"])
    for label, values in points.items():
        study.add_trial(optuna.trial.create_trial(values=list(values), user_attrs={"l": label}))
    optunas = sorted(t.user_attrs["l"] for t in study.best_trials)
    assert sorted(pareto_front(points, objectives)) == optunas == ["a", "b", "d", "f"]


@pytest.mark.slow
def test_aa_sweep_on_the_tiny_model_is_identical_or_tied_on_loss_and_clip_t(
    tiny_model, tiny_data, tiny_scorers, tmp_path
):
    """Two entries configured identically under different labels, two seeds each, scored on
    the final loss and CLIP-T (a multi-objective study): never called different."""
    clip, _ = tiny_scorers
    base = write_sweep(tmp_path / "files", tiny_model, tiny_data).parent / "base.toml"
    same = '{ name = "cosine", warmup_steps = 1 }'
    sweep = tmp_path / "files" / "aa.toml"
    sweep.write_text(
        f'base = "{base}"\nname = "aa"\nseeds = [0, 1]\nobjective = ["final", "clip_t"]\n'
        f"launch = {LAUNCH}\n\n[set]\n"
        '"train.max_steps" = 4\n"validation.every_n_steps" = 4\n"checkpoint.every_n_steps" = 0\n'
        '"validation.scores" = ["clip_t"]\n'
        f'"validation.clip_model" = "{clip}"\n\n'
        f'[[trials]]\nname = "first"\nlr_scheduler = {same}\n\n'
        f'[[trials]]\nname = "second"\nlr_scheduler = {same}\n'
    )
    out = tmp_path / "out"
    run_sweep(sweep_command(sweep, out), tmp_path / "worker.log")
    rows = summary(out)
    assert len(rows) == 4 and all(r["state"] == "complete" for r in rows.values())
    assert all(r["clip_t"] for r in rows.values())
    data = json.loads((out / "summary.json").read_text())
    assert [v["objective"] for v in data["verdicts"]] == ["final", "clip_t"]
    for verdict in data["verdicts"]:
        places = [c["place"] for c in verdict["configurations"]]
        assert sorted(places) in (["best", "identical"], ["best", "tied"]), verdict
        assert verdict["kind"] in ("identical", "placed")
    assert sorted(data["pareto_front"]) in (["first"], ["first", "second"], ["second"])
    assert (out / "pareto.png").stat().st_size > 0
    page = (out / "report.html").read_text()
    assert page.index("class='verdict'") < page.index("<table>") < page.index("<img")
    log = (tmp_path / "worker.log").read_text()
    assert "Both configurations gave the identical final validation loss" in log or "tied" in log
    study = optuna.load_study(
        study_name="aa",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(out / engine.JOURNAL_NAME))
        ),
    )
    assert len(study.directions) == 2
    assert all(len(t.values) == 2 for t in study.trials)
