"""What each run of a sweep did: its state from the study, its numbers from its own files.

The state (complete, pruned, failed, running, waiting) comes from the latest trial of the
run's chain in the Optuna study (a re-queued copy replaces the trial it copies). The numbers
come from the run folder, as the trainer wrote them: ``metrics.jsonl`` (losses, LRs, val
losses, image scores), ``manifest.json`` (a finished run), ``samples/step-NNNNNN/*.png``. A
run's value on an objective (``RunResult.value``) exists only once it finished.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from trainer.report.tracking import read_metrics
from trainer.run import final
from trainer.sweep import claims
from trainer.sweep.expand import Run, build_runs
from trainer.sweep.objectives import Objective
from trainer.sweep.spec import Spec

log = logging.getLogger("sdlora")
WALL_NAME = "sweep_run.json"  # in a run folder: seconds its attempts ran, summed
STATES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}


@dataclass
class RunResult:
    """One run's row of the report."""

    run: Run
    folder: Path
    state: str = "not started"
    trial: int | None = None
    error: str = ""
    final_val: float | None = None
    best_val: float | None = None
    final_loss: float | None = None
    updates: int = 0
    wall_s: float = 0.0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False  # trained to its end (its manifest verifies)

    def value(self, objective: Objective) -> float | None:
        """The run's value on ``objective``: the last one it recorded, or the best over the
        run; None unless the run finished."""
        if not self.finished:
            return None
        values = [float(r[objective.metric]) for r in self.metrics if objective.metric in r]
        if not values:
            return None
        if objective.over_run:
            return min(values) if objective.lower_is_better else max(values)
        last = self.metrics[-1]
        return float(last[objective.metric]) if objective.metric in last else None

    def timestep_losses(self) -> dict[int, float]:
        """The final validation point's loss at each fixed timestep ({} when not kept)."""
        if not self.finished:
            return {}
        by_t = self.metrics[-1].get("val_loss_by_timestep", {})
        return {int(t): float(v) for t, v in by_t.items()}


def finished_steps(folder: Path) -> int | None:
    """The update count of a finished run (its manifest verifies), else None."""
    manifest, problems = final.read_manifest(folder)
    if manifest is None or problems:
        return None
    return int(manifest["global_step"])


def read_run(run: Run, folder: Path) -> RunResult:
    """A run's numbers from its folder (the state is filled in from the study)."""
    result = RunResult(run, folder, metrics=read_metrics(folder))
    vals = [r["val_loss"] for r in result.metrics if "val_loss" in r]
    if result.metrics:
        last = result.metrics[-1]
        result.updates, result.final_loss = int(last["step"]), float(last["loss"])
    result.best_val = min(vals) if vals else None
    steps = finished_steps(folder)
    if steps is not None and result.metrics and result.metrics[-1]["step"] == steps:
        result.finished = True
        result.final_val = result.metrics[-1].get("val_loss")
    try:
        result.wall_s = float(json.loads((folder / WALL_NAME).read_text())["wall_s"])
    except (OSError, ValueError, KeyError):
        result.wall_s = 0.0
    return result


def add_wall_time(folder: Path, seconds: float) -> float:
    """Add one attempt's seconds to the run's total; return the total."""
    from trainer.files import write_json

    try:
        total = float(json.loads((folder / WALL_NAME).read_text())["wall_s"])
    except (OSError, ValueError, KeyError):
        total = 0.0
    total += seconds
    write_json(folder / WALL_NAME, {"wall_s": total})
    return total


def legit_trials(study: optuna.Study, budget: int | None) -> list[FrozenTrial]:
    """The study's trials that stand for runs (not the skipped duplicates), by number."""
    trials = study.get_trials(deepcopy=False)
    index = claims.Claims(trials, budget)  # built once: this runs on every poll of the bar
    return [t for t in trials if claims.SKIPPED not in t.user_attrs and index.problem(t) is None]


def latest_by_root(trials: list[FrozenTrial]) -> dict[int, FrozenTrial]:
    """The newest trial of each chain (an original and its re-queued copies)."""
    latest: dict[int, FrozenTrial] = {}
    for t in trials:
        root = claims.root_number(t)
        if root not in latest or t.number > latest[root].number:
            latest[root] = t
    return latest


def collect(spec: Spec, study: optuna.Study, runs: list[Run]) -> list[RunResult]:
    """Every run of the sweep with its state and numbers, in the sweep's order."""
    budget = spec.file.n_trials if spec.mode == "search" else None
    chains = latest_by_root(legit_trials(study, budget))
    results = []
    if spec.mode != "search":
        by_slot = {t.user_attrs.get(claims.SLOT): t for t in chains.values()}
        order = {p.label: i for i, p in enumerate(spec.points)}  # labels are unique (spec)
        for run in sorted(runs, key=lambda r: (order[r.point.label], r.seed)):
            result = read_run(run, run.folder(spec))
            _set_state(result, by_slot.get(run.key))
            results.append(result)
        return results
    for trial in sorted(chains.values(), key=claims.root_number):
        if not trial.params:  # asked, but nothing sampled yet
            continue
        try:
            point = spec.search_point(trial.params)
            trial_runs = build_runs(spec, [point])
        except Exception as err:  # broad on purpose: the other trials' report is still written
            # A sampled config that does not build (its trial failed with the same message
            # when it ran), or a trial this sweep file cannot read back: it has no runs to
            # show, so it is named here instead.
            log.warning(
                "optuna trial %d: left out of the report, its runs cannot be built from "
                "its parameters %s: %s: %s",
                trial.number, trial.params, type(err).__name__, err,
            )  # fmt: skip
            continue
        blamed = False  # a failed trial stopped at its first unfinished run: that one failed
        for run in trial_runs:
            result = read_run(run, run.folder(spec))
            _set_state(result, trial)
            if result.finished:
                result.state = "complete"
            elif result.state == "failed" and not blamed:
                blamed = True
            elif result.state in ("pruned", "failed", "complete") and not result.metrics:
                result.state, result.error = "not run", ""
            results.append(result)
    return results


def _set_state(result: RunResult, trial: FrozenTrial | None) -> None:
    if trial is None:
        return
    result.trial = trial.number
    result.state = STATES.get(trial.state, str(trial.state))
    result.error = str(trial.user_attrs.get(claims.ERROR, ""))


def finished_trials(study: optuna.Study, budget: int | None) -> int:
    """Trials that will not train any further, from the study alone (cheap: for the bar)."""
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(t.state in done for t in latest_by_root(legit_trials(study, budget)).values())
