"""``sdlora launch [accelerate launch flags] train.py --config FILE ...``

``accelerate launch`` with the same flags and the same processes, but a run that fails ends
with the run's own message and exit status, not with a traceback of the launcher.

Why a wrapper: the training processes already say what went wrong (``error: ...`` and exit
status 2 for a bad config, the resume command and 130 after Ctrl-C), and accelerate then adds
a traceback of its own that buries it:

- one process: ``subprocess.CalledProcessError`` for any non-zero exit, and a
  ``KeyboardInterrupt`` traceback on Ctrl-C; its ``--quiet`` flag turns the first into a bare
  exit status 1, for this launcher only (accelerate 1.x: "Only applicable to DeepSpeed and
  single-process configurations");
- several processes: accelerate hands them to torch's elastic agent (``torchrun``), which
  raises ``ChildFailedError`` for any non-zero exit and ``SignalException`` on Ctrl-C or
  SIGTERM, and accelerate re-raises both. No flag or environment variable of either turns
  that off, and a child cannot exit non-zero in a way they do not wrap.

So this module calls accelerate's own parser and ``launch_command`` in-process (every flag and
config file works as with ``accelerate launch``) and turns those exceptions into the exit
status of the process that failed, printing a line only for what no process said itself (a
process killed by a signal, e.g. by the kernel's OOM killer).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence

# What sweeps start their runs with (``python -m MODULE``); users type ``sdlora launch``.
MODULE = "trainer.commands.launch"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``accelerate launch`` with ``argv``; return the exit status of the run."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    parser = launch_command_parser()
    parser.prog = "sdlora launch"
    parser.usage = "sdlora launch [accelerate launch flags] train.py [train.py flags]"
    args = parser.parse_args(argv)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:  # one process (or DeepSpeed) exited non-zero
        return _status("train.py", err.returncode)
    except KeyboardInterrupt:
        # One process: Ctrl-C reached the training process too, which is now saving a
        # checkpoint and printing the resume command. Wait for it instead of leaving it
        # to write over the shell prompt; a second Ctrl-C still reaches it and stops it at once.
        return _wait_for_children(default=130)
    except Exception as err:
        status = _elastic_status(err)
        if status is None:
            raise
        return status
    return 0


def _status(what: str, returncode: int) -> int:
    """The shell's exit status for a process that ended with ``returncode`` (negative: killed
    by that signal); a line on stderr for a signal, since the process itself said nothing."""
    if returncode >= 0:
        return returncode
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    print(f"error: {what} was killed by {name}", file=sys.stderr, flush=True)
    return 128 - returncode


def _wait_for_children(default: int) -> int:
    """Reap every child process; the last one's exit status, or ``default`` without any."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    status = default
    try:
        while True:
            try:
                _, raw = os.waitpid(-1, 0)
            except ChildProcessError:
                return status
            status = _status("train.py", os.waitstatus_to_exitcode(raw))
    finally:
        signal.signal(signal.SIGINT, previous)


def _elastic_status(err: Exception) -> int | None:
    """The exit status for torch elastic's ``ChildFailedError`` / ``SignalException`` (several
    processes), or None for any other exception (a bug to show with its traceback)."""
    try:
        from torch.distributed.elastic.multiprocessing import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    except ImportError:  # a torch without torch.distributed never ran several processes
        return None

    if isinstance(err, SignalException):
        # The agent already passed the signal on to every training process and waited for
        # them; they printed their own lines (the resume command after Ctrl-C).
        return 128 + int(err.sigval)
    if not isinstance(err, ChildFailedError):
        return None
    failures = sorted(err.failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    # The process that exited on its own is the one with something to say; the others were
    # stopped by the agent after it. Without one, the first process killed by a signal.
    exited = [(rank, f) for rank, f in failures if f.exitcode > 0]
    rank, failure = (exited or failures)[0]
    return _status(f"train.py (rank {rank})", failure.exitcode)


if __name__ == "__main__":
    sys.exit(main())
