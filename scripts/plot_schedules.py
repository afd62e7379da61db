"""Draw every built-in LR schedule on one image: docs/lr_schedules.png.

Each panel is one example ``[lr_scheduler]`` table over 1000 optimizer updates with 100 warmup
updates and a base LR of 1e-4. The tests load every example, so the image never shows a
config that would not load.

    python scripts/plot_schedules.py [--out docs/lr_schedules.png]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import schedulers  # noqa: E402
from schedulers.preview import draw_curves, lr_curve, new_figure  # noqa: E402

TOTAL_STEPS = 1000
BASE_LR = 1e-4
WARMUP = 100

# (panel title, [lr_scheduler] table); at least one per built-in schedule.
EXAMPLES: list[tuple[str, dict]] = [
    ("constant", {"name": "constant"}),
    ("constant_with_warmup", {"name": "constant_with_warmup", "warmup_steps": WARMUP}),
    ("linear", {"name": "linear", "warmup_steps": WARMUP}),
    ("cosine, min_lr_ratio 0.1", {"name": "cosine", "warmup_steps": WARMUP, "min_lr_ratio": 0.1}),
    (
        "cosine_with_restarts, 3 hard cycles",
        {"name": "cosine_with_restarts", "warmup_steps": WARMUP, "num_cycles": 3},
    ),
    (
        "cosine_with_restarts, soft, cycle_mult 2, decay 0.7",
        {
            "name": "cosine_with_restarts",
            "warmup_steps": WARMUP,
            "num_cycles": 3,
            "cycle_mult": 2.0,
            "cycle_decay": 0.7,
            "restart": "soft",
            "restart_warmup_steps": 40,
        },
    ),
    (
        "polynomial, power 2, min_lr 1e-5",
        {"name": "polynomial", "warmup_steps": WARMUP, "power": 2.0, "min_lr": 1e-5},
    ),
    (
        "sine, period 300, min_lr_ratio 0.1",
        {"name": "sine", "warmup_steps": WARMUP, "period": 300, "min_lr_ratio": 0.1},
    ),
    (
        "step, step_size 200, gamma 0.5",
        {"name": "step", "warmup_steps": WARMUP, "step_size": 200, "gamma": 0.5},
    ),
    (
        "multistep, milestones [400, 700]",
        {"name": "multistep", "warmup_steps": WARMUP, "milestones": [400, 700], "gamma": 0.3},
    ),
    (
        "piecewise_constant '1:300,0.5:600,0.25'",
        {"name": "piecewise_constant", "warmup_steps": WARMUP, "step_rules": "1:300,0.5:600,0.25"},
    ),
    ("rex", {"name": "rex", "warmup_steps": WARMUP}),
    ("inverse_sqrt", {"name": "inverse_sqrt", "warmup_steps": WARMUP}),
    (
        "warmup_stable_decay, decay_ratio 0.2",
        {"name": "warmup_stable_decay", "warmup_steps": WARMUP, "decay_ratio": 0.2},
    ),
    (
        "exponential_ramp (lr-find), start_factor 0.001",
        {"name": "exponential_ramp", "start_factor": 0.001},
    ),
    (
        "warmup 400: exponential (blue), cosine (orange)",
        {
            "name": "constant",
            "warmup_steps": 400,
            "warmup_shape": "exponential",
            "warmup_start_factor": 0.01,
        },
    ),
]


def plot(out: Path) -> Figure:
    """Draw every example in a grid and save it to ``out``; return the figure. Each panel is
    drawn as ``sdlora lr-plot`` draws its curves (updates numbered from 1)."""
    cols = 4
    rows = math.ceil(len(EXAMPLES) / cols)
    fig = new_figure((4 * cols, 2.6 * rows), dpi=80, layout="tight")
    axes = fig.subplots(rows, cols, sharex=True, sharey=True).ravel()
    for ax, (title, table) in zip(axes, EXAMPLES, strict=False):
        curves = {title: lr_curve(schedulers.from_table(table), TOTAL_STEPS, [BASE_LR])}
        if title.startswith("warmup 400"):
            cosine = schedulers.from_table({**table, "warmup_shape": "cosine"})
            curves["cosine"] = lr_curve(cosine, TOTAL_STEPS, [BASE_LR])  # the second colour
        draw_curves(ax, curves)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[len(EXAMPLES) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"sdlora LR schedules: {TOTAL_STEPS} optimizer updates, base LR {BASE_LR:g}, "
        f"warmup {WARMUP} unless noted"
    )
    fig.supxlabel("optimizer update")
    fig.supylabel("learning rate")
    fig.savefig(out)
    return fig


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--out`` path of the PNG (default docs/lr_schedules.png)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "lr_schedules.png")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
