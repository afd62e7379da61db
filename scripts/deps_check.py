"""Drift and floors: build a throwaway environment, run the fast suite in it, and report.

    python scripts/deps_check.py latest [--lock requirements/cpu.lock]   # make test-latest
    python scripts/deps_check.py floors [--lock requirements/cpu.lock]   # make test-floors

``latest`` installs the newest release of every dependency that ``pyproject.toml``'s ranges
allow, the way a user's plain ``pip install -e .`` would today, and prints which packages moved
relative to the lock. ``floors`` installs the lowest version each range allows (uv's
``--resolution lowest-direct``: the floors of our own requirements, the newest of everything
they pull in). Both then run the fast suite (``-m "not slow and not heavy"``) and print what
failed, so a registry release that breaks us is a report, not a red CI.

torch is held at the lock's build in both: PyPI's Linux torch wheels are multi-GB CUDA builds,
and the CPU build of each release lives on PyPI's side only as PyTorch's own index. The report
says which newer torch releases exist.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST_SUITE = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow and not heavy"]
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def canonical(name: str) -> str:
    """PEP 503's normalised package name (``Pillow`` and ``pillow`` are one package)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """``{name: version}`` from a pip-compile / uv lock (``name==version`` lines)."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            pins[canonical(name.split("[", 1)[0])] = version.strip()
    return pins


def installed(python: Path) -> dict[str, str]:
    """What a venv holds, as ``{name: version}`` (the project itself left out)."""
    out = subprocess.run(
        [str(python), "-m", "pip", "list", "--format", "json", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {canonical(p["name"]): p["version"] for p in json.loads(out)}


def moved(lock: dict[str, str], now: dict[str, str]) -> list[tuple[str, str, str]]:
    """``(name, locked, installed)`` for every package whose version differs; ``-`` where a
    package is on one side only. pip, setuptools and wheel belong to the venv, not to us."""
    venv_own = {"pip", "setuptools", "wheel"}
    rows = []
    for name in sorted((set(lock) | set(now)) - venv_own):
        if lock.get(name) != now.get(name):
            rows.append((name, lock.get(name, "-"), now.get(name, "-")))
    return rows


def pip_find_links() -> str:
    """The find-links pip is configured with ('' if none): these machines keep PyTorch's CPU
    build there."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    found = re.search(r"find-links='([^']*)'", out)
    return found.group(1).split()[0] if found else ""


def pip_torch_source() -> list[str]:
    """pip's arguments to find PyTorch's CPU build: none where pip has find-links, else
    PyTorch's CPU index."""
    return [] if pip_find_links() else ["--extra-index-url", TORCH_CPU_INDEX]


def make_venv(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    return folder / "bin" / "python"


def pip_install(python: Path, constraints: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(constraints)
    try:
        command = [str(python), "-m", "pip", "install", "--quiet", *pip_torch_source()]
        subprocess.run(
            [*command, "-c", f.name, "-e", ".[dev]"],
            check=True,
            cwd=ROOT,
        )
    finally:
        os.unlink(f.name)


def run_fast_suite(python: Path) -> tuple[int, list[str]]:
    """The fast suite's exit code and its ``FAILED``/``ERROR`` lines."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [str(python), *FAST_SUITE, "-rfE"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    lines = proc.stdout.splitlines()
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    print("\n".join(lines[-3:]))
    return proc.returncode, failures


def newer_torch(locked: str) -> list[str]:
    """torch releases on the registry newer than the lock's (base versions, no local tag)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "torch"], capture_output=True, text=True
    ).stdout
    found = re.search(r"Available versions: (.*)", out)
    if not found:
        return []
    from packaging.version import Version

    base = Version(Version(locked).base_version)
    releases = {Version(v).base_version for v in found.group(1).split(", ")}
    return sorted((v for v in releases if Version(v) > base), key=Version, reverse=True)


def report(title: str, rows: list[tuple[str, str, str]], code: int, failures: list[str]) -> None:
    print(f"\n== {title}")
    if rows:
        width = max(len(r[0]) for r in rows)
        print(f"{len(rows)} packages differ from the lock (locked -> installed):")
        for name, old, new in rows:
            print(f"  {name:<{width}}  {old} -> {new}")
    else:
        print("every package is at its locked version")
    if code == 0:
        print("fast suite: passed")
        return
    print(f"fast suite: FAILED (exit {code}); {len(failures)} failing tests:")
    for line in failures[:40]:
        print("  " + line[:200])
    if len(failures) > 40:
        print(f"  ... and {len(failures) - 40} more")


def latest(lock_path: Path, folder: Path) -> int:
    lock = read_lock(lock_path)
    python = make_venv(folder)
    # The lock's torch only; everything else takes the newest release its range allows.
    pip_install(python, f"torch=={lock['torch']}\n")
    code, failures = run_fast_suite(python)
    rows = moved(lock, installed(python))
    report(f"newest releases against {lock_path.name}", rows, code, failures)
    newer = newer_torch(lock["torch"])
    if newer:
        print(f"torch held at {lock['torch']}; newer on the registry: {', '.join(newer)}")
    return code


def floors(lock_path: Path, folder: Path, uv: str) -> int:
    lock = read_lock(lock_path)
    with tempfile.TemporaryDirectory() as tmp:
        torch_pin = Path(tmp) / "torch.txt"
        torch_pin.write_text(f"torch=={lock['torch']}\n")
        lowest = Path(tmp) / "floors.txt"
        links = pip_find_links()
        subprocess.run(
            [uv, "pip", "compile", "pyproject.toml", "--all-extras", "--quiet"]
            + ["--resolution", "lowest-direct", "--python", sys.executable, "-c", str(torch_pin)]
            + (["--find-links", links] if links else ["--index", TORCH_CPU_INDEX])
            + ["--index-strategy", "unsafe-best-match", "-o", str(lowest)],
            check=True,
            cwd=ROOT,
        )
        python = make_venv(folder)
        pip_install(python, lowest.read_text(encoding="utf-8"))
        wanted = read_lock(lowest)
    code, failures = run_fast_suite(python)
    now = installed(python)
    report(f"lowest-direct floors against {lock_path.name}", moved(lock, now), code, failures)
    off = [n for n, v in wanted.items() if now.get(n) != v]
    if off:
        print(f"not installed at the resolved floor: {', '.join(off)}")
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["latest", "floors"])
    parser.add_argument("--lock", default="requirements/cpu.lock", type=Path)
    parser.add_argument("--venv", type=Path, help="the throwaway venv (default .venv-MODE)")
    parser.add_argument("--uv", default=str(ROOT / ".venv" / "bin" / "uv"), help="uv for floors")
    args = parser.parse_args()
    folder = args.venv or ROOT / f".venv-{args.mode}"
    lock = ROOT / args.lock if not args.lock.is_absolute() else args.lock
    if args.mode == "latest":
        return latest(lock, folder)
    return floors(lock, folder, args.uv)


if __name__ == "__main__":
    sys.exit(main())
