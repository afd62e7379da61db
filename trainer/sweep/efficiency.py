"""What a sweep spent: updates trained against a from-scratch sweep's, training against wall time.

Read from the run folders alone, so a report rewritten later (or by another worker) says the
same. For each folder (every trial's, and every shared prefix's in ``stems/``):

- the updates it trained itself: its last recorded update, less the update it was forked at
  (``trainer/sweep/prefixes.py``; records before it are the stem's, copied);
- its training time: ``metrics.jsonl``'s ``elapsed`` (seconds in the training loop, summed
  over sessions), less the ``elapsed`` of the record at its fork;
- its wall time: the seconds its training processes ran, start-up and model loading included
  (``sweep_run.json``, written by the worker).

A from-scratch sweep trains each trial's updates in full. The training share is training
time over wall time: what start-up, loading and caches cost is the rest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer.report.tracking import read_metrics
from trainer.sweep import prefixes
from trainer.sweep.results import WALL_NAME, RunResult


@dataclass(frozen=True)
class Efficiency:
    """A sweep's cost, summed over its trials and shared prefixes."""

    trained: int  # updates trained (each shared one once)
    scratch: int  # updates the same trials trained from scratch would take
    train_s: float  # seconds in the training loops
    wall_s: float  # seconds the training processes ran

    def line(self) -> str:
        saved = 1 - self.trained / self.scratch if self.scratch else 0.0
        share = self.train_s / self.wall_s if self.wall_s else 0.0
        return (
            f"Efficiency: {self.trained} updates trained, against {self.scratch} for the same "
            f"trials trained from scratch ({saved:.0%} saved by shared prefixes); "
            f"{self.train_s:.1f} s of training in {self.wall_s:.1f} s of the runs' wall time "
            f"({share:.0%} spent training)."
        )


def own_work(folder: Path) -> tuple[int, float, float]:
    """(updates, training seconds, wall seconds) a run folder spent itself."""
    records = read_metrics(folder)
    fork = prefixes.fork_from(folder)
    updates = int(records[-1]["step"]) - fork if records else 0
    elapsed = [float(r.get("elapsed", 0.0)) for r in records]
    before = [float(r.get("elapsed", 0.0)) for r in records if r["step"] <= fork]
    train_s = (elapsed[-1] - (before[-1] if before else 0.0)) if elapsed else 0.0
    try:
        wall_s = float(json.loads((folder / WALL_NAME).read_text())["wall_s"])
    except (OSError, ValueError, KeyError):
        wall_s = 0.0
    return max(0, updates), max(0.0, train_s), wall_s


def measure(sweep_dir: Path, results: Sequence[RunResult]) -> Efficiency:
    """The efficiency of the runs in ``results`` and of the sweep's shared prefixes."""
    folders = [r.folder for r in results if r.metrics]
    stems = sorted(p for p in (sweep_dir / prefixes.STEMS_DIR).glob("*") if p.is_dir())
    spent = [own_work(f) for f in [*folders, *stems]]
    scratch = sum(int(r.metrics[-1]["step"]) for r in results if r.metrics)
    return Efficiency(
        trained=sum(s[0] for s in spent),
        scratch=scratch,
        train_s=sum(s[1] for s in spent),
        wall_s=sum(s[2] for s in spent),
    )
