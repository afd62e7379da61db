"""Warm trials: a sweep worker runs its single-process trials inside its own process.

A cold trial is ``sdlora launch ... train.py ...``, a fresh interpreter that pays the imports
(torch, diffusers) and the model loading again; on a small model that is most of a trial's
wall time. A warm trial calls the same entry the training process calls (``sdlora train``
with the same arguments, handed in by the command layer as ``Entry``) in the worker's own
process, under the setup ``accelerate launch`` gives that process:

- the environment the simple launcher prepares from the sweep's launch flags (accelerate's own
  ``prepare_simple_launcher_cmd_env``), with the run lock and the shared cache variables of
  ``trainer/run/trial.py``, and torch's thread count set to its ``OMP_NUM_THREADS``
  (``--num_cpu_threads_per_process``);
- ``sys.argv`` as ``train.py`` sees it, stdout, stderr and the log records going to the run's
  ``train.log``;
- the frozen base model loaded once, each trial getting a deep copy of it
  (``trainer/models/pristine.py``);
- the SIGINT/SIGTERM handlers, environment, thread count and log handlers restored after,
  however the run ends. A run that raises is an exit status 1 with its traceback in
  ``train.log``, as the same error ends a training process.

Accelerate's per-run singletons are reset by ``loop.make_accelerator`` at every run; its
``PartialState`` (the device and process group) is kept, which is the same for every trial
since every trial of a sweep has the same launch flags. Launch flags that start more than one
process (or any launcher but the simple one) keep the cold path: :func:`launch_env` is None.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from trainer.models import pristine
from trainer.run import trial
from trainer.sweep.process import TRAIN_PY

# ``sdlora train``'s own entry: its arguments (without "train") to its exit status.
Entry = Callable[[list[str]], int]
# The thread count a process of this machine starts with (torch's default here, before any
# trial changed it): what a launch without OMP_NUM_THREADS gives its training process.
_START_THREADS = torch.get_num_threads()
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # as ``sdlora``'s main sets it up


def launch_env(launch: Sequence[str]) -> dict[str, str] | None:
    """The variables ``accelerate launch`` with these flags sets for its one training process,
    or None when the flags start several processes or another launcher than the simple one
    (those trials stay cold)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import ComputeEnvironment
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    args = launch_command_parser().parse_args([*launch, str(TRAIN_PY)])
    args, defaults, _ = _validate_launch_command(args)
    special = (args.use_deepspeed, args.use_fsdp, args.use_megatron_lm, args.multi_gpu, args.tpu)
    if (any(special) and not args.cpu) or (args.num_processes or 1) > 1:
        return None
    if args.num_machines > 1 or args.mpirun_hostfile is not None or args.module:
        return None
    if defaults is not None and defaults.compute_environment == ComputeEnvironment.AMAZON_SAGEMAKER:
        return None
    _, env = prepare_simple_launcher_cmd_env(args)
    return {k: v for k, v in env.items() if os.environ.get(k) != v}


def run_trial(
    entry: Entry,
    args: list[str],
    log_path: Path,
    env: Mapping[str, str],
    watch: Callable[[Mapping[str, Any]], bool] | None = None,
) -> int:
    """Run ``sdlora train ARGS`` in this process as its own training process would; its exit
    status (1, with the traceback in the log, when it raises). ``env``: the launcher's
    variables and the sweep's (run lock, cache); ``watch``: called with every update's record,
    True stops the run with a checkpoint (pruning)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ (in the sweep worker's process) train.py {' '.join(args)}\n")
        log.flush()
        try:
            # The frozen model stays loaded between trials; each trial gets a copy of it.
            with _as_training_process(log, env, args), trial.watching(watch), pristine.kept():
                return entry(args)
        except Exception:
            log.write(traceback.format_exc())
            return 1
        finally:
            log.flush()
            gc.collect()  # the trial's models, before the next trial loads its own


@contextlib.contextmanager
def _as_training_process(log, env: Mapping[str, str], args: list[str]) -> Iterator[None]:
    saved_env, saved_argv, threads = dict(os.environ), sys.argv, torch.get_num_threads()
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    try:
        for name in (trial.PIDS_ENV, trial.CACHE_ENV):  # no pids to signal; cache: in env
            os.environ.pop(name, None)
        os.environ.update(env, PYTHONUNBUFFERED="1")
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or _START_THREADS))
        sys.argv = [str(TRAIN_PY), *args]
        root.handlers, root.level = [handler], logging.INFO
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        root.handlers, root.level = saved_handlers, saved_level
        sys.argv = saved_argv
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(saved_env)
        for sig, handler_ in saved_signals.items():
            if handler_ is not None:
                signal.signal(sig, handler_)
