"""Which worker runs which trial: Optuna's queue, one rule against duplicates, and taking over
the trials of dead workers.

**Handing out trials.** Every run of a grid or trial list is put in the study's queue as a
WAITING trial that carries its run's folder name (the user attribute ``sdlora_slot``) and
its point of GridSampler's grid (``grid_id``, from which the sampler gives its values).
``Study.ask`` pops a WAITING trial atomically: the storage lets exactly one worker move it to
RUNNING. ``GridSampler`` alone would not do: it picks a grid
point per new trial, and two workers asking at the same moment can get the same point.

**Duplicates.** Two workers started at the same moment may both enqueue the runs of a new
study. Trial creation is serialized by the storage (the journal's log order; the RDB locks the
study row), and a queued trial carries its slot from the moment it exists, so "the
lowest-numbered queued trial of a slot" is the same for every worker, at any time: only that
one is run; a worker that pops another marks it failed (``sdlora_skipped``) and moves on.
For ``[search]``, the first ``n_trials`` sampled (fresh) trials count, in number order.

**Dead workers.** A trial whose worker died is failed and re-queued with Optuna's
``RetryHeartbeatStaleTrialCallback``, which copies its parameters and attributes into a new
WAITING trial that any worker pops; the run resumes from its checkpoint. Only the worker whose
RUNNING→FAIL update succeeds (the storage refuses a second one) creates the copy, so a dead
trial is re-queued once. A copy is legitimate when the trial it descends from
(``failed_trial``) was. How death is detected:

- RDB storage: Optuna's heartbeat. Each worker's running trial gets a heartbeat every
  ``heartbeat_seconds``; ``optuna.storages.fail_stale_trials`` fails trials silent for longer
  than the grace period.
- Journal file (one machine; the journal storage has no heartbeat): every worker holds an
  exclusive ``flock`` on ``workers/<id>.lock`` in the sweep folder for its whole life and
  records its id on the trial it runs. The kernel drops the lock the moment the process dies,
  however it dies, so a free lock on a RUNNING trial's worker file means its worker is gone.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from trainer.config.load import ConfigError

SLOT = "sdlora_slot"  # user attr of a queued trial: its run's folder name
WORKER = "sdlora_worker"  # user attr: the worker running the trial
SKIPPED = "sdlora_skipped"  # user attr of a trial popped but not run, and why
ERROR = "sdlora_error"  # user attr of a failed trial: the trainer's message
FINGERPRINT = "sdlora_fingerprint"  # study user attr: what the sweep trains
WORKERS_DIR = "workers"
# A RUNNING trial with no worker recorded after this long lost its worker between the pop and
# the first write (a window of milliseconds); give it back.
UNOWNED_GRACE = timedelta(seconds=60)


def check_fingerprint(study: optuna.Study, fingerprint: str, where: str) -> None:
    """Record what this sweep trains in a new study; refuse a study made by another sweep.

    Two workers of different sweeps racing on a new study both write; reading back after
    writing lets the one that lost see the other's value and stop.
    """
    if FINGERPRINT not in study.user_attrs:
        study.set_user_attr(FINGERPRINT, fingerprint)
    if study.user_attrs.get(FINGERPRINT) != fingerprint:
        raise ConfigError(
            [
                f"the study {study.study_name!r} in this storage was made by a sweep with "
                "other trials (its base config, overrides or seeds changed since); give this "
                "sweep its own name (name = '...' in the sweep file), or delete the old study "
                f"(optuna delete-study --study-name {study.study_name} --storage URL, or remove "
                "the sweep folder's journal)"
            ],
            where,
        )


def fingerprint(items: Any) -> str:
    """A short hash of plain data (the runs' folder names, or a search's definition)."""
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


def enqueue_missing(study: optuna.Study, runs: Sequence, space: dict[str, list]) -> int:
    """Queue every run that has no trial yet; return how many were queued.

    A queued trial carries what GridSampler itself would give it (``grid_id`` and
    ``search_space``), so the sampler supplies its values and counts it as visited, plus the
    run's folder name (``sdlora_slot``), all written when the trial is created.
    """
    from trainer.sweep.engine import grid_ids

    ids = grid_ids(space)
    have = {t.user_attrs.get(SLOT) for t in study.get_trials(deepcopy=False)}
    queued = 0
    for run in runs:
        if run.key in have:
            continue
        grid_id = ids[tuple(sorted(run.params.items()))]
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                system_attrs={"grid_id": grid_id, "search_space": space},
                user_attrs={SLOT: run.key},
            )
        )
        queued += 1
    return queued


def is_queued(t: FrozenTrial) -> bool:
    return SLOT in t.user_attrs and "failed_trial" not in t.system_attrs


def is_fresh(t: FrozenTrial) -> bool:
    """Created by ``ask`` with nothing queued: a [search]'s sampled trial (or a grid's
    surplus one, created when another worker popped the last queued trial first)."""
    return SLOT not in t.user_attrs and "failed_trial" not in t.system_attrs


def root_number(t: FrozenTrial) -> int:
    """The trial a re-queued copy descends from (itself for an original)."""
    return int(t.system_attrs.get("failed_trial", t.number))


def claim_problem(
    trial: FrozenTrial, trials: Sequence[FrozenTrial], budget: int | None
) -> str | None:
    """Why this worker must not run ``trial`` (None: it is this trial's turn).

    Args:
        trial: The trial just popped or created.
        trials: Every trial of the study.
        budget: ``n_trials`` of a [search]; None for a grid or trial list.
    """
    by_number = {t.number: t for t in trials}
    original = by_number.get(root_number(trial), trial)
    if is_queued(original):
        first = min(
            t.number
            for t in trials
            if is_queued(t) and t.user_attrs[SLOT] == original.user_attrs[SLOT]
        )
        if first != original.number:
            return f"a second queued copy of trial {first} (two workers queued the runs at once)"
        return None
    if is_fresh(original) and budget is not None:
        earlier = sum(1 for t in trials if is_fresh(t) and t.number < original.number)
        if earlier < budget:
            return None
        return f"beyond n_trials = {budget} (another worker sampled the last one meanwhile)"
    return "not a trial of this sweep (the queue was empty when it was asked for)"


class WorkerLock:
    """This worker's liveness for the journal storage: an exclusive flock held for life."""

    def __init__(self, sweep_dir: Path) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.info = {"id": self.id, "host": socket.gethostname(), "pid": os.getpid()}
        folder = sweep_dir / WORKERS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        # Opened by Python, so not inherited by the training processes: the lock dies with
        # this worker, not with a training process that outlives it.
        self._file = open(folder / f"{self.id}.lock", "w", encoding="utf-8")  # noqa: SIM115
        fcntl.flock(self._file, fcntl.LOCK_EX)
        self._file.write(json.dumps(self.info) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _worker_alive(sweep_dir: Path, info: dict) -> bool | None:
    """True/False for a worker of this machine; None when it runs elsewhere (unknowable)."""
    if info.get("host") != socket.gethostname():
        return None
    path = sweep_dir / WORKERS_DIR / f"{info.get('id')}.lock"
    try:
        with open(path, "a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        pass
    return False


def take_over_dead(study: optuna.Study, storage, sweep_dir: Path, me: WorkerLock) -> list[int]:
    """Fail and re-queue the RUNNING trials whose worker died; return their numbers."""
    if isinstance(storage, optuna.storages.RDBStorage):
        before = {t.number for t in study.get_trials(states=(TrialState.FAIL,))}
        optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(states=(TrialState.FAIL,))}
        return sorted(after - before)
    taken = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        info = t.user_attrs.get(WORKER)
        if info is None:
            started = t.datetime_start
            now = datetime.now(started.tzinfo) if started else None
            dead = started is not None and now - started > UNOWNED_GRACE
        elif info.get("id") == me.id:
            continue
        else:
            dead = _worker_alive(sweep_dir, info) is False
        if dead and requeue(study, storage, t):
            taken.append(t.number)
    return taken


def requeue(study: optuna.Study, storage, trial: FrozenTrial) -> bool:
    """Fail a RUNNING trial and queue a copy of it, once: only the worker whose RUNNING→FAIL
    update the storage accepts makes the copy."""
    try:
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    RetryHeartbeatStaleTrialCallback()(study, storage.get_trial(trial._trial_id))
    return True


def hand_back(study: optuna.Study, storage, trial_id: int) -> None:
    """Re-queue a trial this worker stopped (Ctrl-C, SIGTERM) so any worker resumes it."""
    trial = storage.get_trial(trial_id)
    if trial.state == TrialState.RUNNING:
        requeue(study, storage, trial)
    elif trial.state == TrialState.FAIL:
        RetryHeartbeatStaleTrialCallback()(study, trial)


def retry_failed(study: optuna.Study) -> list[int]:
    """Queue one copy of every failed trial that was run (not skipped) and not re-queued yet."""
    trials = study.get_trials(deepcopy=False)
    requeued = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    done = []
    for t in trials:
        if t.state == TrialState.FAIL and SKIPPED not in t.user_attrs and t.number not in requeued:
            RetryHeartbeatStaleTrialCallback()(study, t)
            done.append(t.number)
    return done
