"""The environment step of scripts/gpu_check.sh: install the carried wheels, say what runs.

``install``: the wheels `make gpu-wheels` put in ``.whl/`` go into a target folder with
``pip install --no-index --no-deps`` (the machine reaches no registry), which the check then
puts first on ``PYTHONPATH``. ``xformers``: the same for ``.whl/xformers/``, and its CUDA 12.8
``libcudart.so.12`` unpacked into a library folder (not installed: that wheel's ``nvidia``
package would shadow the image's). ``versions``: every package the check uses, the version
found and where, against requirements/cuda.lock and sdlora's ranges, plus torch's CUDA facts;
the requirements of every carried package checked against what is installed.

Usage:
    python scripts/gpu_env.py install --wheels .whl --target /tmp/site
    python scripts/gpu_env.py xformers --wheels .whl/xformers --target DIR --lib DIR
    python scripts/gpu_env.py versions [--json env.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import tomllib
from gpu_wheels import (
    DOWNLOAD,
    FROM_LOCK,
    LOCK,
    PEER,
    canonical,
    duplicates,
    read_lock,
)
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
# Beyond sdlora's own dependencies and the carried wheels: what the check also runs on.
ALSO = ["torchvision", "huggingface-hub", "tokenizers", "pyarrow", "fsspec", "pytest", "triton"]


def install(wheels: Path, target: Path, pattern: str = "*.whl", dry_run: bool = False) -> None:
    """``pip install --no-index --no-deps`` the wheels of ``wheels`` matching ``pattern``
    into ``target``; ``dry_run``: only check that they install on the GPU machine's Python
    (3.12, manylinux x86-64), from any Python here.

    Raises:
        SystemExit: when the folder has no such wheels or two versions of one package.
    """
    found = sorted(wheels.glob(pattern))
    if not found:
        raise SystemExit(f"error: no wheels in {wheels}; run make gpu-wheels where pip works")
    if duplicates(wheels):
        raise SystemExit(f"error: two versions of one package in {wheels}: {duplicates(wheels)}")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    cmd += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target)]
    if dry_run:
        cmd += ["--dry-run", *DOWNLOAD]
    subprocess.run([*cmd, *map(str, found)], check=True)
    print(f"{'checked' if dry_run else 'installed'} {len(found)} wheels for {target}")


def unpack_cudart(wheels: Path, lib: Path) -> Path:
    """``libcudart.so.12`` from the carried nvidia-cuda-runtime-cu12 wheel, into ``lib``."""
    runtime = sorted(wheels.glob("nvidia_cuda_runtime_cu12-*.whl"))
    if not runtime:
        raise SystemExit(f"error: no nvidia_cuda_runtime_cu12 wheel in {wheels}")
    lib.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(runtime[0]) as wheel:
        for member in wheel.namelist():
            if Path(member).name.startswith("libcudart.so"):
                (lib / Path(member).name).write_bytes(wheel.read(member))
    return lib


def names() -> list[str]:
    """sdlora's core dependencies, the carried packages, and :data:`ALSO`, in that order."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = [canonical(Requirement(r).name) for r in project["dependencies"]]
    # xformers, not its CUDA runtime wheel: that one is unpacked, never installed.
    listed = [*core, *FROM_LOCK, *PEER, "xformers", *ALSO]
    return list(dict.fromkeys(listed))


def ranges() -> dict[str, str]:
    """sdlora's declared range of each core dependency (``torch``: ``>=2.13,<2.15``)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = {}
    for text in project["dependencies"]:
        req = Requirement(text)
        out[canonical(req.name)] = str(req.specifier)
    return out


def versions(lock_path: Path = LOCK) -> list[dict[str, Any]]:
    """One row per package of :func:`names`: version found, where, lock pin, sdlora's range."""
    lock, declared = read_lock(lock_path), ranges()
    rows = []
    for name in names():
        row: dict[str, Any] = {"name": name, "lock": lock.get(name), "range": declared.get(name)}
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            row.update(version=None, where=None, status="not installed")
            rows.append(row)
            continue
        row["version"] = dist.version
        row["where"] = str(dist.locate_file(""))
        row["status"] = _status(row)
        rows.append(row)
    return rows


def _status(row: dict[str, Any]) -> str:
    from packaging.specifiers import SpecifierSet

    if row["range"] and not SpecifierSet(row["range"]).contains(row["version"], prereleases=True):
        return f"OUTSIDE sdlora's range {row['range']}"
    if row["lock"] is None:
        return "not in the lock"
    return "= lock" if row["version"] == row["lock"] else f"lock has {row['lock']}"


def unmet() -> list[str]:
    """Each requirement of a carried package that the installed packages do not meet
    (installed with --no-deps, nothing else checks them)."""
    env = {"extra": ""}
    problems = []
    for name in [*FROM_LOCK, *PEER, "xformers"]:
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            try:
                found = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                problems.append(f"{name} needs {req}: not installed")
                continue
            if not req.specifier.contains(found, prereleases=True):
                problems.append(f"{name} needs {req}: {found} is installed")
    return problems


def cuda_facts() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if facts["cuda_available"]:
        facts["device"] = torch.cuda.get_device_name()
        facts["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        facts["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return facts


def report(lock: Path = LOCK) -> dict[str, Any]:
    """Print and return the versions, the unmet requirements and torch's CUDA facts."""
    rows, problems, facts = versions(lock), unmet(), cuda_facts()
    print(" ".join(f"{k}={v}" for k, v in facts.items()))
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        where = "" if r["where"] is None else f"  ({r['where']})"
        print(f"  {r['name']:{width}}  {r['version'] or '—':14}  {r['status']}{where}")
    for line in problems:
        print(f"  unmet: {line}")
    return {"facts": facts, "lock": str(lock), "packages": rows, "unmet": problems}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="install the carried wheels into --target")
    inst.add_argument("--wheels", type=Path, required=True)
    inst.add_argument("--target", type=Path, required=True)
    inst.add_argument("--dry-run", action="store_true", help="check the set, install nothing")
    xf = sub.add_parser("xformers", help="install xformers into --target, libcudart into --lib")
    xf.add_argument("--wheels", type=Path, required=True)
    xf.add_argument("--target", type=Path, required=True)
    xf.add_argument("--lib", type=Path, required=True)
    ver = sub.add_parser("versions", help="what the check runs with")
    ver.add_argument("--json", type=Path, help="also write it here")
    ver.add_argument("--lock", type=Path, default=LOCK, help="the pins to compare with")
    args = p.parse_args(argv)
    if args.command == "install":
        install(args.wheels, args.target, dry_run=args.dry_run)
    elif args.command == "xformers":
        install(args.wheels, args.target, "xformers-*.whl")
        print(f"libcudart.so.12 in {unpack_cudart(args.wheels, args.lib)}")
    else:
        found = report(args.lock)
        if args.json:
            args.json.write_text(json.dumps(found, indent=2) + "\n")


if __name__ == "__main__":
    main()
