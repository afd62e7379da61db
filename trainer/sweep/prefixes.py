"""Shared prefixes: the updates several trials share are trained once, then each trial forks.

Every random draw of a run comes from counters (``trainer/data/order.py``), so two runs whose
configs differ only in the LR schedule and the run length, and whose applied LRs agree for
their first ``k`` updates, are the same run up to update ``k``, bit for bit. A warmup-stable-
decay sweep over run lengths, or schedules with the same warmup, share most of their updates.

**The plan** (:func:`plan`, before the sweep starts, the same on every worker): runs are
grouped by everything but ``[lr_scheduler]`` and the run length (``train.max_steps``,
``train.epochs``) and the keys that never change the weights (``resume.FREE_KEYS``); the
seed is part of it, so there is one tree per seed. Within a group, the agreement of two runs
is the number of leading updates at which every param group's LR is the same float, capped
one short of the shorter run (each run trains at least its last update, with its final
validation, itself). Agreement is an ultrametric (runs that agree with a third on ``k``
updates agree with each other on at least ``k``), so the group splits into a tree: a node's
runs agree up to its end, where they part into classes that agree further. Each node that
trains something is a **stem**: an ordinary run of one of its members' configs (the longest)
in ``stems/<key>/`` of the sweep folder, from its parent's branch point to its own end,
stopped there with ``--stop-at`` (a checkpoint at the branch point).

**Forking** (:func:`place`): a trial (or a child stem) gets a copy of the stem's checkpoint at
the branch point, hard links where the file system allows (checkpoints are never written in
place), marked with ``resume.BRANCH_MARKER``, and the stem's ``metrics.jsonl`` records and
sample images up to it. Its own training command then resumes with ``--resume latest``; the
resume rules accept the other schedule and length, and nothing else, without a flag, once
they have checked that the LRs agree (``trainer/run/resume.py``). So the validation points
before the branch are the trial's own too, and its curves are complete. A folder that already
holds a checkpoint or final outputs is never placed into again.

**Claiming a stem**: the worker that needs it holds ``stems/<key>.claim`` (an ``flock``) while
it places and trains it; another worker waits on that lock and then finds the stem at its
end. The stem's training process also holds the folder's run lock (``trainer/run/trial.py``):
when a worker is killed mid-stem its training process may live on, and the next worker's
command waits on the run lock, then resumes the stem from its newest checkpoint like any run
(or finds it at its end).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import load as run_config
from trainer.data.shared_cache import locked
from trainer.files import write_folder_atomic, write_json, write_text
from trainer.run import checkpoint as ckpt
from trainer.run import final
from trainer.run.resume import BRANCH_MARKER, FREE_KEYS, PREFIX_KEYS
from trainer.step_folders import numbered_folders
from trainer.sweep.expand import Run

STEMS_DIR = "stems"
PREFIX_NAME = "sweep_prefix.json"  # in a run folder that was forked: from where, at which update


@dataclass(frozen=True)
class Stem:
    """One shared stretch of training: ``start`` → ``end`` updates of ``run``'s config."""

    key: str  # its folder under stems/
    run: Run  # the member whose config it trains (any member's gives the same weights)
    start: int  # 0, or the parent stem's end, where it forks from the parent
    end: int  # where its members (and child stems) fork from it
    parent: str | None
    members: tuple[str, ...]  # the keys of the runs it serves

    def folder(self, sweep_dir: Path) -> Path:
        return sweep_dir / STEMS_DIR / self.key

    def launch_flags(self, sweep_dir: Path) -> list[str]:
        """Its training command's ``--set`` values: the member's, its own output_dir."""
        from trainer.sweep.overrides import toml_text

        return [*self.run.flags, f"output_dir={toml_text(str(self.folder(sweep_dir)))}"]


@dataclass(frozen=True)
class Branch:
    """Where a run forks: the stem, and the update (the stem's end)."""

    stem: str
    update: int


@dataclass(frozen=True)
class Forest:
    """Every stem of a sweep, and where each sharing run forks."""

    stems: dict[str, Stem]
    branches: dict[str, Branch]  # run key → its branch

    def path(self, stem: str) -> list[Stem]:
        """The stems from the root to ``stem``, in training order."""
        out = []
        key: str | None = stem
        while key is not None:
            out.append(self.stems[key])
            key = self.stems[key].parent
        return out[::-1]

    def shared_updates(self, totals: dict[str, int]) -> tuple[int, int]:
        """(updates the plan trains, updates a from-scratch sweep would train)."""
        scratch = sum(totals.values())
        trained = sum(s.end - s.start for s in self.stems.values())
        trained += sum(t - (self.branches[k].update if k in self.branches else 0)
                       for k, t in totals.items())  # fmt: skip
        return trained, scratch


# ---------------------------------------------------------------- the plan


def identity(run: Run) -> str:
    """Everything about a run but its schedule and length (and the keys that never change the
    weights): runs with the same identity can share a prefix."""
    flat = run_config.flatten(run.config.to_dict())
    prefix = tuple(f"{p}." for p in PREFIX_KEYS)
    kept = {
        k: v
        for k, v in flat.items()
        if not k.startswith(FREE_KEYS) and k not in PREFIX_KEYS and not k.startswith(prefix)
    }
    return json.dumps(kept, sort_keys=True, default=str)


def agreement(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> int:
    """How many leading updates two LR curves (every param group, per update) share exactly,
    capped one short of the shorter run."""
    limit = min(len(a), len(b)) - 1
    for update in range(max(0, limit)):
        if list(a[update]) != list(b[update]):
            return update
    return max(0, limit)


def lr_curve(run: Run, total: int) -> list[list[float]]:
    """Every param group's LR at every update of the run (the loop's own call)."""
    base = run.config.base_lrs()
    return [run.config.lr_scheduler.lrs(u, total, base) for u in range(total)]


def plan(runs: Sequence[Run], totals: dict[str, int]) -> Forest:
    """The stems and branches of a grid's or trial list's runs (see the module docstring).

    Args:
        runs: Every run of the sweep.
        totals: Each run's optimizer updates, by run key (as training derives them).
    """
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(identity(run), []).append(run)
    stems: dict[str, Stem] = {}
    branches: dict[str, Branch] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        curves = {r.key: lr_curve(r, totals[r.key]) for r in members}
        pairs = {(a.key, b.key): agreement(curves[a.key], curves[b.key])
                 for a in members for b in members if a.key < b.key}  # fmt: skip
        _grow(sorted(members, key=lambda r: r.key), 0, None, pairs, totals, stems, branches)
    return Forest(stems, branches)


def _grow(
    members: list[Run],
    start: int,
    parent: str | None,
    pairs: dict[tuple[str, str], int],
    totals: dict[str, int],
    stems: dict[str, Stem],
    branches: dict[str, Branch],
) -> None:
    """The subtree of ``members``, which agree (at least) on ``[0, start)``."""

    def k(a: Run, b: Run) -> int:
        return pairs[(a.key, b.key) if a.key < b.key else (b.key, a.key)]

    if len(members) < 2:
        if parent is not None:
            branches[members[0].key] = Branch(parent, start)
        return
    end = min(k(a, b) for i, a in enumerate(members) for b in members[i + 1 :])
    node = parent
    if end > start:  # a stretch they all share: one stem trains it
        rep = max(members, key=lambda r: (totals[r.key], r.key))
        digest = hashlib.sha256(
            json.dumps([sorted(r.key for r in members), start, end]).encode()
        ).hexdigest()[:8]
        node = f"seed{rep.seed}-{start}-{end}-{digest}"
        stems[node] = Stem(node, rep, start, end, parent, tuple(r.key for r in members))
    else:
        end = start
    classes: list[list[Run]] = []
    for run in members:  # those that agree beyond `end` stay together
        home = next((c for c in classes if k(c[0], run) > end), None)
        if home is None:
            classes.append([run])
        else:
            home.append(run)
    for cls in classes:
        _grow(cls, end, node, pairs, totals, stems, branches)


def run_totals(runs: Sequence[Run], processes: int) -> dict[str, int]:
    """Each run's optimizer updates, derived as training derives them (the data is read once
    per distinct data setting when a run's length is given in epochs)."""
    from trainer.data.feed import checked_examples
    from trainer.run.plan import plan_run

    examples: dict[str, Any] = {}
    totals = {}
    for run in runs:
        cfg = run.config
        if cfg.train.max_steps:
            totals[run.key] = cfg.train.max_steps
            continue
        data = json.dumps([cfg.to_dict()["data"], cfg.to_dict()["validation"]], sort_keys=True)
        if data not in examples:
            examples[data] = checked_examples(cfg, show_progress=False, decode=False)[0]
        totals[run.key] = plan_run(cfg, examples[data].groups, processes).total_updates
    return totals


# ---------------------------------------------------------------- forking


def started(folder: Path) -> bool:
    """Whether a run folder holds a checkpoint or final outputs (never placed into again)."""
    return bool(ckpt.step_folders(folder)) or (folder / final.MANIFEST_NAME).exists()


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


def place(source: Path, update: int, target: Path, stem_key: str) -> bool:
    """Fork ``target`` from the run in ``source`` at ``update``: its checkpoint there (marked as
    a branch point), its metrics records and sample images up to it. Returns False (placing
    nothing) when ``target`` has started already.

    The checkpoint goes last and atomically: a kill before it leaves a folder that is placed
    again; a kill after it, a run that resumes from it.
    """
    if started(target):
        return False
    checkpoint = ckpt.step_dir(source, update)
    problems = ckpt.verify(checkpoint)
    if problems:
        raise RuntimeError(f"shared prefix {source}: its branch point is unusable: {problems}")
    target.mkdir(parents=True, exist_ok=True)
    from trainer.report.tracking import METRICS_NAME, read_metrics

    records = [r for r in read_metrics(source) if r["step"] <= update]
    write_text(target / METRICS_NAME, "".join(json.dumps(r) + "\n" for r in records))
    for step, folder in numbered_folders(source / "samples"):
        if step <= update:
            copy = target / "samples" / folder.name
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(folder, copy, copy_function=_link_or_copy)
    write_json(target / PREFIX_NAME, {"stem": stem_key, "update": update})

    def write(tmp: Path) -> None:
        for path in checkpoint.iterdir():
            if path.is_file() and path.name != BRANCH_MARKER:
                _link_or_copy(path, tmp / path.name)
        marker = {"stem": stem_key, "update": update, "source": str(checkpoint)}
        (tmp / BRANCH_MARKER).write_text(json.dumps(marker) + "\n")

    write_folder_atomic(ckpt.step_dir(target, update), write)
    return True


def fork_from(folder: Path) -> int:
    """The update a run folder was forked at (0: it trained from scratch)."""
    try:
        return int(json.loads((folder / PREFIX_NAME).read_text())["update"])
    except (OSError, ValueError, KeyError):
        return 0


def prepare(
    forest: Forest,
    run_key: str,
    target: Path,
    sweep_dir: Path,
    train_stem: Callable[[Stem], None],
) -> Branch | None:
    """Make ``target`` (the run's folder) start at its branch point: train every stem on its
    path to its end (``train_stem``; a stem already there costs nothing), forking each from
    its parent, then fork the run. Returns its branch (None: it trains from scratch)."""
    branch = forest.branches.get(run_key)
    if branch is None or started(target):
        return branch
    for stem in forest.path(branch.stem):
        folder = stem.folder(sweep_dir)
        # The claim: one worker places and trains a stem, another waits here, then finds it
        # at its end. The kernel drops the lock of a killed worker; its training process, if
        # it outlives it, holds the stem's run lock, which the next command waits on.
        with locked(sweep_dir / STEMS_DIR / f"{stem.key}.claim"):
            if stem.parent is not None:
                parent = forest.stems[stem.parent]
                place(parent.folder(sweep_dir), stem.start, folder, parent.key)
            if ckpt.verify(ckpt.step_dir(folder, stem.end)):  # not at its end yet
                train_stem(stem)
    place(forest.stems[branch.stem].folder(sweep_dir), branch.update, target, branch.stem)
    return branch
