"""The report's page, as markdown (``summary.md``) and as self-contained HTML
(``report.html``): the verdict first (one sentence, the ranked table with intervals, how it
was decided), then the pictures, then every run."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trainer.sweep.verdict import LEVEL, MAX_SEEDS, Summary, Verdict, rank, unplaced_reason

CAPTIONS = {
    "val_loss.png": "Fixed-seed validation loss over updates (one colour per configuration, "
    "one marker per seed)",
    "timestep_loss.png": "Final validation loss at each fixed timestep, and the paired "
    "difference to the best there: high timesteps are mostly noise (layout, colour), low ones "
    "nearly clean (fine detail)",
    "pareto.png": "The two objectives' means per configuration, and their Pareto front",
    "lr_curves.png": "Applied LR per optimizer update, from each run's metrics.jsonl",
    "samples.png": "Samples at the end of training (same prompts and seeds)",
}
RUN_COLUMNS_SHOWN = ("trial", "seed", "state", "final_val_loss", "best_val_loss", "clip_t",
                     "clip_i", "dino", "final_train_loss", "updates", "wall_s", "overrides",
                     "optuna_trial", "error")  # fmt: skip


def _num(x: float | None, digits: int = 6) -> str:
    return "" if x is None or math.isnan(x) else f"{x:.{digits}g}"


def _p(x: float) -> str:
    """A p-value as a reader takes it in: three decimals, or "< 0.001"."""
    return "" if math.isnan(x) else ("< 0.001" if x < 0.001 else f"{x:.3f}")


def ranking(verdict: Verdict, summaries: Sequence[Summary]) -> tuple[list[str], list[list[str]]]:
    """The ranked table: every configuration, its place, its gap to the best with the
    interval, the tests' p-values and, for a tie, the seeds that would resolve it."""
    header = [
        "rank", "configuration", "seeds", f"mean ({verdict.objective.title})", "std",
        "gap to best", f"{LEVEL:.0%} interval", "p (paired t)",
        f"p (Holm, {verdict.pairs} pairs)", "place", "seeds to resolve",
    ]  # fmt: skip
    compared = {c.label: c for c in verdict.comparisons}
    body = []
    for i, s in enumerate(rank(summaries, verdict.objective), 1):
        cells = [str(i) if s.complete else "–", s.label, f"{s.n}/{len(s.seeds)}",
                 _num(s.mean), _num(s.std, 3)]  # fmt: skip
        c = compared.get(s.label)
        if verdict.best is not None and s.label == verdict.best.label and s.complete:
            cells += ["", "", "", "", "best", ""]
        elif c is not None:
            needed = ""
            if c.seeds_needed is not None:
                more = c.seeds_needed > MAX_SEEDS
                needed = f"> {MAX_SEEDS}" if more else str(c.seeds_needed)
            p_values = [_p(c.p), _p(c.p_holm)] if c.place != "identical" else ["", ""]
            interval = f"[{_num(c.low, 3)}, {_num(c.high, 3)}]" if c.place != "identical" else ""
            place = "identical to the best" if c.place == "identical" else c.place
            cells += [_num(c.gap, 3), interval, *p_values, place, needed]
        else:
            reason = unplaced_reason(s) if not s.complete else "no test (one seed)"
            cells += ["", "", "", "", f"not placed: {reason}" if not s.complete else reason, ""]
        body.append(cells)
    return header, body


@dataclass
class Page:
    """Everything the page shows."""

    name: str
    verdicts: Sequence[Verdict]
    summaries: Sequence[Sequence[Summary]]  # per objective
    front: list[str] | None
    scores: dict[str, dict[str, float]]  # label -> score -> mean at the end
    rows: Sequence[dict[str, str]]
    images: dict[str, bytes]
    efficiency: str = ""  # trainer/sweep/efficiency.py's line

    def blocks(self) -> list[tuple[str, Any]]:
        """The page as (kind, content) blocks: "h1", "h2", "lead", "p", "table", "image"."""
        out: list[tuple[str, Any]] = [("h1", f"Sweep {self.name}")]
        for i, (v, s) in enumerate(zip(self.verdicts, self.summaries, strict=True)):
            if i:
                out.append(("h2", f"On the {v.objective.title}"))
            out.append(("lead" if i == 0 else "p", v.text))
            if v.best is not None:
                out.append(("table", ranking(v, s)))
            if v.method:
                out.append(("p", v.method))
        if self.front is not None:
            titles = " and ".join(v.objective.title for v in self.verdicts)
            front = ", ".join(self.front)
            out.append(("p", f"Pareto front of the {titles} (means over seeds; no "
                             f"configuration does better on both): {front}."))  # fmt: skip
        if self.scores:
            names = sorted({k for v in self.scores.values() for k in v})
            body = [[label, *(_num(v.get(k, math.nan)) for k in names)]
                    for label, v in self.scores.items()]  # fmt: skip
            out.append(("h2", "Image scores at the end of training (mean over seeds)"))
            out.append(("table", (["configuration", *names], body)))
        if self.efficiency:
            out.append(("p", self.efficiency))
        out.append(("h2", "Pictures"))
        out += [("image", name) for name in CAPTIONS if name in self.images]
        out.append(("h2", "Runs"))
        shown = [c for c in RUN_COLUMNS_SHOWN if any(r.get(c) for r in self.rows)]
        out.append(("table", (shown, [[r[c] for c in shown] for r in self.rows])))
        return out

    def markdown(self) -> str:
        parts = []
        for kind, content in self.blocks():
            if kind == "h1":
                parts.append(f"# {content}")
            elif kind == "h2":
                parts.append(f"## {content}")
            elif kind == "lead":
                parts.append(f"**Verdict:** {content}")
            elif kind == "p":
                parts.append(str(content))
            elif kind == "table":
                header, body = content
                esc = [[c.replace("|", "\\|") for c in r] for r in body]
                lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                parts.append("\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc]))
            elif kind == "image":
                parts.append(f"![{CAPTIONS[str(content)]}]({content})")
        return "\n\n".join(parts) + "\n"

    def html(self) -> str:
        """One self-contained page: no file or network access needed to show it."""
        e = html.escape
        parts = []
        for kind, content in self.blocks():
            if kind in ("h1", "h2"):
                parts.append(f"<{kind}>{e(str(content))}</{kind}>")
            elif kind == "lead":
                parts.append(f"<p class='verdict'>{e(str(content))}</p>")
            elif kind == "p":
                parts.append(f"<p>{e(str(content))}</p>")
            elif kind == "table":
                header, body = content
                head = "".join(f"<th>{e(h)}</th>" for h in header)
                cells = "".join(
                    "<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in body
                )
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            elif kind == "image":
                data = base64.b64encode(self.images[str(content)]).decode()
                alt = e(CAPTIONS[str(content)])
                parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
                             f"<figcaption>{alt}</figcaption></figure>")  # fmt: skip
        css = (
            "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
            "table{border-collapse:collapse;margin:1em 0;font-size:.9em}"
            "td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left}"
            "th{background:#f3f3f3}.verdict{font-size:1.15em;padding:.8em;background:#eef6ee}"
            "img{max-width:100%}figure{margin:1.5em 0}"
        )
        title = e(f"Sweep {self.name}")
        return (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{css}</style></head><body>" + "".join(parts) + "</body></html>\n"
        )
