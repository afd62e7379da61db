"""The sweep's report, written into the sweep folder (``--report-only`` rebuilds it alone):

- ``summary.csv`` / ``summary.md``: one row per run (configuration × seed) with its
  overrides, seed, state, final and best validation loss, final train loss, updates and wall
  time; the markdown also ranks the configurations and states the verdict;
- ``lr_curves.png``: every run's applied LR per update, read from its ``metrics.jsonl``;
- ``val_loss.png``: every run's validation loss over updates;
- ``samples.png``: one row per run, the same prompts and seeds, at the end of training;
- ``report.html``: all of it on one self-contained page (images embedded as data URIs).

Every file is written atomically, so two workers finishing at once leave one whole report.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path

from schedulers import preview
from trainer.files import write_atomic, write_text
from trainer.report import grids
from trainer.step_folders import numbered_folders
from trainer.sweep.overrides import set_flags
from trainer.sweep.results import RunResult
from trainer.sweep.spec import Spec
from trainer.sweep.verdict import Summary, Verdict, decide, rank

FILES = ("summary.csv", "summary.md", "lr_curves.png", "val_loss.png", "samples.png", "report.html")
COLUMNS = (
    "trial", "seed", "state", "final_val_loss", "best_val_loss", "final_train_loss",
    "updates", "wall_s", "overrides", "folder", "optuna_trial", "error",
)  # fmt: skip


def summaries(spec: Spec, results: Sequence[RunResult]) -> list[Summary]:
    """Each configuration's completed final validation losses, in the sweep's order."""
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.run.point.label, []).append(r)
    seeds = len({r.run.seed for r in results}) or 1
    return [
        Summary(label, tuple(r.final_val for r in rs if r.final_val is not None), seeds)
        for label, rs in groups.items()
    ]


def row(r: RunResult) -> dict[str, str]:
    """A run as the text of its CSV/markdown row."""

    def num(x: float | None) -> str:
        return "" if x is None else f"{x:.6g}"

    return {
        "trial": r.run.point.label,
        "seed": str(r.run.seed),
        "state": r.state,
        "final_val_loss": num(r.final_val),
        "best_val_loss": num(r.best_val),
        "final_train_loss": num(r.final_loss),
        "updates": str(r.updates),
        "wall_s": f"{r.wall_s:.1f}",
        "overrides": "; ".join(set_flags(r.run.point.settings)),
        "folder": str(r.folder),
        "optuna_trial": "" if r.trial is None else str(r.trial),
        "error": r.error.splitlines()[-1] if r.error else "",
    }


def write(spec: Spec, results: Sequence[RunResult]) -> tuple[Path, Verdict]:
    """Write every report file into the sweep folder; return the HTML page and the verdict."""
    out = spec.sweep_dir
    ranked = rank(summaries(spec, results))
    verdict = decide(ranked)
    rows = [row(r) for r in results]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "summary.csv", buf.getvalue())
    write_text(out / "summary.md", markdown(spec, ranked, verdict, rows))
    images = {
        "lr_curves.png": lr_figure(results),
        "val_loss.png": val_figure(results),
        "samples.png": samples_figure(results),
    }
    for name, png in images.items():
        write_atomic(out / name, lambda tmp, png=png: tmp.write_bytes(png))
    page = write_text(out / "report.html", page_html(spec, ranked, verdict, rows, images))
    return page, verdict


def _fmt(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.6g}"


def ranking_rows(ranked: Sequence[Summary]) -> list[list[str]]:
    """Rank, configuration, seeds done, mean, std, SEM and mean ± 2·SEM per configuration."""
    out = []
    for i, s in enumerate(ranked, 1):
        lo, hi = s.interval()
        band = "" if math.isnan(lo) else f"[{lo:.6g}, {hi:.6g}]"
        place = str(i) if s.complete else "–"
        out.append(
            [place, s.label, f"{s.n}/{s.seeds}", _fmt(s.mean), _fmt(s.std), _fmt(s.sem), band]
        )
    return out


RULE = (
    "Objective: the final fixed-seed validation loss (lower is better). A configuration beats "
    "the runner-up only if their mean ± 2·SEM intervals over seeds do not overlap."
)
RANK_HEADER = ["rank", "configuration", "seeds done", "mean val loss", "std", "SEM", "mean ± 2·SEM"]


def markdown(spec: Spec, ranked: Sequence[Summary], verdict: Verdict, rows: list[dict]) -> str:
    def table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
        esc = [[c.replace("|", "\\|") for c in r] for r in body]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc])

    shown = [c for c in COLUMNS if c not in ("folder", "error")]
    return (
        "\n\n".join(
            [
                f"# Sweep {spec.name}",
                f"**Verdict:** {verdict.text}",
                RULE,
                "## Configurations",
                table(RANK_HEADER, ranking_rows(ranked)),
                "## Runs",
                table(shown, [[r[c] for c in shown] for r in rows]),
                "![LR per update](lr_curves.png)\n\n![Validation loss](val_loss.png)\n\n"
                "![Samples](samples.png)",
            ]
        )
        + "\n"
    )


def page_html(
    spec: Spec, ranked: Sequence[Summary], verdict: Verdict, rows: list[dict], images: dict
) -> str:
    """One self-contained page: no file or network access needed to show it."""

    def table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        cells = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>"

    def img(name: str, alt: str) -> str:
        data = base64.b64encode(images[name]).decode()
        image = f'<img src="data:image/png;base64,{data}" alt="{alt}">'
        return f"<figure>{image}<figcaption>{alt}</figcaption></figure>"

    shown = [c for c in COLUMNS if c != "folder"]
    css = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;margin:1em 0;font-size:.9em}"
        "td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left}"
        "th{background:#f3f3f3}.verdict{font-size:1.1em;padding:.8em;background:#eef6ee}"
        ".tie{background:#fbf6e6}img{max-width:100%}figure{margin:1.5em 0}"
    )
    kind = "verdict" if verdict.kind == "real" else "verdict tie"
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Sweep {html.escape(spec.name)}"
        f"</title><style>{css}</style></head><body><h1>Sweep {html.escape(spec.name)}</h1>"
        f"<p class='{kind}'>{html.escape(verdict.text)}</p>"
        f"<p>{html.escape(RULE)}</p><h2>Configurations</h2>"
        + table(RANK_HEADER, ranking_rows(ranked))
        + "<h2>Runs</h2>"
        + table(shown, [[r[c] for c in shown] for r in rows])
        + img("lr_curves.png", "Applied LR per optimizer update, from each run's metrics.jsonl")
        + img("val_loss.png", "Fixed-seed validation loss over updates")
        + img("samples.png", "Samples at the end of training (same prompts and seeds)")
        + "</body></html>\n"
    )


def _figure(width: float, height: float):
    return preview.new_figure((width, height))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _colours(results: Sequence[RunResult]) -> dict[str, str]:
    labels = list(dict.fromkeys(r.run.point.label for r in results))
    return {label: f"C{i % 10}" for i, label in enumerate(labels)}


def lr_figure(results: Sequence[RunResult]) -> bytes:
    """Every run's applied LR per update (param group 0 solid, the others dashed, named as
    ``metrics.jsonl`` names them), drawn by the same builder as ``sdlora lr-plot``."""
    pairs, named = [], set()
    for r in results:
        logged = [m for m in r.metrics if m.get("lr")]
        steps = [m["step"] for m in logged]
        pairs.append((r.run.point.label, preview.Curve(steps, [m["lr"] for m in logged])))
        named.add(tuple(logged[0].get("lr_groups", ())) if logged else ())
    # The groups by name (the first: the run's label alone) when every run has the same ones;
    # runs logged before groups were named, or with other groups, by number.
    (groups,) = named if len(named) == 1 else [()]
    names = ["", *groups[1:]] if groups else ["", "text encoder"]
    fig = preview.lr_figure(pairs, "Applied LR per update", names, size=(9, 5))
    return _png(fig)


def val_figure(results: Sequence[RunResult]) -> bytes:
    """Every run's validation loss over updates (one colour per configuration)."""
    fig = _figure(9, 5)
    ax = fig.add_subplot()
    colours, labelled = _colours(results), set()
    markers = "os^vDP*X"
    seeds = sorted({r.run.seed for r in results})
    for r in results:
        points = [(m["step"], m["val_loss"]) for m in r.metrics if "val_loss" in m]
        if not points:
            continue
        label = r.run.point.label
        ax.plot(*zip(*points, strict=True), "-", marker=markers[seeds.index(r.run.seed) % 8],
                color=colours[label], label=None if label in labelled else label)  # fmt: skip
        labelled.add(label)
    ax.set(xlabel="optimizer update", ylabel="validation loss", title="Fixed-seed validation loss")
    if labelled:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize="small")
    return _png(fig)


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
        return _png(fig)
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
    return _png(fig)
