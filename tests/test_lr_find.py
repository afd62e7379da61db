"""``sdlora lr-find``: the LR range test, through the trainer's own loop.

The references: a problem whose divergence point is known in closed form (plain SGD on a
quadratic of curvature L diverges above 2/L), the registered ramp's own values at every update
(the CSV holds the LRs the loop applied), and the moving average written out as the weighted
mean it is.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import schedulers
from trainer.commands import lr_find
from trainer.commands.cli import main
from trainer.config.load import ConfigError
from trainer.report import lr_range
from trainer.run import step

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def paths(tiny_model, tiny_data, out) -> list[str]:
    return [
        f'model.pretrained="{tiny_model}"',
        f'data.path="{tiny_data}"',
        f'output_dir="{out}"',
        'logging.tracker="none"',
    ]


# ---------------------------------------------------------------- the rules, alone


def test_the_smoothed_loss_is_the_weighted_mean_of_the_losses_so_far():
    # The bias-corrected average equals sum(beta^i x_{t-i}) / sum(beta^i): pandas' ewm with
    # adjust=True, and fastai's smoothed loss.
    losses = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    for beta in (0.0, 0.5, 0.98):
        want = [
            sum(beta**i * losses[t - i] for i in range(t + 1)) / sum(beta**i for i in range(t + 1))
            for t in range(len(losses))
        ]
        assert lr_range.smooth(losses, beta) == pytest.approx(want, rel=1e-12)


def test_divergence_is_a_factor_above_the_lowest_smoothed_loss_or_not_finite():
    watch = lr_range.Divergence(beta=0.0, factor=4.0)
    assert [watch.add(x) for x in (2.0, 1.0, 3.9, 4.1)] == [False, False, False, True]
    assert lr_range.Divergence(0.0, 4.0).add(math.nan) is True


def test_suggestions_land_on_the_steepest_descent_and_a_tenth_of_the_minimum():
    # loss(lr) = -tanh(log(lr / c)) + (lr / m)^2: steepest at c, lowest near m.
    c, m = 1e-4, 1e-2
    lrs = [1e-7 * 10 ** (6 * i / 199) for i in range(200)]
    losses = [-math.tanh(math.log(lr / c)) + (lr / m) ** 2 for lr in lrs]
    pairs = enumerate(zip(lrs, losses, strict=True))
    points = [lr_range.Point(i + 1, (lr,), x, x) for i, (lr, x) in pairs]
    finding = lr_range.find(points, 200, diverged=False)
    step_ratio = lrs[1] / lrs[0]
    assert c / step_ratio <= finding.steepest <= c * step_ratio
    lowest = min(points[20:195], key=lambda p: p.smoothed).lr
    assert finding.minimum_10 == lowest / 10
    assert finding.suggested == finding.steepest
    assert finding.diverged_at is None and "did not diverge" in finding.notes[0]


def test_bad_flags_are_named_before_any_model_loads(tmp_path, capsys):
    code = main(["lr-find", "--config", str(TINY), "--min", "0", "--max", "-1", "--steps", "3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--min 0: must be > 0" in err and "--max -1: must be above --min" in err
    assert "--steps 3: at least 10 updates" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="--smooth 1: the moving average"):
        lr_find.load_config(str(TINY), [], lr_find.Options(smooth=1.0))


# ---------------------------------------------------------------- a known answer


def quadratic(curvature: float, sigma: float):
    """The loss ``L/2 · mean_b ||θ - ξ_b||²`` over the trained LoRA parameters θ, with a
    target ξ_b ~ N(0, σ² I) drawn per example from the example's own seeded generator: plain
    SGD on it is stable below an LR of 2/L and diverges above it."""

    def loss(unet, noise_scheduler, latents, cond, rand, *args, **kwargs):
        theta = torch.cat([p.reshape(-1) for p in unet.parameters() if p.requires_grad])
        targets = rand.randn((theta.numel(),)) * sigma
        return curvature / 2 * ((theta - targets) ** 2).sum(dim=1).mean()

    return loss


def test_the_divergence_point_of_sgd_on_a_quadratic_is_2_over_l(
    monkeypatch, tiny_model, tiny_data, tmp_path
):
    curvature = 10.0
    monkeypatch.setattr(step, "diffusion_loss", quadratic(curvature, sigma=1.0))
    sets = [
        *paths(tiny_model, tiny_data, tmp_path / "run"),
        'optimizer={ name = "sgd" }',
        "train.max_grad_norm=0",  # clipping would hold the divergence back
        "train.gradient_accumulation_steps=1",
    ]
    options = lr_find.Options(min_lr=2e-4, max_lr=20.0, steps=300)
    text, finding = lr_find.run(str(TINY), sets, options)
    known = 2 / curvature
    assert finding.diverged_at is not None, text
    assert known / 1.5 <= finding.diverged_at <= known * 1.5, text
    assert len(finding.points) < 300  # it stopped there, not at --max
    # Below 2/L the loss fell: both rules suggest an LR below the divergence.
    assert finding.steepest < known and finding.minimum_10 < known
    assert f"diverged at LR {finding.diverged_at:.3g}" in text


# ---------------------------------------------------------------- what it leaves


def digest_tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_two_processes_with_accumulation_apply_the_ramp_and_leave_no_lora(
    tiny_model, tiny_data, tmp_path
):
    out = tmp_path / "trained"
    out.mkdir()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"a LoRA trained before")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = digest_tree(out)
    steps, low, high = 12, 1e-5, 1e-3
    sets = [*paths(tiny_model, tiny_data, out), "train.gradient_accumulation_steps=2"]
    sets += ["train.batch_size=2", "validation.fraction=0.125"]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "docker" / "accelerate" / "cpu2.yaml"),
        "--num_processes", "2", "--main_process_port", "0",
        "--num_cpu_threads_per_process", "1",
        "train.py", "lr-find", "--config", str(TINY),
        *(x for s in sets for x in ("--set", s)),
        "--steps", str(steps), "--min", str(low), "--max", str(high), "--val-points", "3",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("suggested base LR") == 1  # printed once, by the main process
    rows = read_csv(out / "lr_find" / "lr_find.csv")
    ramp = schedulers.get("exponential_ramp")(start_factor=low / high)
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    for r in rows:  # the LR the loop applied at every update, to the bit
        assert float(r["lr_0"]) == ramp.lr(int(r["step"]) - 1, steps, high)
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [4, 8, 12]
    assert (out / "lr_find" / "lr_find.png").stat().st_size > 0
    # Nothing else: no LoRA, no checkpoint, no scratch run; the trained files untouched.
    left = digest_tree(out)
    assert {k: v for k, v in left.items() if not k.startswith("lr_find/")} == before
    assert sorted(k for k in left if k.startswith("lr_find/")) == [
        "lr_find/lr_find.csv",
        "lr_find/lr_find.png",
    ]
