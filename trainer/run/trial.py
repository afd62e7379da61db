"""The training side of a sweep trial: hold the run's lock, and say which process trains.

``sdlora train`` (and so ``train.py``) calls :func:`trial_process` around the whole run. It
does nothing unless a sweep worker started this process and set the two variables below
(``trainer/sweep/process.py`` sets them, importing their names from here: the training
command itself never imports the sweep package):

- ``SDLORA_SWEEP_RUN_LOCK``: a lock file of the run's folder. The training process itself
  (rank 0) holds an exclusive ``flock`` on it for its whole life, so a second process for the
  same folder waits until the first has exited, whoever started it. A worker that dies leaves
  its training process running (it finishes the run, or stops at a signal), and the worker
  that takes the trial over resumes only once that process is gone, so no folder is ever
  trained by two processes at once. The lock is released by the kernel when the process
  ends, however it ends.
- ``SDLORA_SWEEP_RUN_PIDS``: a file this process appends its pid to, so the worker can send
  SIGTERM to exactly the training processes (pruning, Ctrl-C) and not to the launchers around
  them: torchrun forwards a SIGTERM it gets to its workers, and a second SIGTERM means "stop
  now, without saving".
- ``SDLORA_SWEEP_CACHE``: the sweep's shared cache folder (:func:`shared_cache_dir`).

Only the standard library is imported: this runs in every training process.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

LOCK_ENV = "SDLORA_SWEEP_RUN_LOCK"
PIDS_ENV = "SDLORA_SWEEP_RUN_PIDS"
CACHE_ENV = "SDLORA_SWEEP_CACHE"

log = logging.getLogger("sdlora")

# A warm trial's pruning check (``trainer/sweep/warm.py``): a run in the worker's own process
# calls it with every update's record, and stops with a checkpoint when it returns True, as a
# cold trial's process stops at the SIGTERM its worker sends when Optuna prunes.
_watch: Callable[[Mapping[str, Any]], bool] | None = None


@contextlib.contextmanager
def watching(watch: Callable[[Mapping[str, Any]], bool] | None) -> Iterator[None]:
    """Make ``watch`` the check of the runs started in this process meanwhile."""
    global _watch
    previous, _watch = _watch, watch
    try:
        yield
    finally:
        _watch = previous


def current_watch() -> Callable[[Mapping[str, Any]], bool] | None:
    """The check :func:`watching` set, or None (a training process of its own)."""
    return _watch


def in_sweep() -> bool:
    """Whether a sweep worker started this run: its trials may run side by side on one
    machine (so each takes its own metrics port, ``trainer/report/prometheus.py``)."""
    return bool(os.environ.get(LOCK_ENV))


def shared_cache_dir() -> Path | None:
    """The sweep's shared cache folder (``SDLORA_SWEEP_CACHE``): the trials of a sweep read
    the latents and text-encoder outputs one of them encoded (``trainer/data/shared_cache.py``);
    None outside a sweep, or with ``share_cache = false``."""
    folder = os.environ.get(CACHE_ENV)
    return Path(folder) if folder else None


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def trial_process() -> Iterator[None]:
    """Register this process with its sweep worker and hold the run lock (rank 0) meanwhile.

    A no-op outside a sweep (neither variable set).
    """
    pids = os.environ.get(PIDS_ENV)
    if pids:
        # O_APPEND: the processes of one multi-GPU trial each add their own line.
        with open(pids, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
    lock_path = os.environ.get(LOCK_ENV)
    if not lock_path or not _is_rank_zero():
        yield
        return
    with open(lock_path, "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            log.warning("waiting for %s, which still trains into this run's folder", holder)
            fcntl.flock(lock, fcntl.LOCK_EX)
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        lock.flush()
        yield
