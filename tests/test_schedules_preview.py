"""Preview helpers behind ``sdlora lr-plot``: rows, CSV, PNG and a text table."""

from __future__ import annotations

import csv

import schedulers
from schedulers.preview import Curve, format_table, lr_curve, lr_figure, write_csv, write_png


def test_lr_curve_is_the_schedule_at_every_update():
    schedule = schedulers.get("cosine")(warmup_steps=3)
    rows = lr_curve(schedule, 20, [1e-4, 2e-5])
    assert len(rows) == 20 and all(len(r) == 2 for r in rows)
    assert rows == [schedule.lrs(i, 20, [1e-4, 2e-5]) for i in range(20)]


def test_csv_reads_back_to_the_same_floats(tmp_path):
    rows = lr_curve(schedulers.get("rex")(warmup_steps=0.1), 50, [1e-4, 3.3e-5])
    path = tmp_path / "lr.csv"
    write_csv(path, rows)
    with path.open() as f:
        table = list(csv.reader(f))
    assert table[0] == ["step", "lr_0", "lr_1"]
    assert [int(r[0]) for r in table[1:]] == list(range(1, 51))  # step N = N-th update
    assert [[float(x) for x in r[1:]] for r in table[1:]] == rows  # exact, via repr


def test_png_overlays_curves(tmp_path):
    curves = {
        name: lr_curve(schedulers.get(name)(warmup_steps=10), 100, [1e-4])
        for name in ("cosine", "linear", "rex")
    }
    path = tmp_path / "lr.png"
    fig = write_png(path, curves, "three schedules")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["cosine", "linear", "rex"]
    assert len({line.get_color() for line in lines}) == 3


def test_png_plots_every_group_at_the_csv_steps(tmp_path):
    rows = lr_curve(schedulers.get("cosine")(warmup_steps=5), 30, [1e-4, 3e-4])
    csv_path = tmp_path / "lr.csv"
    write_csv(csv_path, rows)
    with csv_path.open() as f:
        table = list(csv.reader(f))[1:]
    fig = write_png(tmp_path / "lr.png", {"cosine": rows}, "t", ("UNet", "text encoder"))
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["cosine (UNet)", "cosine (text encoder)"]
    for column, line in enumerate(lines, 1):
        assert list(line.get_xdata()) == [int(r[0]) for r in table]  # 1..30, like the CSV
        assert list(line.get_ydata()) == [float(r[column]) for r in table]
    # Unnamed extra groups are still drawn, numbered.
    fig = write_png(tmp_path / "lr2.png", {"cosine": rows}, "t")
    assert [line.get_label() for line in fig.axes[0].get_lines()] == [
        "cosine (group 0)",
        "cosine (group 1)",
    ]


def test_png_legend_sits_outside_the_axes(tmp_path):
    curves = {
        name: lr_curve(schedulers.get(name)(warmup_steps=10), 200, [1e-4, 5e-5])
        for name in ("cosine", "linear", "rex")
    }
    fig = write_png(tmp_path / "lr.png", curves, "t", ("UNet", "text encoder"))
    renderer = fig.canvas.get_renderer()
    axes_box = fig.axes[0].get_window_extent(renderer)
    (legend,) = fig.legends
    legend_box = legend.get_window_extent(renderer)
    assert legend_box.y1 <= axes_box.y0  # wholly below the plotting area
    assert legend_box.x0 >= 0 and legend_box.x1 <= fig.bbox.x1  # and inside the image
    assert len(legend.get_texts()) == 6


def test_runs_under_one_label_share_its_colour_and_legend_entry():
    """A sweep's applied LRs: each run's logged steps and LRs as a Curve, several seeds of one
    configuration under one label; group names may leave the first group unnamed."""
    run = Curve([1, 2, 3], [[1e-4, 1e-5], [2e-4, 2e-5], [3e-4, 3e-5]])
    other = Curve([1, 2], [[5e-5, 5e-6], [4e-5, 4e-6]])
    pairs = [("lr=1e-4", run), ("lr=1e-4", run), ("lr=5e-5", other)]
    fig = lr_figure(pairs, "Applied LR per update", ("", "text encoder"))
    lines = fig.axes[0].get_lines()
    assert [line.get_color() for line in lines] == ["C0", "C0", "C0", "C0", "C1", "C1"]
    assert [line.get_label() for line in lines if not line.get_label().startswith("_")] == [
        "lr=1e-4",
        "lr=1e-4 (text encoder)",
        "lr=5e-5",
        "lr=5e-5 (text encoder)",
    ]
    assert list(lines[0].get_xdata()) == [1, 2, 3] and list(lines[5].get_ydata()) == [5e-6, 4e-6]
    (legend,) = fig.legends
    assert len(legend.get_texts()) == 4


def test_the_docs_figure_draws_every_example_with_the_same_builder(tmp_path):
    from plot_schedules import EXAMPLES, TOTAL_STEPS, plot

    out = tmp_path / "lr_schedules.png"
    fig = plot(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert len(lines) == len(EXAMPLES) + 1  # the warmup panel draws two shapes
    assert all(list(line.get_xdata()) == list(range(1, TOTAL_STEPS + 1)) for line in lines)


def test_format_table_shows_first_last_and_peak():
    rows = lr_curve(schedulers.get("cosine")(warmup_steps=37), 1000, [1e-4])
    text = format_table(rows, max_rows=8)
    lines = text.splitlines()
    assert lines[0].split() == ["step", "lr_0"]
    shown = [int(line.split()[0]) for line in lines[1:]]
    # numbered from 1; the peak is update index 37, the 38th update
    assert shown[0] == 1 and shown[-1] == 1000 and 38 in shown and len(shown) <= 8
    assert shown == sorted(shown)
    assert format_table([]) == "(no updates)"
