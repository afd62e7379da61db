"""Which worker runs which trial: Optuna's queue, one rule against duplicates, and taking over
the trials of dead workers.

**Handing out trials.** Every run of a grid or trial list is put in the study's queue with
``Study.enqueue_trial``: a WAITING trial that carries its run's values (its parameters,
which the trial gets when it asks for them) and its run's folder name (the user attribute
``sdlora_slot``). ``Study.ask`` pops a WAITING trial atomically: the storage lets exactly one
worker move it to RUNNING. No sampler picks grid points: two workers asking a sampler at the
same moment could get the same point.

**Duplicates.** Two workers started at the same moment may both enqueue the runs of a new
study. Trial creation is serialized by the storage (the journal's log order; the RDB locks the
study row), and a queued trial carries its slot from the moment it exists, so "the
lowest-numbered queued trial of a slot" is the same for every worker, at any time: only that
one is run; a worker that pops another marks it failed (``sdlora_skipped``) and moves on.
For ``[search]``, the first ``n_trials`` sampled (fresh) trials count, in number order.

Why not Optuna's ``MaxTrialsCallback`` for ``n_trials``: it runs after a trial *finishes*
and then stops the study, so it cannot refuse a trial that is starting. Every worker that
asks while the last trial of the budget runs starts one more (n_trials + workers - 1 in all,
optuna/optuna#3518), and it counts trials by state, so it cannot tell a sampled trial from a
skipped duplicate or a re-queued copy of a dead worker's trial. Numbering the fresh trials
(:class:`Claims`) gives every worker the same answer, before it trains anything.

**Dead workers.** A trial whose worker died is failed (``Study.tell``) and a copy of it is
queued (``optuna_adapter.queue_copy``: its parameters and attributes in a new WAITING trial
that any worker pops); the run resumes from its checkpoint. Only the worker whose
RUNNING→FAIL update succeeds (the storage refuses a second one) creates the copy, so a dead
trial is re-queued once. A copy is legitimate when the trial it descends from was. How death
is detected:

- RDB storage: Optuna's heartbeat. Each worker's running trial gets a heartbeat every
  ``heartbeat_seconds``; Optuna's ``fail_stale_trials`` fails trials silent for longer than
  the grace period, and the storage queues their copies itself.
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
from optuna.trial import FrozenTrial, TrialState

from trainer.config.load import ConfigError
from trainer.sweep.optuna_adapter import copied_numbers, fail_stale, queue_copy, root_number

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


def enqueue_missing(study: optuna.Study, runs: Sequence) -> int:
    """Queue every run that has no trial yet; return how many were queued.

    A queued trial is created with its run's values (the trial gets them when it asks) and
    its run's folder name (``sdlora_slot``), both written when the trial is created.
    """
    have = {t.user_attrs.get(SLOT) for t in study.get_trials(deepcopy=False)}
    queued = 0
    for run in runs:
        if run.key not in have:
            study.enqueue_trial(run.params, user_attrs={SLOT: run.key})
            queued += 1
    return queued


def is_queued(t: FrozenTrial) -> bool:
    return SLOT in t.user_attrs and root_number(t) == t.number


def is_fresh(t: FrozenTrial) -> bool:
    """Created by ``ask`` with nothing queued: a [search]'s sampled trial (or a grid's
    surplus one, created when another worker popped the last queued trial first)."""
    return SLOT not in t.user_attrs and root_number(t) == t.number


class Claims:
    """Which trials of a study may run, indexed once (linear in the number of trials).

    Args:
        trials: Every trial of the study, in number order (as ``Study.get_trials`` gives).
        budget: ``n_trials`` of a [search]; None for a grid or trial list.
    """

    def __init__(self, trials: Sequence[FrozenTrial], budget: int | None) -> None:
        self.budget = budget
        self.by_number = {t.number: t for t in trials}
        self.first_of_slot: dict[str, int] = {}  # slot → its lowest-numbered queued trial
        self.fresh_rank: dict[int, int] = {}  # fresh trial → how many fresh ones precede it
        for t in trials:
            if is_queued(t):
                slot = t.user_attrs[SLOT]
                self.first_of_slot[slot] = min(self.first_of_slot.get(slot, t.number), t.number)
            elif is_fresh(t):
                self.fresh_rank[t.number] = len(self.fresh_rank)

    def problem(self, trial: FrozenTrial) -> str | None:
        """Why ``trial`` must not run (None: it is this trial's turn)."""
        original = self.by_number.get(root_number(trial), trial)
        if is_queued(original):
            first = self.first_of_slot.get(original.user_attrs[SLOT], original.number)
            if first != original.number:
                return (
                    f"a second queued copy of trial {first} (two workers queued the runs at once)"
                )
            return None
        budget = self.budget
        if is_fresh(original) and budget is not None:
            if self.fresh_rank.get(original.number, budget) < budget:
                return None
            return f"beyond n_trials = {budget} (another worker sampled the last one meanwhile)"
        return "not a trial of this sweep (the queue was empty when it was asked for)"


def claim_problem(
    trial: FrozenTrial, trials: Sequence[FrozenTrial], budget: int | None
) -> str | None:
    """Why this worker must not run ``trial`` (None: it is this trial's turn).

    Args:
        trial: The trial just popped or created.
        trials: Every trial of the study, in number order.
        budget: ``n_trials`` of a [search]; None for a grid or trial list.
    """
    return Claims(trials, budget).problem(trial)


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
        fail_stale(study)  # and queues their copies
        after = {t.number for t in study.get_trials(states=(TrialState.FAIL,))}
        return sorted(after - before)
    taken = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        info = t.user_attrs.get(WORKER)
        if info is None:
            started = t.datetime_start
            dead = started is not None and datetime.now(started.tzinfo) - started > UNOWNED_GRACE
        elif info.get("id") == me.id:
            continue
        else:
            dead = _worker_alive(sweep_dir, info) is False
        if dead and requeue(study, t.number):
            taken.append(t.number)
    return taken


def requeue(study: optuna.Study, number: int) -> bool:
    """Fail a RUNNING trial and queue a copy of it, once: only the worker whose RUNNING→FAIL
    update the storage accepts makes the copy. ``Study.tell`` refuses a trial it reads as
    finished (ValueError), and the storage one that another worker finished meanwhile."""
    try:
        failed = study.tell(number, state=TrialState.FAIL)
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
        return False
    queue_copy(study, failed)
    return True


def _trial(study: optuna.Study, number: int) -> FrozenTrial:
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def hand_back(study: optuna.Study, number: int) -> None:
    """Re-queue a trial this worker stopped (Ctrl-C, SIGTERM) so any worker resumes it."""
    trial = _trial(study, number)
    if trial.state == TrialState.RUNNING:
        requeue(study, number)
    elif trial.state == TrialState.FAIL:  # Study.optimize failed it on the way out
        queue_copy(study, trial)


def retry_failed(study: optuna.Study) -> list[int]:
    """Queue one copy of every failed trial that was run (not skipped) and not re-queued yet."""
    trials = study.get_trials(deepcopy=False)
    requeued = {n for t in trials for n in copied_numbers(t)}
    done = []
    for t in trials:
        if t.state == TrialState.FAIL and SKIPPED not in t.user_attrs and t.number not in requeued:
            queue_copy(study, t)
            done.append(t.number)
    return done
