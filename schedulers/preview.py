"""Look at a schedule before training: its LR at every update as rows, CSV, PNG or a table.

``sdlora lr-plot`` calls these, and :func:`draw_curves`/:func:`lr_figure` are the project's
one LR figure: ``scripts/plot_schedules.py`` draws its panels with them, and a sweep's
applied-LR figure can pass each run's logged LRs as a :class:`Curve`. Nothing here touches
an optimizer: the curve comes straight from ``Schedule.lrs``, the same call the training loop
makes. A run of at most :data:`MAX_ROWS` updates is shown at every update; a longer one (up
to 10,000,000) at :func:`sample_curve`'s updates, so the preview stays instant and small while
training, which evaluates one update at a time, starts at once too.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from schedulers.base import Schedule

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# The most updates of one curve that lr-plot writes and draws: a plot cannot show more, and
# 10,000 rows of a CSV are what a spreadsheet opens at once.
MAX_ROWS = 10_000
# Between two sampled updates, a change of more than this fraction of a group's base LR is
# taken for a jump (a restart, a milestone drop, a step): a smooth curve sampled 10,000 times
# moves about 1e-4 of its range per interval. At most MAX_JUMPS of them are located exactly.
JUMP = 0.01
MAX_JUMPS = 64


def lr_curve(schedule: Schedule, total_steps: int, base_lrs: Sequence[float]) -> list[list[float]]:
    """The LR of every param group at every update.

    Args:
        schedule: The schedule.
        total_steps: Optimizer updates in the run.
        base_lrs: One base LR per param group.

    Returns:
        ``total_steps`` rows (row ``i`` is update ``i``), one column per param group.
    """
    return [schedule.lrs(step, total_steps, base_lrs) for step in range(total_steps)]


@dataclass(frozen=True)
class Curve:
    """A schedule's LRs at some updates of a run: ``rows[i]`` holds every param group's LR at
    update ``steps[i]``, numbered from 1 like the CSV and ``metrics.jsonl``."""

    steps: Sequence[int]
    rows: Sequence[Sequence[float]]
    total: int = 0  # updates in the run (0: not known, e.g. LRs read from a run's log)
    stride: int = 1  # updates between regular samples: 1 when every update is here

    @property
    def note(self) -> str:
        """What the curve holds, said once: empty when it is every update."""
        if self.stride == 1:
            return ""
        return (
            f"{len(self.steps):,} of {self.total:,} updates: every {self.stride:,}th, and the "
            "first, the last, and both sides of the warmup's end and of each jump"
        )


def sample_curve(
    schedule: Schedule, total_steps: int, base_lrs: Sequence[float], max_rows: int = MAX_ROWS
) -> Curve:
    """The LR of every param group at every update of a run of at most ``max_rows``; of a
    longer run, at most ``max_rows`` updates from about as many evaluations, whatever its
    length.

    Those updates are every ``stride``-th from the first, the last, the last warmup update and
    the first after it, and for the largest changes between regular samples (restarts,
    milestones, steps), the two updates either side of the jump.
    """
    if total_steps <= max_rows:
        rows = lr_curve(schedule, total_steps, base_lrs)
        return Curve(list(range(1, total_steps + 1)), rows, total_steps, 1)
    evaluated: dict[int, list[float]] = {}

    def at(index: int) -> list[float]:
        if index not in evaluated:
            evaluated[index] = schedule.lrs(index, total_steps, base_lrs)
        return evaluated[index]

    stride = math.ceil(total_steps / (max_rows - 3 - 2 * MAX_JUMPS))
    grid = list(dict.fromkeys([*range(0, total_steps, stride), total_steps - 1]))
    shown = set(grid)
    warmup = schedule.warmup_updates(total_steps)
    if 0 < warmup < total_steps:
        shown |= {warmup - 1, warmup}
    shown |= jump_sides(grid, at, base_lrs)
    indices = sorted(shown)
    return Curve([i + 1 for i in indices], [at(i) for i in indices], total_steps, stride)


def jump_sides(
    grid: Sequence[int], at: Callable[[int], list[float]], base_lrs: Sequence[float]
) -> set[int]:
    """The updates either side of the :data:`MAX_JUMPS` largest jumps between neighbours of
    ``grid`` (0-based updates; ``at`` gives their LRs), each found in about log2 of its
    interval's length evaluations by halving it."""
    scale = [abs(base) or 1.0 for base in base_lrs]

    def change(a: int, b: int) -> float:
        return max(abs(x - y) / s for x, y, s in zip(at(a), at(b), scale, strict=True))

    # Largest change first; what is left of an interval either side of a jump goes back in,
    # so two jumps between the same neighbours (milestones 333 and 334) are both found.
    todo = [(-change(a, b), a, b) for a, b in itertools.pairwise(grid) if b - a > 1]
    heapq.heapify(todo)
    sides: set[int] = set()
    while todo and len(sides) < 2 * MAX_JUMPS:
        size, start, end = heapq.heappop(todo)
        if -size <= JUMP:
            break
        a, b = start, end
        while b - a > 1:
            # Keep the half that changes more: it holds the jump, which dwarfs the smooth part.
            middle = (a + b) // 2
            if change(a, middle) >= change(middle, b):
                b = middle
            else:
                a = middle
        sides |= {a, b}
        for left, right in ((start, a), (b, end)):
            if right - left > 1:
                heapq.heappush(todo, (-change(left, right), left, right))
    return sides


def write_csv(
    path: str | Path, rows: Sequence[Sequence[float]], steps: Sequence[int] | None = None
) -> None:
    """Write rows as CSV with the header ``step,lr_0,lr_1,...``.

    ``step`` N is the N-th optimizer update, the numbering of the trainer's ``metrics.jsonl``
    and ``checkpoints/step-NNNNNN``: ``steps[i]`` for row ``i`` when given (a
    :class:`Curve`'s), else row N - 1. Floats are written with ``repr``, the shortest text
    that reads back as the same float.
    """
    width = len(rows[0]) if rows else 0
    numbers = range(1, len(rows) + 1) if steps is None else steps
    lines = [",".join(["step", *(f"lr_{i}" for i in range(width))])]
    lines += [
        ",".join([str(n), *(repr(float(x)) for x in row)])
        for n, row in zip(numbers, rows, strict=True)
    ]
    Path(path).write_text("\n".join(lines) + "\n")


# What can be drawn: rows of every update (as :func:`lr_curve` returns them) or a Curve.
Drawable = Sequence[Sequence[float]] | Curve
# Curves by label: a mapping, or (label, curve) pairs in which a label may repeat (a sweep's
# runs of one configuration under several seeds share its colour and its legend entry).
Labelled = Mapping[str, Drawable] | Sequence[tuple[str, Drawable]]


def _steps_and_rows(curve: Drawable) -> tuple[Sequence[int], Sequence[Sequence[float]]]:
    """The update numbers and rows of a :class:`Curve`, or of rows of every update."""
    if isinstance(curve, Curve):
        return curve.steps, curve.rows
    return range(1, len(curve) + 1), curve


def draw_curves(ax: Axes, curves: Labelled, group_names: Sequence[str] = ()) -> int:
    """Draw the LR of every param group of each curve on ``ax``; return the legend entries.

    Each label keeps one colour and each param group one line style; a label that repeats
    draws in the same colour and is named in the legend once.

    Args:
        ax: The axes to draw on.
        curves: Label → rows as :func:`lr_curve` returns them (one column per group), or a
            :class:`Curve` of some updates, drawn at its steps; or (label, curve) pairs.
        group_names: A name per param group, e.g. ("UNet", "text encoder"); curves are
            labelled "label (group)", or "label" for an empty name. Without names, groups
            beyond the first are numbered.
    """
    pairs = list(curves.items()) if isinstance(curves, Mapping) else list(curves)
    labels = dict.fromkeys(label for label, _ in pairs)
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    styles = ("-", "--", ":", "-.")
    named: set[str] = set()
    for label, curve in pairs:
        updates, rows = _steps_and_rows(curve)
        width = len(rows[0]) if rows else 0
        for group in range(width):
            if group < len(group_names):
                name = f"{label} ({group_names[group]})" if group_names[group] else label
            else:
                name = label if width == 1 else f"{label} (group {group})"
            values = [row[group] for row in rows]
            style = styles[group % len(styles)]
            shown = name if name not in named else f"_{name}"  # "_…": not in the legend
            named.add(name)
            ax.plot(updates, values, style, color=colours[label], label=shown, linewidth=1.5)
    return len(named)


def lr_figure(
    curves: Labelled,
    title: str,
    group_names: Sequence[str] = (),
    size: tuple[float, float] = (8, 5),
) -> Figure:
    """Plot the LR of every param group of one or more schedules on shared axes.

    The x axis counts optimizer updates from 1, as the CSV and ``metrics.jsonl`` do. Each
    schedule keeps one colour and each param group one line style (:func:`draw_curves`), and
    the legend sits below the axes, where it cannot hide a curve.

    Args:
        curves: What :func:`draw_curves` takes.
        title: The plot title.
        group_names: A name per param group (:func:`draw_curves`).
        size: The figure's width and height in inches (100 pixels each).

    Returns:
        The figure, drawn on an off-screen canvas; its lines hold exactly the plotted data.
    """
    fig = new_figure(size)
    ax = fig.add_subplot()
    entries = draw_curves(ax, curves, group_names)
    ax.set_xlabel("optimizer update")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if entries:
        # "outside" places the legend in the constrained layout's margin, below the x label.
        fig.legend(loc="outside lower center", ncols=min(entries, 3), fontsize="small")
    return fig


def new_figure(
    size: tuple[float, float],
    dpi: int = 100,
    layout: Literal["constrained", "compressed", "tight"] = "constrained",
) -> Figure:
    """An empty figure on an off-screen Agg canvas.

    The object API with the Agg canvas draws off-screen without touching pyplot's global
    backend, so calling this never changes how the caller's own plots display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def write_png(
    path: str | Path,
    curves: Labelled,
    title: str,
    group_names: Sequence[str] = (),
) -> Figure:
    """Draw :func:`lr_figure` and save it as a PNG; return the figure for inspection."""
    fig = lr_figure(curves, title, group_names)
    fig.savefig(path)
    return fig


def format_table(
    rows: Sequence[Sequence[float]], max_rows: int = 12, steps: Sequence[int] | None = None
) -> str:
    """A short text table of a few representative updates.

    Shows the first and last updates, the peak of the first param group, and evenly spaced
    updates between, at most ``max_rows`` of them, numbered from 1 as in :func:`write_csv`
    (``steps[i]`` for row ``i`` when given).
    """
    if not rows:
        return "(no updates)"
    numbers = range(1, len(rows) + 1) if steps is None else steps
    last = len(rows) - 1
    picks = {0, last, max(range(len(rows)), key=lambda i: rows[i][0])}
    slots = max(max_rows - len(picks), 0)
    for k in range(1, slots + 1):
        picks.add(round(k * last / (slots + 1)))
    shown = sorted(picks)[:max_rows] if len(picks) > max_rows else sorted(picks)
    width = len(rows[0])
    header = f"{'step':>8}" + "".join(f"{f'lr_{i}':>14}" for i in range(width))
    lines = [header]
    for i in shown:
        lines.append(f"{numbers[i]:>8}" + "".join(f"{x:>14.6g}" for x in rows[i]))
    return "\n".join(lines)
