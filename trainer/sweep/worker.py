"""``sdlora sweep``: one worker pulling trials from the study until the sweep is done.

Every worker (one machine, one per GPU, many machines) runs this same loop:

1. take over the trials of dead workers (``claims.take_over_dead``);
2. while a trial waits in the queue (or a [search] has budget left), run one through Optuna's
   ``Study.optimize`` (which pops it, keeps its heartbeat and records its result);
3. when nothing is left to start but other workers still run trials, wait, so that a trial
   whose worker dies is resumed here; stop when nothing runs any more.

A trial runs its runs (one per trial in a grid or list; one per seed in a [search]) as
ordinary training processes (``trainer/sweep/process.py``), reports each validation loss to
Optuna as it appears in ``metrics.jsonl``, and stops a run the pruner rejects with SIGTERM,
so it saves its checkpoint. Ctrl-C (or SIGTERM) stops the current run the same way and puts
its trial back in the queue, so the same command resumes it. With ``warm_workers`` (the
default) a single-process run is trained in the worker's own process instead, by the same
command's entry (``trainer/sweep/warm.py``): the pruner is asked after every update, and a
signal reaches the run's own handlers, with the same outcomes.
"""

from __future__ import annotations

import signal
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import optuna
from tqdm.auto import tqdm

from trainer.config.load import ConfigError
from trainer.report.tracking import read_metrics
from trainer.run import checkpoint as ckpt
from trainer.run.trial import CACHE_ENV, LOCK_ENV
from trainer.sweep import claims, engine, expand, prefixes, process, report, results, warm
from trainer.sweep.expand import Run
from trainer.sweep.optuna_adapter import quiet_caught
from trainer.sweep.spec import Spec

POLL_S = 0.5
CACHE_DIR = "cache"  # in the sweep folder: the shared latent and text caches
IDLE_POLL_S = 2.0


class Skip(Exception):
    """A popped trial this worker must not run (see ``claims.claim_problem``)."""


class RunFailed(Exception):
    """A run's training process failed; the trial is marked failed with the message."""


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt


class Worker:
    """One worker process of a sweep."""

    def __init__(
        self,
        spec: Spec,
        launch: list[str],
        storage,
        study: optuna.Study,
        runs,
        entry: warm.Entry | None = None,
    ):
        self.spec, self.launch, self.storage, self.study = spec, launch, storage, study
        # Warm trials (trainer/sweep/warm.py): ``sdlora train``'s entry, called in this process
        # under the launcher's variables; None (cold: a process per trial) without an entry,
        # with warm_workers = false, or for launch flags that start several processes.
        self.entry = entry if spec.file.warm_workers else None
        self.warm_env = warm.launch_env(launch) if self.entry is not None else None
        self.runs = {r.key: r for r in runs} if spec.mode != "search" else {}
        self.all_runs = list(runs) if spec.mode != "search" else []
        self.budget = spec.file.n_trials if spec.mode == "search" else None
        self.space = engine.grid_space(spec) if spec.mode != "search" else {}
        self.me = claims.WorkerLock(spec.sweep_dir)
        self.current: int | None = None
        # The trials' shared latent and text caches (trainer/data/shared_cache.py).
        self.cache_dir = spec.sweep_dir / CACHE_DIR if spec.file.share_cache else None
        # Shared prefixes: stems trained once, trials forked from them (trainer/sweep/prefixes.py).
        self.forest = prefixes.Forest({}, {})
        if spec.mode != "search" and spec.file.share_prefixes:
            totals = prefixes.run_totals(self.all_runs, expand.launch_processes(launch))
            self.forest = prefixes.plan(self.all_runs, totals)
        self.failed: list[str] = []
        seeds = len(engine.seeds(spec))
        total = len(self.all_runs) if self.all_runs else spec.file.n_trials * seeds
        self.bar = tqdm(total=total, desc=spec.name, unit="run", dynamic_ncols=True)

    # ---------------------------------------------------------------- the loop

    def loop(self) -> int:
        """Run trials until the sweep is done; 0, 1 when a run failed, 130 when stopped."""
        quiet_caught(Skip, RunFailed)  # reported in the sweep's own status lines instead
        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
        try:
            while True:
                for number in claims.take_over_dead(
                    self.study, self.storage, self.spec.sweep_dir, self.me
                ):
                    self.say(f"trial {number}: its worker is gone; queued again to resume")
                self.refresh()
                trials = self.study.get_trials(deepcopy=False)
                waiting = any(t.state == optuna.trial.TrialState.WAITING for t in trials)
                fresh = sum(1 for t in trials if claims.is_fresh(t))
                if waiting or (self.budget is not None and fresh < self.budget):
                    self.study.optimize(
                        self.objective, n_trials=1, catch=(Skip, RunFailed), gc_after_trial=False
                    )
                    self.current = None
                    continue
                running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
                if not running:
                    break
                self.bar.set_postfix_str(f"waiting for {len(running)} trial(s) of other workers")
                time.sleep(IDLE_POLL_S)
        except KeyboardInterrupt:
            if self.current is not None:
                claims.hand_back(self.study, self.current)
            self.say("stopped; the interrupted run saved a checkpoint, and running the same "
                     "command again resumes the sweep")  # fmt: skip
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.refresh()
            self.bar.close()
            self.me.close()
        if self.failed:
            self.say(f"{len(self.failed)} run(s) failed: {', '.join(self.failed)}")
            return 1
        return 0

    def say(self, text: str) -> None:
        tqdm.write(text)

    def refresh(self) -> None:
        """Move the bar to the runs finished by every worker, as the study records them."""
        per_trial = 1 if self.spec.mode != "search" else len(engine.seeds(self.spec))
        self.bar.n = per_trial * results.finished_trials(self.study, self.budget)
        self.bar.refresh()

    # ---------------------------------------------------------------- one trial

    def objective(self, trial: optuna.Trial) -> float | list[float]:
        """Run the trial's runs; each objective's value is its mean over them (a list of
        two for a multi-objective study)."""
        self.current = trial.number
        trial.set_user_attr(claims.WORKER, self.me.info)
        trials = self.study.get_trials(deepcopy=False)
        frozen = next(t for t in trials if t.number == trial.number)
        problem = claims.claim_problem(frozen, trials, self.budget)
        if problem:
            trial.set_user_attr(claims.SKIPPED, problem)
            raise Skip(problem)
        values = []
        for i, run in enumerate(self.runs_of(trial, frozen)):
            value = self.execute(run, trial if i == 0 else None)
            if value is None:
                raise optuna.TrialPruned()
            values.append(value)
        means = [statistics.fmean(v) for v in zip(*values, strict=True)]
        return means[0] if len(means) == 1 else means

    def runs_of(self, trial: optuna.Trial, frozen) -> list[Run]:
        """The runs a trial stands for; records its parameters in the study."""
        if self.spec.mode != "search":
            run = self.runs[frozen.user_attrs[claims.SLOT]]
            for key in run.params:
                trial.suggest_categorical(key, self.space[key])
            return [run]
        params = {}
        for p in self.spec.search:
            if p.choices:
                params[p.key] = trial.suggest_categorical(p.key, p.choice_labels())
            elif p.is_int:
                low, high = p.bounds()  # ints; Optuna makes the step an int itself
                step = int(p.step or 1)
                params[p.key] = trial.suggest_int(p.key, int(low), int(high), step=step, log=p.log)
            else:
                params[p.key] = trial.suggest_float(p.key, *p.bounds(), step=p.step, log=p.log)
        point = self.spec.search_point(params)
        try:
            runs = expand.build_runs(self.spec, [point])
        except ConfigError as err:
            trial.set_user_attr(claims.ERROR, str(err))
            self.failed.append(point.label)
            self.say(f"failed   {point.label}: {err}")
            raise RunFailed(str(err)) from err
        return runs

    def execute(self, run: Run, reporting: optuna.Trial | None) -> list[float] | None:
        """Train one run to its end; its value on each objective, or None when pruned."""
        folder = run.folder(self.spec)
        try:
            prefixes.prepare(self.forest, run.key, folder, self.spec.sweep_dir, self.train_stem)
        except RunFailed as err:
            if reporting is not None:
                reporting.set_user_attr(claims.ERROR, str(err))
            self.failed.append(run.name)
            self.status("failed", run, None, 0.0)
            raise
        args = process.train_args(self.spec.base, run.launch_flags(self.spec))
        self.bar.set_postfix_str(f"training {run.name}")
        reported: set[int] = set()  # the updates whose values Optuna has
        code, pruned, wall = self.train(args, folder, reporting, reported)
        if reporting is not None:
            self.report_values(reporting, folder, reported, prune=False)
        outcome = results.read_run(run, folder)
        values = [outcome.value(o) for o in self.spec.objectives]
        if outcome.finished and all(v is not None for v in values):
            self.status("complete", run, outcome.final_val, wall, values)
            return [float(v) for v in values if v is not None]
        if pruned:
            self.status("pruned", run, outcome.best_val, wall)
            return None
        message = process.log_tail(folder / process.LOG_NAME) or f"exit code {code}"
        if outcome.finished:  # the checks before the sweep make every run record its scores
            missing = [o.metric for o, v in zip(self.spec.objectives, values, strict=True)
                       if v is None]  # fmt: skip
            message = f"the run finished without recording {', '.join(missing)} at its end"
        if reporting is not None:
            reporting.set_user_attr(claims.ERROR, message)
        self.failed.append(run.name)
        self.status("failed", run, None, wall)
        self.say(f"  {folder / process.LOG_NAME}:\n" + _indent(message))
        raise RunFailed(message)

    def train_stem(self, stem: prefixes.Stem) -> None:
        """Train a shared prefix to its branch point (``--stop-at``), as a run (warm or cold); a
        stem another worker trains is waited for on its run lock, then found at its end."""
        folder = stem.folder(self.spec.sweep_dir)
        flags = stem.launch_flags(self.spec.sweep_dir)
        args = [*process.train_args(self.spec.base, flags), "--stop-at", str(stem.end)]
        self.bar.set_postfix_str(f"training the shared prefix {stem.key}")
        code, _, wall = self.train(args, folder, None, set())
        if code != 0 or ckpt.verify(ckpt.step_dir(folder, stem.end)):
            message = process.log_tail(folder / process.LOG_NAME) or f"exit code {code}"
            self.say(f"  {folder / process.LOG_NAME}:\n" + _indent(message))
            raise RunFailed(f"the shared prefix {stem.key} failed: {message}")
        shown = f"updates {stem.start}-{stem.end}, {len(stem.members)} runs"
        self.say(f"{'prefix':9} {stem.key:48} {shown:16} {wall:7.1f} s")

    def train(
        self, args: list[str], folder: Path, reporting: optuna.Trial | None, reported: set[int]
    ) -> tuple[int, bool, float]:
        """Train one run (``train.py ARGS``) into ``folder``, warm or cold; its exit status,
        whether the pruner stopped it, and its wall time (added to ``sweep_run.json``)."""
        if self.entry is not None and self.warm_env is not None:
            return self.train_warm(args, folder, reporting, reported)
        return self.train_cold(args, folder, reporting, reported)

    def train_cold(
        self, args: list[str], folder: Path, reporting: optuna.Trial | None, reported: set[int]
    ) -> tuple[int, bool, float]:
        """The run as its own training process; Optuna gets its values as they appear."""
        cmd = process.launch_command(self.launch, args)
        proc = process.start(cmd, folder, self.spec.sweep_dir / "locks", self.cache_dir)
        pruned = False
        try:
            while proc.poll() is None:
                time.sleep(POLL_S)
                if reporting is not None and self.report_values(reporting, folder, reported):
                    pruned = True
                    process.request_stop(proc)
                    break
            code = process.wait(proc)
        except KeyboardInterrupt:
            self.say(f"stopping {folder.name}: finishing its update and saving a checkpoint "
                     "(Ctrl-C again to stop at once)")  # fmt: skip
            try:
                process.request_stop(proc)
                process.wait(proc)
            except KeyboardInterrupt:
                process.kill(proc)
            results.add_wall_time(folder, time.monotonic() - proc.started)
            raise
        return code, pruned, results.add_wall_time(folder, time.monotonic() - proc.started)

    def train_warm(
        self, args: list[str], folder: Path, reporting: optuna.Trial | None, reported: set[int]
    ) -> tuple[int, bool, float]:
        """The run in this process (``trainer/sweep/warm.py``); the pruner is asked after
        every update, and stops the run with a checkpoint as its SIGTERM would. A signal to
        the worker stops the run the same way (its own handlers), then the worker."""
        assert self.entry is not None and self.warm_env is not None
        pruned = False

        def watch(record: Mapping) -> bool:
            nonlocal pruned
            if reporting is not None and self.report_values(reporting, folder, reported):
                pruned = True
            return pruned

        locks = self.spec.sweep_dir / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        env = {**self.warm_env, LOCK_ENV: str(locks / f"{folder.name}.lock")}
        if self.cache_dir is not None:
            env[CACHE_ENV] = str(self.cache_dir)
        started = time.monotonic()
        try:
            code = warm.run_trial(self.entry, args, folder / process.LOG_NAME, env, watch)
        finally:
            wall = results.add_wall_time(folder, time.monotonic() - started)
        if code == 130 and not pruned:  # a signal stopped it; its checkpoint is saved
            raise KeyboardInterrupt
        return code, pruned, wall

    def report_values(
        self, trial: optuna.Trial, folder: Path, reported: set[int], prune: bool = True
    ) -> bool:
        """Report the objective's new intermediate values to Optuna (a multi-objective
        study takes none: Optuna prunes on one); True when the pruner stops the trial."""
        if len(self.spec.objectives) != 1:
            return False
        metric = self.spec.objectives[0].metric
        for record in read_metrics(folder):
            step = int(record["step"])
            if metric in record and step not in reported:
                trial.report(float(record[metric]), step)
                reported.add(step)
                if prune and trial.should_prune():
                    return True
        return False

    def status(
        self, state: str, run: Run, value: float | None, wall: float, values: Sequence = ()
    ) -> None:
        shown = "" if value is None else f"val {value:.6f}"
        # A failed or pruned run has no values (an empty ``values``), so no scores to show.
        scores = [f"{o.name} {v:.4f}" for o, v in zip(self.spec.objectives, values, strict=True)
                  if o.score and v is not None] if values else []  # fmt: skip
        self.say(f"{state:9} {run.name:48} {shown:16} {wall:7.1f} s" + "".join(
            f"  {s}" for s in scores))  # fmt: skip


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())


def run(
    spec: Spec,
    launch: list[str],
    storage_url: str | None,
    report_only: bool = False,
    retry_failed: bool = False,
    problems: Sequence[str] = (),
    entry: Callable[[list[str]], int] | None = None,
) -> int:
    """``sdlora sweep``: check every trial, run this worker, write the report.

    Args:
        problems: The sweep file's own problems (``spec.read``), reported with the others.
        entry: ``sdlora train``'s entry, to run single-process trials in this process
            (``warm_workers``); None runs each trial as its own process.

    Returns:
        0 when the sweep is done; 1 when a run of it failed (here or in an earlier attempt)
        and was not queued again; 130 when stopped.
    """
    engine.quiet_optuna()
    # Everything the sweep file, the storage URL and every run can get wrong is found here,
    # before the storage is opened: nothing below may fail on them once the study records
    # this sweep's fingerprint.
    found = [*problems, *engine.storage_problems(storage_url)]
    runs = expand.check(spec, launch, found)
    storage = engine.open_storage(storage_url, spec.sweep_dir, spec.file.heartbeat_seconds)
    where = str(spec.path)
    if report_only:
        study = engine.load_study(spec, storage)
        return 1 if _report(spec, study, runs) else 0
    study = engine.open_study(spec, storage)
    claims.check_fingerprint(study, sweep_fingerprint(spec, runs), where)
    if spec.mode != "search":
        claims.enqueue_missing(study, runs)
    if retry_failed:
        for number in claims.retry_failed(study):
            tqdm.write(f"trial {number}: failed before; queued again")
    code = Worker(spec, launch, storage, study, runs, entry).loop()
    failed = _report(spec, study, runs)
    return 1 if code == 0 and failed else code


def sweep_fingerprint(spec: Spec, runs: list[Run]) -> str:
    """What the sweep trains: its runs' folders (a grid or list), or its search definition."""
    if spec.mode != "search":
        return claims.fingerprint(sorted(r.key for r in runs))
    definition = {
        "base": str(spec.base.read_text()),
        "set": spec.common,
        "search": [p.__dict__ for p in spec.search],
        "seeds": engine.seeds(spec),
    }
    return claims.fingerprint(definition)


def _report(spec: Spec, study: optuna.Study, runs: list[Run]) -> list[results.RunResult]:
    """Write the report; name the failed runs and how to retry them. Returns the failed runs."""
    collected = results.collect(spec, study, runs if spec.mode != "search" else [])
    page, verdict = report.write(spec, collected)
    tqdm.write(f"{verdict.text}\nreport: {page}")
    failed = [r for r in collected if r.state == "failed"]
    if failed:
        lines = [f"{len(failed)} run(s) of this sweep failed; their logs:"]
        for r in failed:
            trial = "" if r.trial is None else f" (optuna trial {r.trial})"
            lines.append(f"  {r.run.name}{trial}: {r.folder / process.LOG_NAME}")
        lines.append(
            "fix the cause, then run the same command with --retry-failed to train them again"
        )
        tqdm.write("\n".join(lines), file=sys.stderr)
    return failed
