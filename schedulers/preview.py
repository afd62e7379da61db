"""Look at a schedule before training: its LR at every update as rows, CSV, PNG or a table.

``sdlora lr-plot`` calls these. Nothing here touches an optimizer: the curve comes straight
from ``Schedule.lrs``, the same call the training loop makes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from schedulers.base import Schedule


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


def write_png(path: str | Path, curves: Mapping[str, Sequence[float]], title: str) -> None:
    """Plot one or more LR curves on shared axes and save a PNG.

    Args:
        path: Where to write the image.
        curves: Label → LR per update.
        title: The plot title.
    """
    # The object API with the Agg canvas draws off-screen without touching pyplot's global
    # backend, so calling this never changes how the caller's own plots display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, values in curves.items():
        ax.plot(range(len(values)), values, label=label, linewidth=1.5)
    ax.set_xlabel("optimizer update")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


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
