"""Shared prefixes: the updates trials share are trained once, and forking is exact.

References: each trial trained from scratch (the same config, its own run), which a forked
trial must equal bit for bit (LoRA and metrics.jsonl values); and the schedules' closed forms,
which say where two curves part.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import without_clock
from safetensors.torch import load_file
from sweep_helpers import LAUNCH, run_sweep, start, summary, sweep_command

import schedulers
from trainer.config import load as config
from trainer.config.load import ConfigError
from trainer.lora.files import WEIGHTS_NAME
from trainer.report.tracking import read_metrics
from trainer.run import checkpoint as ckpt
from trainer.run import loop, preflight
from trainer.run.resume import BRANCH_MARKER
from trainer.sweep import expand, prefixes, spec

WSD = '{ name = "warmup_stable_decay", warmup_steps = 2, decay_ratio = 0.25 }'
# Five trials of one seed: WSD at three run lengths, and two schedules that share only their
# warmup (2 updates of linear warmup, then the base LR at update 3 for every one of them).
TRIALS = [
    ("wsd-6", WSD, 6),
    ("wsd-10", WSD, 10),
    ("wsd-14", WSD, 14),
    ("linear", '{ name = "linear", warmup_steps = 2 }', 8),
    ("cosine", '{ name = "cosine", warmup_steps = 2 }', 8),
]


def write_sweep(folder: Path, model: Path, data: Path, trials=TRIALS, seeds=(0,), extra="") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.toml").write_text(
        f"""output_dir = "unused"
[model]
pretrained = "{model}"
[data]
path = "{data}"
resolution = 64
[train]
batch_size = 2
learning_rate = 1e-3
[output]
save_dtype = "fp32"
[validation]
fraction = 0.125
every_n_steps = 2
timesteps = 2
[checkpoint]
every_n_steps = 4
[logging]
tracker = "none"
"""
    )
    lines = ['base = "base.toml"', f"seeds = {list(seeds)}", extra, ""]
    for name, schedule, steps in trials:
        lines += ["[[trials]]", f'name = "{name}"', f"lr_scheduler = {schedule}"]
        lines += [f'"train.max_steps" = {steps}', ""]
    path = folder / "sweep.toml"
    path.write_text("\n".join(lines))
    return path


def runs_of(path: Path, out: Path) -> tuple[spec.Spec, list[expand.Run]]:
    sweep = spec.load(path, str(out))
    return sweep, expand.build_runs(sweep, sweep.points)


def forest_of(runs: list[expand.Run]) -> prefixes.Forest:
    return prefixes.plan(runs, prefixes.run_totals(runs, 1))


def stems_by_span(forest: prefixes.Forest) -> dict[tuple[int, int], set[str]]:
    names = {}
    for stem in forest.stems.values():
        names[(stem.start, stem.end)] = {key.split("-seed")[0] for key in stem.members}
    return names


# ---------------------------------------------------------------- the plan


def test_a_run_length_sweep_and_a_shared_warmup_make_a_tree_of_prefixes(
    tiny_model, tiny_data, tmp_path
):
    _, runs = runs_of(write_sweep(tmp_path, tiny_model, tiny_data), tmp_path / "out")
    forest = forest_of(runs)
    # WSD over n = total - 2 post-warmup updates holds the base LR for S = n - round(n / 4)
    # of them, and the decay's first update (p = 0) is at the base LR too: 6 updates hold it
    # through update 6 (shared up to 5, one short of the run), 10 through 9, 14 through 12.
    # Linear and cosine part from the others after update 3 (their first after warmup).
    assert stems_by_span(forest) == {
        (0, 3): {"wsd-6", "wsd-10", "wsd-14", "linear", "cosine"},
        (3, 5): {"wsd-6", "wsd-10", "wsd-14"},
        (5, 9): {"wsd-10", "wsd-14"},
    }
    where = {key.split("-seed")[0]: b.update for key, b in forest.branches.items()}
    assert where == {"linear": 3, "cosine": 3, "wsd-6": 5, "wsd-10": 9, "wsd-14": 9}
    totals = prefixes.run_totals(runs, 1)
    stems, tails = 3 + 2 + 4, 5 + 5 + 1 + 1 + 5
    assert forest.shared_updates(totals) == (stems + tails, 6 + 10 + 14 + 8 + 8)
    # The agreement is the closed form's: the first update where the curves differ.
    for stem in forest.stems.values():
        curves = [prefixes.lr_curve(r, totals[r.key]) for r in runs if r.key in stem.members]
        assert all(c[: stem.end] == curves[0][: stem.end] for c in curves)


def test_the_shipped_run_length_sweep_trains_each_shared_update_once():
    path = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "tiny_run_length.toml"
    _, runs = runs_of(path, Path("unused"))
    totals = prefixes.run_totals(runs, 1)
    forest = prefixes.plan(runs, totals)
    # WSD with 3 warmup updates and a quarter of the rest decaying holds the base LR through
    # update 12 - round(9 / 4) = 10 at 12 updates (and its decay's first update, 11, is at the
    # base LR too), through 20 at 24 updates: stems 0-11 and 11-20, per seed.
    assert sorted(stems_by_span(forest)) == [(0, 11), (11, 20)]
    assert len(forest.stems) == 6  # three seeds, one tree each
    per_seed = 11 + 9 + (12 - 11) + (24 - 20) + (48 - 20)
    assert forest.shared_updates(totals) == (3 * per_seed, 3 * (12 + 24 + 48))


def test_one_tree_per_seed(tiny_model, tiny_data, tmp_path):
    path = write_sweep(tmp_path, tiny_model, tiny_data, seeds=(0, 1))
    forest = forest_of(runs_of(path, tmp_path / "out")[1])
    assert len(forest.stems) == 6
    for stem in forest.stems.values():
        seeds = {key.split("-seed")[1].split("-")[0] for key in stem.members}
        assert seeds == {stem.key.split("-")[0].removeprefix("seed")}


def test_only_true_prefixes_share(tiny_model, tiny_data, tmp_path):
    # Another LR (anything but the schedule and length) never shares; nor do schedules whose
    # LRs differ at the first update (constant starts at the base LR, linear warmup at 0).
    trials = [
        ("wsd-6", WSD, 6),
        ("constant", '{ name = "constant" }', 8),
        ("warmup", '{ name = "linear", warmup_steps = 2 }', 8),
    ]
    path = write_sweep(tmp_path, tiny_model, tiny_data, trials)
    text = path.read_text().replace(
        '"train.max_steps" = 6', '"train.max_steps" = 6\n"train.learning_rate" = 5e-4'
    )
    path.write_text(text)
    forest = forest_of(runs_of(path, tmp_path / "out")[1])
    # wsd-6 (another LR) shares with nothing; constant and warmup differ at update 1.
    assert forest.stems == {} and forest.branches == {}
    base = schedulers.get("linear")(warmup_steps=2)
    assert base.lr(0, 8, 1e-3) != schedulers.get("constant")().lr(0, 8, 1e-3)


def test_agreement_is_capped_one_short_of_the_shorter_run():
    same = [[1.0]] * 5
    assert prefixes.agreement(same, same + [[1.0]] * 3) == 4
    assert prefixes.agreement([[1.0], [2.0]], [[1.0], [3.0], [3.0]]) == 1
    assert prefixes.agreement([[0.0]], [[1.0]]) == 0
    assert not math.isnan(prefixes.agreement([[math.nan]], [[math.nan]]))


# ---------------------------------------------------------------- forking is exact


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(a / WEIGHTS_NAME), load_file(b / WEIGHTS_NAME)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{a.name}: the LoRA differs"
    assert without_clock(read_metrics(a)) == without_clock(read_metrics(b))


def load(sweep: spec.Spec, flags, out: Path, *extra: str):
    sets = [*flags, f'output_dir="{out}"', 'checkpoint.resume="latest"', *extra]
    return config.load(sweep.base, sets)


@pytest.fixture(scope="module")
def scratch(tiny_model, tiny_data, tmp_path_factory) -> dict[str, Path]:
    """Every trial trained from scratch, in-process: the reference."""
    folder = tmp_path_factory.mktemp("scratch")
    sweep, runs = runs_of(write_sweep(folder, tiny_model, tiny_data), folder / "out")
    outs = {}
    for run in runs:
        outs[run.point.label] = folder / "runs" / run.key
        loop.run(load(sweep, run.flags, outs[run.point.label]))
    return outs


def test_forked_trials_equal_trials_trained_from_scratch(scratch, tiny_model, tiny_data, tmp_path):
    sweep, runs = runs_of(write_sweep(tmp_path, tiny_model, tiny_data), tmp_path / "out")
    forest = forest_of(runs)
    trained = []

    def train_stem(stem: prefixes.Stem) -> None:  # what the worker's process does, in-process
        trained.append(stem.key)
        folder = stem.folder(sweep.sweep_dir)
        loop.run(load(sweep, stem.run.flags, folder), stop_at=stem.end)

    for run in runs:
        folder = run.folder(sweep)
        branch = prefixes.prepare(forest, run.key, folder, sweep.sweep_dir, train_stem)
        assert branch is not None and prefixes.fork_from(folder) == branch.update
        assert json.loads((ckpt.step_dir(folder, branch.update) / BRANCH_MARKER).read_text())
        loop.run(load(sweep, run.flags, folder))
        assert_same_run(folder, scratch[run.point.label])
        # Every validation point is there, the shared ones too.
        steps = [r["step"] for r in read_metrics(folder) if "val_loss" in r]
        assert steps == sorted(
            {*range(2, run.config.train.max_steps + 1, 2), run.config.train.max_steps}
        )
    assert sorted(trained) == sorted(forest.stems)  # each stem trained once


def test_a_branch_point_refuses_any_other_change_and_disagreeing_lrs(
    scratch, tiny_model, tiny_data, tmp_path
):
    sweep, runs = runs_of(write_sweep(tmp_path, tiny_model, tiny_data), tmp_path / "out")
    forest = forest_of(runs)
    wsd6 = next(r for r in runs if r.point.label == "wsd-6")

    def train_stem(stem: prefixes.Stem) -> None:
        loop.run(load(sweep, stem.run.flags, stem.folder(sweep.sweep_dir)), stop_at=stem.end)

    folder = wsd6.folder(sweep)
    prefixes.prepare(forest, wsd6.key, folder, sweep.sweep_dir, train_stem)
    # Another LR is a change the branch does not accept without --allow-change.
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        preflight.check(load(sweep, wsd6.flags, folder, "train.learning_rate=5e-4"), 1)
    # A schedule whose LRs differ before the branch point is refused, naming the update:
    # constant applies the base LR at update 1, where the warmup applied 0.
    other = 'lr_scheduler={ name = "constant" }'
    with pytest.raises(ConfigError, match=r"at update 1 its schedule applied \[0.0\]"):
        preflight.check(load(sweep, wsd6.flags, folder, other), 1)
    # Without the marker it is an ordinary checkpoint: the schedule change needs the flag.
    (ckpt.step_dir(folder, 5) / BRANCH_MARKER).unlink()
    with pytest.raises(ConfigError, match="--allow-change"):
        preflight.check(load(sweep, wsd6.flags, folder), 1)


# ---------------------------------------------------------------- a whole sweep

# The tiniest run-length sweep: WSD at 4, 6 and 8 updates of one seed. Its tree: one stem to
# update 3 (where wsd-4 parts: its decay starts there), which goes on to update 5 (wsd-6).
RUN_LENGTHS = [("wsd-4", WSD, 4), ("wsd-6", WSD, 6), ("wsd-8", WSD, 8)]


def sweep_file(folder: Path, model: Path, data: Path, share: bool, warm: bool = True) -> Path:
    extra = f"launch = {LAUNCH}\nshare_prefixes = {str(share).lower()}"
    extra += "" if warm else "\nwarm_workers = false"  # a process per trial, its pid in locks/
    return write_sweep(folder, model, data, RUN_LENGTHS, extra=extra)


def lora_files(out: Path) -> dict[str, Path]:
    return {p.parent.name: p for p in sorted((out / "trials").glob(f"*/{WEIGHTS_NAME}"))}


@pytest.fixture(scope="module")
def unshared(tiny_model, tiny_data, tmp_path_factory) -> Path:
    """The reference: the run-length sweep with share_prefixes = false."""
    folder = tmp_path_factory.mktemp("unshared")
    plain = sweep_file(folder / "plain", tiny_model, tiny_data, share=False)
    run_sweep(sweep_command(plain, folder / "off"), folder / "off.log")
    assert not (folder / "off" / "stems").exists()
    return folder / "off"


@pytest.mark.slow
def test_a_sweep_with_shared_prefixes_equals_one_without_even_killed_mid_stem(
    unshared, tiny_model, tiny_data, tmp_path
):
    # Cold trials, against the warm reference: the killed stem is a process of its own.
    shared = sweep_file(tmp_path / "shared", tiny_model, tiny_data, share=True, warm=False)
    out = tmp_path / "on"
    # A machine losing power mid-stem: the worker and the stem's training process at once.
    worker = start(sweep_command(shared, out), tmp_path / "killed.log")
    deadline, pids = time.monotonic() + 300, []
    while not pids and time.monotonic() < deadline and worker.poll() is None:
        # A stem's training process has registered itself: it is training, or starting to.
        pids = [p for f in (out / "locks").glob("seed*.pids") for p in f.read_text().split()]
        time.sleep(0.01)
    assert pids, (tmp_path / "killed.log").read_text()[-3000:]
    groups = set()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(int(pid)))
    os.killpg(worker.pid, signal.SIGKILL)
    for group in groups:
        os.killpg(group, signal.SIGKILL)
    worker.wait()
    run_sweep(sweep_command(shared, out), tmp_path / "on.log")

    on, off = lora_files(out), lora_files(unshared)
    assert on.keys() == off.keys() and len(on) == 3
    for name in on:  # bitwise: the same bytes, header and all but the run's clock
        assert_same_run(on[name].parent, off[name].parent)
    # Each stem trained its stretch once: the tree's two stems, nothing else.
    stems = sorted(p.name for p in (out / "stems").iterdir() if p.is_dir())
    assert [s.split("-")[1:3] for s in stems] == [["0", "3"], ["3", "5"]]

    # The same summary as the uninterrupted sweep without sharing, but for the clock and where.
    def kept(rows):
        drop = ("wall_s", "folder", "optuna_trial")
        return {k: {c: v for c, v in r.items() if c not in drop} for k, r in rows.items()}

    assert kept(summary(out)) == kept(summary(unshared))
    logs = "".join(p.read_text() for p in (out / "trials").glob("*/train.log"))
    assert "shared prefix's branch point" in logs
    # The report's efficiency: the stems' 3 + 2 updates and the trials' own 1 + 1 + 3, against
    # 4 + 6 + 8 from scratch (the tree above, counted by hand).
    spent = {k: json.loads((o / "summary.json").read_text())["efficiency"] for k, o in
             (("on", out), ("off", unshared))}  # fmt: skip
    assert (spent["on"]["trained"], spent["on"]["scratch"]) == (10, 18)
    assert (spent["off"]["trained"], spent["off"]["scratch"]) == (18, 18)
    assert 0 < spent["off"]["train_s"] < spent["off"]["wall_s"]
    assert "10 updates trained, against 18" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_two_workers_train_each_stem_once(unshared, tiny_model, tiny_data, tmp_path):
    shared = sweep_file(tmp_path / "shared", tiny_model, tiny_data, share=True)
    out = tmp_path / "on"
    # Two workers of one sweep at once: both plan the same stems and claim them like trials.
    workers = [start(sweep_command(shared, out), tmp_path / f"w{i}.log") for i in range(2)]
    for i, worker in enumerate(workers):
        assert worker.wait(timeout=600) == 0, (tmp_path / f"w{i}.log").read_text()[-3000:]
    logs = "".join((tmp_path / f"w{i}.log").read_text().replace("\r", "\n") for i in range(2))
    stems = sorted(p.name for p in (out / "stems").iterdir() if p.is_dir())
    assert len(stems) == 2
    for stem in stems:  # trained by one worker, found done by the other
        assert (
            len([line for line in logs.splitlines() if line.startswith(f"prefix    {stem}")]) == 1
        )
    on, off = lora_files(out), lora_files(unshared)
    assert on.keys() == off.keys() and len(on) == 3
    for name in on:
        assert_same_run(on[name].parent, off[name].parent)
