"""One run of a sweep as its own process: the normal training command, started and stopped.

A run is exactly what a user would type::

    sdlora launch [launch flags] train.py --config BASE --set k=v ... --resume latest

(started as ``python -m trainer.commands.launch``: ``accelerate launch`` whose failures end
with the run's own error, not a launcher traceback, since the tail of ``train.log`` is what
the sweep report shows for a failed run.)

``--resume latest`` makes every start of it safe: a fresh folder trains, an interrupted one
resumes exactly from its newest intact checkpoint, and a finished one says so and exits.

The run gets its own session (process group), so a Ctrl-C in the worker's terminal or a job
scheduler's SIGTERM to the worker's group reaches the worker alone; the worker then stops the
run itself, with one SIGTERM to each training process (see ``trainer/run/trial.py`` for
why not to the launchers). Its output goes to ``train.log`` in the run's folder, never to a
pipe: a training process that outlives a dead worker must not die writing to it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.run.trial import CACHE_ENV, LOCK_ENV, PIDS_ENV

# train.py, the ``accelerate launch`` target, lives at the repository root beside the package.
TRAIN_PY = Path(__file__).resolve().parents[2] / "train.py"
LOG_NAME = "train.log"


def command(launch: list[str], base: Path, flags: list[str]) -> list[str]:
    """The training command of one run.

    Args:
        launch: ``accelerate launch`` flags.
        base: The base config file.
        flags: ``table.key=value`` overrides, each passed as ``--set``.
    """
    return launch_command(launch, train_args(base, flags))


def launch_command(launch: list[str], args: list[str]) -> list[str]:
    """``sdlora launch [launch flags] train.py ARGS``, as a process to start."""
    return [sys.executable, "-m", "trainer.commands.launch", *launch, str(TRAIN_PY), *args]


def train_args(base: Path, flags: list[str]) -> list[str]:
    """``train.py``'s arguments of one run (a warm trial passes them to ``sdlora train``)."""
    sets = [part for flag in flags for part in ("--set", flag)]
    return ["--config", str(base), *sets, "--resume", "latest"]


@dataclass
class RunProcess:
    """A started run: its launcher process and the files it shares with the worker."""

    popen: subprocess.Popen
    pids_file: Path
    log_path: Path
    started: float

    def poll(self) -> int | None:
        """The launcher's exit code, or None while it runs."""
        return self.popen.poll()

    def training_pids(self) -> list[int]:
        """The training processes that registered themselves and are still in this run's
        session (a recycled pid of another program is never signalled)."""
        try:
            lines = self.pids_file.read_text().split()
        except OSError:
            return []
        alive = []
        for text in lines:
            pid = int(text)
            try:
                if os.getsid(pid) == self.popen.pid:
                    alive.append(pid)
            except ProcessLookupError:
                continue
        return alive


def start(
    cmd: list[str], run_dir: Path, lock_dir: Path, cache_dir: Path | None = None
) -> RunProcess:
    """Start a run's command in its own session, logging to ``run_dir/train.log``; with
    ``cache_dir``, the run reads and fills the sweep's shared caches there."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_dir.mkdir(parents=True, exist_ok=True)
    pids_file = lock_dir / f"{run_dir.name}.pids"
    pids_file.write_text("")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[LOCK_ENV] = str(lock_dir / f"{run_dir.name}.lock")
    env[PIDS_ENV] = str(pids_file)
    env.pop(CACHE_ENV, None)
    if cache_dir is not None:
        env[CACHE_ENV] = str(cache_dir)
    log_path = run_dir / LOG_NAME
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        popen = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )  # fmt: skip
    return RunProcess(popen, pids_file, log_path, time.monotonic())


def request_stop(proc: RunProcess, wait_for_registration: float = 120.0) -> None:
    """Ask the run to stop the way SIGTERM stops a run: finish the update, save, exit.

    Each training process gets exactly one SIGTERM. A run still starting (no training process
    registered yet) is waited for, since it has nothing to save until it trains.
    """
    deadline = time.monotonic() + wait_for_registration
    while proc.poll() is None:
        pids = proc.training_pids()
        if pids:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            return
        if time.monotonic() > deadline:
            kill(proc)
            return
        time.sleep(0.1)


def kill(proc: RunProcess) -> None:
    """Stop the whole run at once (SIGKILL to its session): nothing is saved."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.popen.pid, signal.SIGKILL)


def wait(proc: RunProcess) -> int:
    """Wait until the launcher and every training process of the run have exited."""
    code = proc.popen.wait()
    while proc.training_pids():
        time.sleep(0.1)
    return code


def log_tail(proc_log: Path, lines: int = 15) -> str:
    """The end of a run's log, preferring the trainer's own ``error:`` lines."""
    try:
        text = proc_log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    starts = [i for i, line in enumerate(text) if line.startswith("$ ")]
    text = text[starts[-1] + 1 :] if starts else text  # this attempt's lines only
    errors = [line for line in text if line.startswith("error:") or line.startswith("  - ")]
    return "\n".join((errors or text)[-lines:])
