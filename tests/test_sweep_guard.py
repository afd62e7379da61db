"""The training side of a sweep trial: one process per run folder at a time, and pids for
the worker to signal."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from sweep_helpers import REPO, environment

from trainer.run.trial import LOCK_ENV, PIDS_ENV

HOLDER = """
import sys, time
from trainer.run.trial import trial_process
with trial_process():
    open(sys.argv[1], "a").write(f"{sys.argv[2]} in\\n")
    time.sleep(float(sys.argv[3]))
    open(sys.argv[1], "a").write(f"{sys.argv[2]} out\\n")
"""


@pytest.mark.slow
def test_a_second_training_process_for_one_folder_waits_for_the_first(tmp_path):
    """A training process left running by a dead worker keeps its run folder; the process a
    new worker starts for the same run enters only after it has exited."""
    events, pids = tmp_path / "events", tmp_path / "pids"
    env = dict(environment(), **{LOCK_ENV: str(tmp_path / "run.lock"), PIDS_ENV: str(pids)})

    def start(name: str, hold: float) -> subprocess.Popen:
        args = [sys.executable, "-c", HOLDER, str(events), name, str(hold)]
        return subprocess.Popen(args, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)

    first = start("first", 1.5)
    while not events.exists():  # the first one holds the lock
        time.sleep(0.02)
    second = start("second", 0.0)
    _, err = second.communicate(timeout=60)
    assert first.wait(timeout=60) == 0 and second.returncode == 0
    assert events.read_text().split("\n")[:-1] == [
        "first in",
        "first out",
        "second in",
        "second out",
    ]
    assert "waiting for pid" in err and "which still trains into this run's folder" in err
    assert sorted(int(p) for p in pids.read_text().split()) == sorted([first.pid, second.pid])


def test_outside_a_sweep_it_does_nothing(tmp_path, monkeypatch):
    from trainer.run.trial import trial_process

    monkeypatch.delenv(LOCK_ENV, raising=False)
    monkeypatch.delenv(PIDS_ENV, raising=False)
    with trial_process():
        pass
    assert list(tmp_path.iterdir()) == []
