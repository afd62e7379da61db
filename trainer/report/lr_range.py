"""What an LR range test shows: the smoothed loss against the LR, where it diverged, the
suggested base LR, and the CSV, plot and sweep snippet ``sdlora lr-find`` writes.

The rules are fastai's ``lr_find`` (after Smith, 2017), so their numbers can be compared:

- **Smoothing**: an exponential moving average of the training loss with bias correction,
  ``avg = beta * avg + (1 - beta) * loss``, shown as ``avg / (1 - beta ** (i + 1))``.
- **Divergence**: the run stops at the first update whose smoothed loss is more than
  ``factor`` times the lowest smoothed loss so far (or is not finite).
- **Suggestions**, over the updates before the stop, the first tenth and the last five left
  out (the average is still settling at the start, and the end is the divergence itself):
  *steepest*, the LR where the smoothed loss falls fastest against log(LR), and *minimum ÷ 10*,
  a tenth of the LR at the lowest smoothed loss.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SKIP_END = 5  # fastai leaves the last five points out of its suggestions


class Divergence:
    """The smoothed training loss, fed one update at a time; says when it diverged.

    Args:
        beta: The moving average's weight of the past, in [0, 1).
        factor: Divergence: the smoothed loss above ``factor`` times its lowest value.
    """

    def __init__(self, beta: float, factor: float) -> None:
        self.beta, self.factor = beta, factor
        self.avg = 0.0
        self.smoothed: list[float] = []
        self.best = math.inf
        self.diverged = False

    def add(self, loss: float) -> bool:
        """Fold in the loss of the next update; True when the smoothed loss has diverged."""
        self.avg = self.beta * self.avg + (1.0 - self.beta) * loss
        value = self.avg / (1.0 - self.beta ** (len(self.smoothed) + 1))
        self.smoothed.append(value)
        if math.isfinite(value):
            self.best = min(self.best, value)
        self.diverged = not math.isfinite(value) or value > self.factor * self.best
        return self.diverged


def smooth(losses: Sequence[float], beta: float) -> list[float]:
    """The bias-corrected moving average of ``losses`` (what :class:`Divergence` computes)."""
    watch = Divergence(beta, math.inf)
    for loss in losses:
        watch.add(loss)
    return watch.smoothed


@dataclass(frozen=True)
class Point:
    """One update of the range test."""

    step: int  # 1-based, as in metrics.jsonl
    lrs: tuple[float, ...]  # every param group's applied LR
    loss: float
    smoothed: float
    val_loss: float | None = None

    @property
    def lr(self) -> float:
        """The UNet's LR (param group 0): the base LR the suggestions are about."""
        return self.lrs[0]


@dataclass(frozen=True)
class Finding:
    """What the range test found."""

    points: tuple[Point, ...]
    planned: int  # updates of the whole ramp
    diverged_at: float | None  # the LR of the update that diverged; None: never did
    steepest: float | None  # None: too few updates before the stop to tell
    minimum_10: float | None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def suggested(self) -> float | None:
        """The suggested base LR: the steepest descent, else a tenth of the minimum's LR."""
        return self.steepest if self.steepest is not None else self.minimum_10


def points_from_metrics(records: Sequence[Mapping[str, Any]], beta: float) -> tuple[Point, ...]:
    """The range test's points from its run's ``metrics.jsonl`` records (applied LRs, losses,
    validation losses where scored)."""
    records = sorted(records, key=lambda r: r["step"])
    smoothed = smooth([float(r["loss"]) for r in records], beta)
    return tuple(
        Point(
            int(r["step"]),
            tuple(float(x) for x in r["lr"]),
            float(r["loss"]),
            s,
            None if r.get("val_loss") is None else float(r["val_loss"]),
        )
        for r, s in zip(records, smoothed, strict=True)
    )


def find(points: Sequence[Point], planned: int, diverged: bool) -> Finding:
    """The suggestions from the points of a range test (see the module docstring).

    Args:
        points: Every update's point, in order.
        planned: The updates of the whole ramp.
        diverged: Whether the run stopped because the smoothed loss diverged.
    """
    notes = []
    diverged_at = points[-1].lr if diverged and points else None
    window = list(points[len(points) // 10 : max(0, len(points) - SKIP_END)])
    if len(window) < 2:
        notes.append(
            f"only {len(points)} update(s) before the loss diverged, too few to suggest an LR; "
            "lower --min, or give more --steps"
        )
        return Finding(tuple(points), planned, diverged_at, None, None, tuple(notes))
    lowest = min(window, key=lambda p: p.smoothed)
    slopes = [
        ((b.smoothed - a.smoothed) / (math.log(b.lr) - math.log(a.lr)), a)
        for a, b in itertools.pairwise(window)
        if b.lr > a.lr
    ]
    steepest = min(slopes, key=lambda s: s[0]) if slopes else None
    if steepest is None or steepest[0] >= 0:
        notes.append("the smoothed loss never fell: no steepest descent; try a lower --min")
    if not diverged:
        notes.append(
            f"the loss did not diverge up to --max {points[-1].lr:.3g}; a higher --max shows "
            "where it does"
        )
    return Finding(
        tuple(points),
        planned,
        diverged_at,
        steepest[1].lr if steepest is not None and steepest[0] < 0 else None,
        lowest.lr / 10.0,
        tuple(notes),
    )


def csv_text(points: Sequence[Point]) -> str:
    """``step,lr_0,...,loss,smoothed_loss,val_loss``: one row per update (val_loss empty where
    the held-out images were not scored)."""
    groups = max((len(p.lrs) for p in points), default=1)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ["step", *(f"lr_{i}" for i in range(groups)), "loss", "smoothed_loss", "val_loss"]
    )
    for p in points:
        val = "" if p.val_loss is None else repr(p.val_loss)
        writer.writerow([p.step, *map(repr, p.lrs), repr(p.loss), repr(p.smoothed), val])
    return buf.getvalue()


def figure_png(finding: Finding, title: str) -> bytes:
    """Loss against LR (log axis): raw and smoothed training loss, validation loss where
    scored, and the suggestions and the divergence as vertical lines."""
    from schedulers import preview

    fig = preview.new_figure((8, 5))
    ax = fig.add_subplot()
    lrs = [p.lr for p in finding.points]
    ax.plot(lrs, [p.loss for p in finding.points], color="0.75", lw=1, label="training loss")
    ax.plot(lrs, [p.smoothed for p in finding.points], color="C0", lw=2, label="smoothed")
    scored = [(p.lr, p.val_loss) for p in finding.points if p.val_loss is not None]
    if scored:
        ax.plot(*zip(*scored, strict=True), "o-", color="C2", label="validation loss")
    marks = (
        (finding.steepest, "C1", "steepest descent"),
        (finding.minimum_10, "C4", "minimum ÷ 10"),
        (finding.diverged_at, "C3", "diverged"),
    )
    for lr, colour, label in marks:
        if lr is not None:
            ax.axvline(lr, color=colour, ls="--", lw=1, label=f"{label}: {lr:.3g}")
    shown = [p.smoothed for p in finding.points] + [v for _, v in scored]
    finite = [v for v in shown if math.isfinite(v)]
    if finite:  # the diverging tail would squash the curve: cap the axis near the start
        early = [p.smoothed for p in finding.points[: max(1, len(finding.points) // 2)]]
        capped = [v for v in early + [v for _, v in scored] if math.isfinite(v)]
        low, top = min(finite), max(capped, default=max(finite))
        pad = top - low or abs(top) or 1.0
        ax.set_ylim(low - 0.05 * pad, top + 0.5 * pad)
    ax.set(xscale="log", xlabel="learning rate (UNet)", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def sweep_snippet(base: str, lr: float, overrides: Sequence[str] = ()) -> str:
    """A sweep file trying ``lr`` and the LRs three times below and above it, three seeds
    each, with the ``--set`` overrides the range test ran with in ``[set]``."""
    lines = [
        f"base = {_toml_string(base)}",
        "seeds = [0, 1, 2]",
        "",
        "[set]",
    ]
    for text in overrides:
        key, _, value = text.partition("=")
        lines.append(f"{_toml_string(key.strip())} = {value.strip()}")
    values = ", ".join(f"{x:.3g}" for x in (lr / 3, lr, lr * 3))
    lines += ["", "[grid]", f'"train.learning_rate" = [{values}]']
    return "\n".join(lines) + "\n"


def _toml_string(text: str) -> str:
    import json

    return json.dumps(text)  # a JSON string is a TOML basic string
