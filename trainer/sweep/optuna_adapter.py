"""The few places where the sweep leans on more than Optuna's stable API, all in one module.

Everything else in ``trainer/sweep/`` uses Optuna's public, non-experimental API. What is
here was checked against Optuna :data:`CHECKED_WITH`; ``tests/test_sweep_optuna.py`` pins
that version to the one in ``requirements/cpu.lock`` and exercises each item (the heartbeat
with a real dead worker in ``tests/test_sweep_spec.py``), so an upgrade that changes one of
them fails there, not in a sweep:

- **The heartbeat** of the RDB storage (experimental): ``RDBStorage``'s
  ``heartbeat_interval``, ``grace_period`` and ``heartbeat_stale_trial_callback``, and
  ``optuna.storages.fail_stale_trials``, which fails the trials silent for the grace period
  and runs the callback for each.

- **Copying a trial back into the queue** (a dead worker's, a stopped one's, a failed one
  with ``--retry-failed``): Optuna's ``RetryHeartbeatStaleTrialCallback`` (experimental).
  The RDB storage runs it itself for trials its heartbeat finds stale; for the journal
  storage (no heartbeat) and the other two cases we call it ourselves, so that every copy is
  made the same way. It copies the trial whole: parameters, user attributes, and the values
  ``Study.enqueue_trial`` queued it with, which the public API offers no way to read back
  (a trial that died before asking for them has them nowhere else).
- **Reading a copy's ancestry**: the callback's own accessors ``retried_trial_number`` and
  ``retry_history`` (experimental; they read the ``failed_trial`` / ``retry_history``
  system attributes the callback writes).
- **Quieting caught objective errors**: ``Study.optimize`` logs every exception it catches,
  with its traceback, on the logger of its private module ``optuna.study._optimize``.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial

CHECKED_WITH = "5.0.0"
OPTIMIZE_LOGGER = "optuna.study._optimize"

# One instance for every copy: the RDB storage's heartbeat and our own calls alike.
# max_retry=None: a run is resumed however often its worker dies. Its experimental status is
# this module's business (and its test's), not a warning at every import.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    _COPY = RetryHeartbeatStaleTrialCallback(max_retry=None)


def heartbeat_options(interval: int, grace: int) -> dict[str, Any]:
    """``RDBStorage`` keyword arguments for Optuna's heartbeat: a running trial beats every
    ``interval`` seconds; one silent for ``grace`` seconds is failed by :func:`fail_stale`,
    which queues a copy of it (:func:`queue_copy`)."""
    return {
        "heartbeat_interval": interval,
        "grace_period": grace,
        "heartbeat_stale_trial_callback": _COPY,
    }


def fail_stale(study: optuna.Study) -> None:
    """Fail the study's trials whose heartbeat stopped, and queue a copy of each; nothing for
    a storage without a heartbeat."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def queue_copy(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a WAITING copy of a finished (failed) trial: same values, same attributes."""
    _COPY(study, trial)


def root_number(trial: FrozenTrial) -> int:
    """The trial a copy descends from (its chain's first); the trial itself for an original."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        root = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return trial.number if root is None else int(root)


def copied_numbers(trial: FrozenTrial) -> list[int]:
    """The trials of a copy's chain before it, oldest first; empty for an original."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return list(RetryHeartbeatStaleTrialCallback.retry_history(trial))


class _DropCaught(logging.Filter):
    def __init__(self, types: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.types = types

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, self.types)


def quiet_caught(*types: type[BaseException]) -> None:
    """Drop Optuna's log record (and traceback) for each objective exception of these types
    that ``Study.optimize(catch=...)`` catches: the sweep reports them in its own lines."""
    logger = logging.getLogger(OPTIMIZE_LOGGER)
    if not any(isinstance(f, _DropCaught) and f.types == types for f in logger.filters):
        logger.addFilter(_DropCaught(types))
