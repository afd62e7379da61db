"""The GPU check's report: ``bench_gpu.json`` and ``bench_gpu.md`` from whatever steps finished.

scripts/gpu_check.sh runs this after every benchmark step and at the end, so a check cut
short still leaves a report of what it measured. It reads, from the check's work folder:
``steps.tsv`` (each step's result and seconds), ``env.json`` (gpu_env.py versions), and the
``bench_gpu.py`` reports ``sd15.json``, ``xformers.json``, ``extras.json`` (one model, one
sitting: their runs are merged into one table, the comparisons recomputed over all of them)
and ``sdxl.json``. Any of them may be missing.

Usage:
    python scripts/gpu_check_report.py --work DIR --out DIR
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from bench_report import compare, markdown, targets

from trainer import files

SD15_PARTS = ("sd15", "xformers", "extras")  # reports on the sd15-shape model, in step order
# Which step writes each file of the work folder.
STEP_OF = {"env": "env", "sd15": "sd15", "xformers": "extras", "extras": "extras", "sdxl": "sdxl"}
STEP_FIELDS = ("step", "result", "seconds", "limit_s")


def read_steps(path: Path) -> list[dict[str, Any]]:
    """The rows of ``steps.tsv`` (step, result, seconds, limit), in the order they ran."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle, fieldnames=STEP_FIELDS, delimiter="\t"))
    for row in rows:
        row["seconds"] = int(row["seconds"])
        row["limit_s"] = int(row["limit_s"]) if row["limit_s"] else None
    return rows


def merge(reports: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One report of the runs of several ``bench_gpu.py`` reports on the same model: the
    first report's set-up, every run, the comparisons and targets over all of them."""
    if not reports:
        return None
    first = reports[0]
    merged = {
        "meta": {**first["meta"], "command": " ; ".join(r["meta"]["command"] for r in reports)},
        "peak": first["peak"],
        "flops_per_image": first["flops_per_image"],
        "runs": [run for r in reports for run in r["runs"]],
        "not_run": [name for r in reports for name in r.get("not_run", [])],
    }
    merged["comparisons"] = compare(merged["runs"])
    merged["targets"] = targets(merged)
    return merged


def build(work: Path) -> dict[str, Any]:
    """The whole report from the files in ``work`` (see the module docstring)."""

    def load(name: str) -> dict[str, Any] | None:
        path = work / name
        return json.loads(path.read_text()) if path.is_file() else None

    check = load("check.json") or {}
    sd15 = [r for r in (load(f"{part}.json") for part in SD15_PARTS) if r is not None]
    asked = check.get("steps_asked", ",".join(STEP_OF.values())).split(",")
    # Reports this call's steps did not write: a work folder reused from an earlier call.
    earlier = [
        p for p, step in STEP_OF.items() if step not in asked and (work / f"{p}.json").is_file()
    ]
    return {
        "check": {
            **check,
            "steps": read_steps(work / "steps.tsv"),
            "env": load("env.json"),
            "earlier": earlier,
        },
        "sd15": merge(sd15),
        "sdxl": merge([r for r in [load("sdxl.json")] if r is not None]),
    }


def to_markdown(report: dict[str, Any]) -> str:
    """The check's header (steps, versions), then each model's tables from bench_report."""
    check = report["check"]
    mode = " (dry run: CPU, tiny shapes; the figures mean nothing)" if check.get("dry_run") else ""
    lines = [f"## GPU check{mode}", ""]
    if check.get("started"):
        lines.append(
            f"Started {check['started']} on {check.get('host', '?')}; deadline "
            f"{check.get('deadline_s', '?')} s; peer script: {check.get('peer') or 'none'}."
        )
        lines.append("")
    if check.get("earlier"):
        lines += [
            f"Also in the tables: {', '.join(check['earlier'])}, measured by an earlier call in "
            "the same work folder (this call did not run those steps).",
            "",
        ]
    lines += ["| step | result | seconds | limit (s) |", "|---|---|---|---|"]
    for s in check["steps"]:
        lines.append(f"| {s['step']} | {s['result']} | {s['seconds']} | {s['limit_s'] or '—'} |")
    lines += _env_lines(check.get("env"))
    for key, title in (("sd15", "SD-1.5 shapes"), ("sdxl", "SDXL shapes")):
        lines += ["", f"## {title}", ""]
        lines.append(markdown(report[key]) if report[key] else "Not measured in this check.\n")
    return "\n".join(lines).rstrip("\n") + "\n"


def _env_lines(env: dict[str, Any] | None) -> list[str]:
    if not env:
        return []
    facts = env["facts"]
    lines = ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in facts.items()), ""]
    lines += ["| package | version | against the lock and sdlora's ranges |", "|---|---|---|"]
    for p in env["packages"]:
        lines.append(f"| {p['name']} | {p['version'] or '—'} | {p['status']} |")
    lines += [f"- unmet: {u}" for u in env.get("unmet", [])]
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="the check's work folder")
    p.add_argument("--out", type=Path, required=True, help="where bench_gpu.json/.md go")
    args = p.parse_args(argv)
    report = build(args.work)
    files.write_json(args.out / "bench_gpu.json", report)
    files.write_text(args.out / "bench_gpu.md", to_markdown(report))


if __name__ == "__main__":
    main()
