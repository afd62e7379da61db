"""Look at a schedule before training: its LR at every update as rows, CSV, PNG or a table.

``sdlora lr-plot`` calls these. Nothing here touches an optimizer: the curve comes straight
from ``Schedule.lrs``, the same call the training loop makes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from schedulers.base import Schedule

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn
    from matplotlib.figure import Figure


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


def write_csv(path: str | Path, rows: Sequence[Sequence[float]]) -> None:
    """Write rows as CSV with the header ``step,lr_0,lr_1,...``.

    ``step`` N is the N-th optimizer update (row N - 1), the numbering of the trainer's
    ``metrics.jsonl`` and ``checkpoints/step-NNNNNN``. Floats are written with ``repr``, the
    shortest text that reads back as the same float.
    """
    width = len(rows[0]) if rows else 0
    lines = [",".join(["step", *(f"lr_{i}" for i in range(width))])]
    lines += [",".join([str(i), *(repr(float(x)) for x in row)]) for i, row in enumerate(rows, 1)]
    Path(path).write_text("\n".join(lines) + "\n")


def lr_figure(
    curves: Mapping[str, Sequence[Sequence[float]]],
    title: str,
    group_names: Sequence[str] = (),
) -> Figure:
    """Plot the LR of every param group of one or more schedules on shared axes.

    The x axis counts optimizer updates from 1, as the CSV and ``metrics.jsonl`` do. Each
    schedule keeps one colour and each param group one line style, and the legend sits below
    the axes, where it cannot hide a curve.

    Args:
        curves: Schedule label → rows as :func:`lr_curve` returns them (one column per group).
        title: The plot title.
        group_names: A name per param group, e.g. ("UNet", "text encoder"); curves are
            labelled "schedule (group)". Without names, groups beyond the first are numbered.

    Returns:
        The figure, drawn on an off-screen canvas; its lines hold exactly the plotted data.
    """
    # The object API with the Agg canvas draws off-screen without touching pyplot's global
    # backend, so calling this never changes how the caller's own plots display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = ("-", "--", ":", "-.")
    for index, (label, rows) in enumerate(curves.items()):
        colour = f"C{index % 10}"
        width = len(rows[0]) if rows else 0
        updates = range(1, len(rows) + 1)
        for group in range(width):
            if group < len(group_names):
                name = f"{label} ({group_names[group]})"
            else:
                name = label if width == 1 else f"{label} (group {group})"
            values = [row[group] for row in rows]
            style = styles[group % len(styles)]
            ax.plot(updates, values, style, color=colour, label=name, linewidth=1.5)
    ax.set_xlabel("optimizer update")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    lines = len(ax.get_lines())
    # "outside" places the legend in the constrained layout's margin, below the x label.
    fig.legend(loc="outside lower center", ncols=min(lines, 3), fontsize="small")
    return fig


def write_png(
    path: str | Path,
    curves: Mapping[str, Sequence[Sequence[float]]],
    title: str,
    group_names: Sequence[str] = (),
) -> Figure:
    """Draw :func:`lr_figure` and save it as a PNG; return the figure for inspection."""
    fig = lr_figure(curves, title, group_names)
    fig.savefig(path)
    return fig


def format_table(rows: Sequence[Sequence[float]], max_rows: int = 12) -> str:
    """A short text table of a few representative updates.

    Shows the first and last updates, the peak of the first param group, and evenly spaced
    updates between, at most ``max_rows`` of them, numbered from 1 as in :func:`write_csv`.
    """
    if not rows:
        return "(no updates)"
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
        lines.append(f"{i + 1:>8}" + "".join(f"{x:>14.6g}" for x in rows[i]))
    return "\n".join(lines)
