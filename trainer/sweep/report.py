"""The sweep's report, written into the sweep folder (``--report-only`` rebuilds it alone).

The verdict comes first: one sentence, then the ranked table with each configuration's gap
to the best and its interval, then how it was decided, then the pictures
(``trainer/sweep/figures.py``), then one row per run.

- ``report.html``: all of it on one self-contained page (images embedded as data URIs);
- ``summary.md``: the same in markdown, the images beside it;
- ``summary.json``: every number of the verdict and the runs, for scripts;
- ``summary.csv``: one row per run (configuration × seed): its overrides, seed, state, final
  and best validation loss, image scores, final train loss, updates and wall time;
- ``lr_curves.png``, ``val_loss.png``, ``timestep_loss.png``, ``samples.png`` (and
  ``pareto.png`` with two objectives).

Every file is written atomically, so two workers finishing at once leave one whole report.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trainer.files import write_bytes, write_text
from trainer.report.image_scores import SCORES
from trainer.sweep import efficiency, figures, report_page
from trainer.sweep.engine import seeds as sweep_seeds
from trainer.sweep.objectives import OBJECTIVES, Objective
from trainer.sweep.overrides import set_flags
from trainer.sweep.results import RunResult
from trainer.sweep.spec import Spec
from trainer.sweep.verdict import ALPHA, LEVEL, Summary, Verdict, decide, rank, unplaced_reason

FIGURES = ("val_loss.png", "timestep_loss.png", "lr_curves.png", "samples.png")
PARETO = "pareto.png"
FILES = ("summary.csv", "summary.md", "summary.json", *FIGURES, "report.html")
COLUMNS = (
    "trial", "seed", "state", "final_val_loss", "best_val_loss", *SCORES, "final_train_loss",
    "updates", "wall_s", "overrides", "folder", "optuna_trial", "error",
)  # fmt: skip


def summaries(spec: Spec, results: Sequence[RunResult], objective: Objective) -> list[Summary]:
    """Each configuration's values on ``objective`` per finished seed, in the sweep's order,
    with the state of every seed that has none."""
    seeds = tuple(sweep_seeds(spec))
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.run.point.label, []).append(r)
    out = []
    for label, runs in groups.items():
        values = {r.run.seed: r.value(objective) for r in runs}
        missing = {r.run.seed: r.state for r in runs if values[r.run.seed] is None}
        done = {seed: v for seed, v in values.items() if v is not None}
        out.append(Summary(label, done, seeds, missing))
    return out


def row(r: RunResult) -> dict[str, str]:
    """A run as the text of its CSV/markdown row."""

    def num(x: float | None) -> str:
        return "" if x is None else f"{x:.6g}"

    final = r.metrics[-1] if r.finished else {}
    return {
        "trial": r.run.point.label,
        "seed": str(r.run.seed),
        "state": r.state,
        "final_val_loss": num(r.final_val),
        "best_val_loss": num(r.best_val),
        **{k: num(final.get(k)) for k in SCORES},
        "final_train_loss": num(r.final_loss),
        "updates": str(r.updates),
        "wall_s": f"{r.wall_s:.1f}",
        "overrides": "; ".join(set_flags(r.run.point.settings)),
        "folder": str(r.folder),
        "optuna_trial": "" if r.trial is None else str(r.trial),
        "error": r.error.splitlines()[-1] if r.error else "",
    }


def write(spec: Spec, results: Sequence[RunResult]) -> tuple[Path, Verdict]:
    """Write every report file into the sweep folder; return the HTML page and the verdict
    on the first objective."""
    out = spec.sweep_dir
    objectives = spec.objectives or (OBJECTIVES["final"],)
    per_objective = [summaries(spec, results, o) for o in objectives]
    verdicts = [decide(s, o) for s, o in zip(per_objective, objectives, strict=True)]
    rows = [row(r) for r in results]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "summary.csv", buf.getvalue())
    labels = list(dict.fromkeys(r.run.point.label for r in results))
    best = verdicts[0].best.label if verdicts[0].best else None
    images = {
        "val_loss.png": figures.val_figure(results),
        "timestep_loss.png": figures.timestep_figure(results, labels, best),
        "lr_curves.png": figures.lr_figure(results),
        "samples.png": figures.samples_figure(results),
    }
    front = None
    if len(objectives) == 2:
        first, second = per_objective
        images[PARETO] = figures.pareto_figure(first, second, objectives)
        points = figures.pareto_points(first, second)
        front = figures.pareto_front(points, objectives)
    elif (out / PARETO).exists():
        (out / PARETO).unlink()  # from an earlier report with two objectives
    for name, data in images.items():
        write_bytes(out / name, data)
    scores = score_means(spec, results)
    spent = efficiency.measure(out, results)
    page = report_page.Page(
        spec.name, verdicts, per_objective, front, scores, rows, images, spent.line()
    )
    write_text(out / "summary.md", page.markdown())
    write_text(out / "summary.json", json.dumps(
        {**summary_json(spec, verdicts, per_objective, front, scores, results),
         "efficiency": asdict(spent)}, indent=1
    ) + "\n")  # fmt: skip
    html_path = write_text(out / "report.html", page.html())
    return html_path, verdicts[0]


def score_means(spec: Spec, results: Sequence[RunResult]) -> dict[str, dict[str, float]]:
    """Each configuration's mean image scores at the end, over its finished seeds (only the
    scores some run recorded)."""
    out: dict[str, dict[str, float]] = {}
    for name in SCORES:
        for s in summaries(spec, results, OBJECTIVES[name]):
            if s.values:
                out.setdefault(s.label, {})[name] = s.mean
    return out


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def verdict_json(verdict: Verdict, ranked: Sequence[Summary]) -> dict[str, Any]:
    """One objective's verdict, every configuration with every number."""
    compared = {c.label: c for c in verdict.comparisons}
    configs = []
    for s in ranked:
        entry: dict[str, Any] = {
            "label": s.label,
            "values": {str(k): v for k, v in s.values.items()},
            "mean": _finite(s.mean),
            "std": _finite(s.std),
        }
        if verdict.best is not None and s.label == verdict.best.label and s.complete:
            entry["place"] = "best"
        elif s.label in compared:
            c = {k: _finite(v) if isinstance(v, float) else v
                 for k, v in asdict(compared[s.label]).items()}  # fmt: skip
            entry.update({k: v for k, v in c.items() if k != "label"})
        else:
            entry["place"] = "not placed" if not s.complete else "ranked"
            if not s.complete:
                entry["reason"] = unplaced_reason(s)
                entry["missing"] = {str(k): v for k, v in s.missing.items()}
        configs.append(entry)
    o = verdict.objective
    return {
        "objective": o.name,
        "title": o.title,
        "lower_is_better": o.lower_is_better,
        "kind": verdict.kind,
        "text": verdict.text,
        "method": verdict.method,
        "best": verdict.best.label if verdict.best else None,
        "pairs": verdict.pairs,
        "configurations": configs,
    }


def summary_json(
    spec: Spec,
    verdicts: Sequence[Verdict],
    per_objective: Sequence[Sequence[Summary]],
    front: list[str] | None,
    scores: dict[str, dict[str, float]],
    results: Sequence[RunResult],
) -> dict[str, Any]:
    """Every number of the report: the verdicts, the test, the runs."""
    steps, table = figures.timestep_table(results, [s.label for s in per_objective[0]])
    return {
        "sweep": spec.name,
        "test": {
            "name": "paired t-test (scipy.stats.ttest_rel), two-sided",
            "correction": "Holm over every pair of placed configurations "
            "(statsmodels.stats.multitest.multipletests, method='holm')",
            "level": ALPHA,
            "confidence": LEVEL,
            "interval": "t-interval of the mean paired difference, this pair alone; "
            "low_all/high_all: Bonferroni over every pair",
        },
        "seeds": list(sweep_seeds(spec)),
        "verdicts": [
            verdict_json(v, rank(s, v.objective))
            for v, s in zip(verdicts, per_objective, strict=True)
        ],
        "pareto_front": front,
        "image_scores": scores,
        "timesteps": steps,
        "timestep_losses": {
            label: {str(seed): {str(t): v for t, v in by_t.items()} for seed, by_t in seeds.items()}
            for label, seeds in table.items()
        },
        "runs": [run_json(r) for r in results],
    }


def run_json(r: RunResult) -> dict[str, Any]:
    """One run's numbers (None where it has none)."""
    final = r.metrics[-1] if r.finished else {}
    return {
        "configuration": r.run.point.label,
        "seed": r.run.seed,
        "state": r.state,
        "final_val_loss": r.final_val,
        "best_val_loss": r.best_val,
        **{k: final.get(k) for k in SCORES},
        "final_train_loss": r.final_loss,
        "updates": r.updates,
        "wall_s": r.wall_s,
        "overrides": list(set_flags(r.run.point.settings)),
        "folder": str(r.folder),
        "optuna_trial": r.trial,
        "error": r.error,
    }
