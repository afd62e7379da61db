"""Before/after of a sweep's cost in one sitting: the same sweep file without the shared
cache, shared prefixes and warm workers (``share_cache``, ``share_prefixes``,
``warm_workers``), with the first two only, and with all three (the defaults), one after the
other.

For each it records the sweep command's wall time and the report's efficiency
(``summary.json``: updates trained against a from-scratch sweep's, seconds in the training
loops against the runs' wall time), and prints a markdown table for BENCHMARKS.md. The
sweeps train the same LoRAs (tests/test_prefixes.py, tests/test_shared_cache.py,
tests/test_sweep_warm.py), so only the cost differs. Ratios are measured in one run on one
machine; run nothing else meanwhile.

    python scripts/bench_sweep.py configs/sweeps/tiny_schedules.toml --json bench_sweep.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# share_cache, share_prefixes, warm_workers
VARIANTS = {
    "before (all three off: a process per trial)": (False, False, False),
    "shared cache and prefixes (warm_workers = false)": (True, True, False),
    "after (the defaults: all three on)": (True, True, True),
}
KEYS = ("share_cache", "share_prefixes", "warm_workers")


def variant_file(sweep: Path, folder: Path, values: tuple[bool, ...]) -> Path:
    """A copy of the sweep file with the three keys set and its base made absolute."""
    text = sweep.read_text()
    text = re.sub(rf"(?m)^({'|'.join(KEYS)})\s*=.*$", "", text)
    base = re.search(r'(?m)^base\s*=\s*"([^"]+)"', text)
    if base is None:
        raise SystemExit(f'error: {sweep}: no base = "..." line')
    absolute = (sweep.parent / base.group(1)).resolve()
    text = text.replace(base.group(0), f'base = "{absolute}"')
    keys = "".join(f"{k} = {str(v).lower()}\n" for k, v in zip(KEYS, values, strict=True))
    path = folder / sweep.name
    path.write_text(keys + text)
    return path


def measure(sweep: Path, out: Path) -> dict:
    start = time.monotonic()
    cmd = [sys.executable, "-m", "trainer.commands.cli", "sweep", str(sweep), "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"error: the sweep failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    spent = json.loads((out / "summary.json").read_text())["efficiency"]
    return {"sweep_wall_s": round(wall, 1), **spent}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep file (default: the shipped example)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, values) in enumerate(VARIANTS.items()):
            folder = Path(tmp) / str(i)
            folder.mkdir()
            rows[name] = measure(variant_file(args.sweep, folder, values), folder / "out")
            shutil.rmtree(folder / "out", ignore_errors=True)
    machine = f"{platform.node()}, {platform.processor() or platform.machine()}"
    print(f"{args.sweep} on {machine}\n")
    print("| variant | sweep wall s | runs' wall s | training s | training share | updates "
          "trained / from scratch |\n|---|---|---|---|---|---|")  # fmt: skip
    for name, r in rows.items():
        share = r["train_s"] / r["wall_s"] if r["wall_s"] else 0.0
        print(f"| {name} | {r['sweep_wall_s']:.1f} | {r['wall_s']:.1f} | {r['train_s']:.1f} | "
              f"{share:.0%} | {r['trained']} / {r['scratch']} |")  # fmt: skip
    before = next(iter(rows.values()))
    for name, r in list(rows.items())[1:]:
        ratio = r["sweep_wall_s"] / before["sweep_wall_s"]
        print(f"\n{name} / before, sweep wall time: {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
