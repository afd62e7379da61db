"""Shared prefixes: the updates trials share are trained once, and forking is exact.

References: each trial trained from scratch (the same config, its own run), which a forked
trial must equal bit for bit (LoRA and metrics.jsonl values); and the schedules' closed forms,
which say where two curves part.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import without_clock
from safetensors.torch import load_file

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
