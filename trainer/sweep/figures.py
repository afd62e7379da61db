"""The sweep report's pictures, each a PNG drawn from the runs' own files.

- ``lr_curves.png``: every run's applied LR per update (the builder of ``sdlora lr-plot``);
- ``val_loss.png``: every run's validation loss over updates;
- ``timestep_loss.png``: each configuration's final validation loss at each fixed timestep,
  and its paired difference to the best configuration there, with 95 % intervals: high
  timesteps are mostly noise (layout, colour), low ones nearly clean (fine detail);
- ``pareto.png``: with two objectives, each configuration's means and their Pareto front;
- ``samples.png``: one row per run, the same prompts and seeds, at the end of training.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from schedulers import preview
from trainer.report import grids
from trainer.step_folders import numbered_folders
from trainer.sweep.objectives import Objective
from trainer.sweep.results import RunResult
from trainer.sweep.verdict import LEVEL, Summary

MARKERS = "os^vDP*X"


def _figure(width: float, height: float):
    return preview.new_figure((width, height))


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def colours(labels: Sequence[str]) -> dict[str, str]:
    return {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(labels))}


def _note(fig, text: str) -> bytes:
    fig.text(0.5, 0.5, text, ha="center", va="center")
    return png(fig)


def lr_figure(results: Sequence[RunResult]) -> bytes:
    """Every run's applied LR per update (param group 0 solid, the text encoder's dashed),
    drawn by the same builder as ``sdlora lr-plot``."""
    pairs = []
    for r in results:
        logged = [m for m in r.metrics if m.get("lr")]
        steps = [m["step"] for m in logged]
        pairs.append((r.run.point.label, preview.Curve(steps, [m["lr"] for m in logged])))
    fig = preview.lr_figure(pairs, "Applied LR per update", ("", "text encoder"), size=(9, 5))
    return png(fig)


def val_figure(results: Sequence[RunResult]) -> bytes:
    """Every run's validation loss over updates (one colour per configuration)."""
    fig = _figure(9, 5)
    ax = fig.add_subplot()
    colour, labelled = colours([r.run.point.label for r in results]), set()
    seeds = sorted({r.run.seed for r in results})
    for r in results:
        points = [(m["step"], m["val_loss"]) for m in r.metrics if "val_loss" in m]
        if not points:
            continue
        label = r.run.point.label
        ax.plot(*zip(*points, strict=True), "-", marker=MARKERS[seeds.index(r.run.seed) % 8],
                color=colour[label], label=None if label in labelled else label)  # fmt: skip
        labelled.add(label)
    ax.set(xlabel="optimizer update", ylabel="validation loss", title="Fixed-seed validation loss")
    if labelled:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize="small")
    return png(fig)


def timestep_table(
    results: Sequence[RunResult], labels: Sequence[str]
) -> tuple[list[int], dict[str, dict[int, dict[int, float]]]]:
    """The fixed timesteps, and label -> seed -> timestep -> final loss, for the finished runs
    of the given configurations."""
    table: dict[str, dict[int, dict[int, float]]] = {label: {} for label in labels}
    steps: set[int] = set()
    for r in results:
        losses = r.timestep_losses()
        if losses and r.run.point.label in table:
            table[r.run.point.label][r.run.seed] = losses
            steps.update(losses)
    return sorted(steps), table


def timestep_figure(results: Sequence[RunResult], labels: Sequence[str], best: str | None) -> bytes:
    """Left: each configuration's mean final loss at each timestep. Right: the paired
    difference to ``best`` at each timestep over their shared seeds, with scipy's
    ``ttest_rel`` 95 % interval (a bar crossing 0: no shown difference at that timestep)."""
    from scipy import stats

    steps, table = timestep_table(results, labels)
    fig = _figure(12, 5)
    if not steps:
        return _note(fig, "No per-timestep validation losses: the runs predate them.")
    left, right = fig.subplots(1, 2)
    colour = colours(labels)
    for label in labels:
        runs = table[label]
        if not runs:
            continue
        means = [np.mean([v[t] for v in runs.values() if t in v]) for t in steps]
        left.plot(steps, means, "-o", color=colour[label], label=label)
        if best is None or label == best or best not in table:
            continue
        shared = sorted(set(runs) & set(table[best]))
        diffs = np.array([[runs[s][t] - table[best][s][t] for t in steps] for s in shared])
        if len(shared) == 0:
            continue
        mid = diffs.mean(axis=0)
        if len(shared) > 1 and np.any(diffs.std(axis=0) > 0):
            ci = stats.ttest_rel(diffs, np.zeros_like(diffs), axis=0).confidence_interval(LEVEL)
            low, high = np.nan_to_num(mid - ci.low), np.nan_to_num(ci.high - mid)
            right.errorbar(steps, mid, yerr=[low, high], fmt="-o", capsize=3, color=colour[label])
        else:
            right.plot(steps, mid, "-o", color=colour[label])
    left.set(
        xlabel="timestep (high: mostly noise, layout; low: fine detail)",
        ylabel="final validation loss",
        title="Loss at each fixed timestep (mean of seeds)",
    )
    right.axhline(0, color="black", lw=0.8)
    right.set(xlabel="timestep", ylabel=f"loss minus {best}'s (paired)"[:60],
              title=f"Difference to the best, {LEVEL:.0%} intervals")  # fmt: skip
    fig.legend(loc="outside lower center", ncols=min(len(labels), 3), fontsize="small")
    return png(fig)


def pareto_front(
    points: dict[str, tuple[float, float]], objectives: Sequence[Objective]
) -> list[str]:
    """The labels no other configuration beats on both objectives and ties or beats on each
    (non-dominated), in the order given."""
    signs = [1.0 if o.lower_is_better else -1.0 for o in objectives]
    cost = {k: tuple(s * v for s, v in zip(signs, xy, strict=True)) for k, xy in points.items()}

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and a != b

    return [k for k, c in cost.items() if not any(dominates(o, c) for o in cost.values())]


def pareto_points(
    first: Sequence[Summary], second: Sequence[Summary]
) -> dict[str, tuple[float, float]]:
    """Each configuration complete on both objectives at its two means."""
    other = {s.label: s for s in second}
    return {
        s.label: (s.mean, other[s.label].mean)
        for s in first
        if s.complete and s.label in other and other[s.label].complete
    }


def pareto_figure(
    first: Sequence[Summary], second: Sequence[Summary], objectives: Sequence[Objective]
) -> bytes:
    """Each complete configuration at its two means (its seeds faint around it), the Pareto
    front joined; the axes say which way is better."""
    fig = _figure(8, 6)
    points = pareto_points(first, second)
    if not points:
        return _note(fig, "No configuration has finished all its seeds yet.")
    ax = fig.add_subplot()
    colour = colours(list(points))
    xs, ys = {s.label: s for s in first}, {s.label: s for s in second}
    for label, (x, y) in points.items():
        ax.plot(x, y, "o", ms=9, color=colour[label], label=label)
        seeds = sorted(set(xs[label].values) & set(ys[label].values))
        ax.plot([xs[label].values[s] for s in seeds], [ys[label].values[s] for s in seeds],
                ".", alpha=0.35, color=colour[label])  # fmt: skip
    front = sorted(pareto_front(points, objectives), key=lambda k: points[k][0])
    ax.plot([points[k][0] for k in front], [points[k][1] for k in front], "--", color="grey",
            label="Pareto front")  # fmt: skip
    axes = [f"{o.title} ({'lower' if o.lower_is_better else 'higher'} is better)"
            for o in objectives]  # fmt: skip
    ax.set(xlabel=axes[0], ylabel=axes[1], title="Mean over seeds (dots: each seed)")
    fig.legend(loc="outside lower center", ncols=3, fontsize="small")
    return png(fig)


def last_samples(folder: Path) -> list[Path]:
    """The per-prompt images (``pKK-seedS.png``) of the run's last sample point, in prompt
    order; the point's own grid of them beside is left out."""
    steps = numbered_folders(folder / "samples")
    return list(grids.images_by_prompt(steps[-1][1]).values()) if steps else []


def samples_figure(results: Sequence[RunResult]) -> bytes:
    """One row per run, one column per prompt of validation.prompts."""
    from PIL import Image

    rows = [(r, last_samples(r.folder)) for r in results]
    rows = [(r, images) for r, images in rows if images]
    if not rows:
        fig = _figure(6, 1.5)
        fig.text(0.5, 0.5, "No samples: set validation.prompts to draw some.", ha="center")
        return png(fig)
    cols = max(len(images) for _, images in rows)
    fig = _figure(2.2 + 1.8 * cols, 0.6 + 1.8 * len(rows))
    grid = fig.subplots(len(rows), cols, squeeze=False)
    for i, (r, images) in enumerate(rows):
        prompts = r.run.config.validation.prompts
        for j in range(cols):
            ax = grid[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(images):
                with Image.open(images[j]) as im:
                    ax.imshow(im.convert("RGB"))
            if i == 0 and j < len(prompts):
                ax.set_title(prompts[j][:28], fontsize="small")
            if j == 0:
                ax.set_ylabel(f"{r.run.point.label[:28]}\nseed {r.run.seed}", fontsize="small")
    return png(fig)
