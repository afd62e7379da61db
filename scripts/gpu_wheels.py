"""The wheels a GPU machine without a registry needs for scripts/gpu_check.sh (`make gpu-wheels`).

The lent H200 machine's image has torch, transformers, peft, accelerate, safetensors,
tensorboard and matplotlib, and no diffusers, optuna, xformers or sdlora; nothing there can
reach a registry. This downloads, here, the exact versions of requirements/cuda.lock for
what the check needs and the image lacks or holds outside sdlora's ranges, as Python 3.12
manylinux x86-64 wheels, into an ignored folder (``.whl/``) that travels with the working
tree. sdlora itself needs no wheel: the check runs it from the working tree.

Layout of the folder:
- ``*.whl``: installed by gpu_check.sh with ``pip install --no-index --no-deps --target``;
- ``xformers/``: xformers and a CUDA 12.8 ``libcudart.so.12`` for it (step 5 only; the
  image's torch is a CUDA 13 build, and no released xformers links CUDA 13: docs/gpu.md);
- ``peer/train_text_to_image_lora.py``: the diffusers example script, copied from
  ``--diffusers-script`` (it is in neither the diffusers wheel nor its sdist), with
  ``SOURCE.txt`` naming where it came from.

Usage:
    python3 scripts/gpu_wheels.py [--dest .whl] [--diffusers-script PATH] [--no-xformers]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "cuda.lock"
PEER_NAME = "train_text_to_image_lora.py"
# The device tool's transfer limit for the working tree (tracked and untracked-not-ignored
# files, and carried folders such as .whl) in one call.
TRANSFER_LIMIT = 64 * 2**20

# From the lock, exact versions. Why each is carried (the image's package list, KINDS.md of
# the device tool, 2026-11-17; its pip list gave transformers 5.17.0, accelerate 1.15.0,
# safetensors 0.8.0, huggingface_hub 1.33.0, tokenizers 0.23.2, torch 2.11.0).
FROM_LOCK = {
    "diffusers": "not in the image",
    "importlib-metadata": "diffusers needs it; not in the image",
    "lazy-importer": "importlib-metadata 10 needs it; not in the image",
    "transformers": "the image's 5.17.0 is below sdlora's floor (>=5.23.0)",
    "peft": "the image's version was never recorded; the check runs the tested one",
    "optuna": "the sweep extra (sdlora sweep); not in the image",
    "alembic": "optuna needs it; not in the image",
    "mako": "alembic needs it; not in the image",
    "colorlog": "optuna needs it; not in the image",
    "sqlalchemy": "optuna needs it; not in the image",
}
# Left out on purpose: torch (a multi-GB CUDA build; the check runs the image's and says so),
# bitsandbytes, wandb, psycopg and the dev tools (not used by the check), and what the image
# has inside sdlora's ranges (accelerate, safetensors, tensorboard, matplotlib, numpy, ...).

# Not in the lock (they are no dependency of sdlora): what the diffusers example script needs
# beyond the image (torchvision is there). The newest releases when this list was written.
PEER = {"datasets": "5.2.0", "dill": "0.4.1", "multiprocess": "0.70.19"}
# The pair docs/gpu.md names: the newest xformers (a CUDA 12.8 build, stable ABI only) and
# the CUDA 12.8 runtime it links; its libcudart.so.12 is unpacked, not installed.
XFORMERS = {"xformers": "0.0.35", "nvidia-cuda-runtime-cu12": "12.8.90"}

# The device tool's README: wheels for its Python 3.12 on manylinux x86-64.
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
DOWNLOAD = ["--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
DOWNLOAD += ["--implementation", "cp", *(x for p in PLATFORMS for x in ("--platform", p))]


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them (``Foo_Bar`` and ``foo-bar`` are one)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` pin in a uv/pip lock."""
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def plan(lock: dict[str, str]) -> dict[str, dict[str, str]]:
    """The pins to download, per folder: ``main`` (installed), ``xformers`` (step 5).

    Raises:
        SystemExit: when the lock lacks a package :data:`FROM_LOCK` names.
    """
    missing = [name for name in FROM_LOCK if name not in lock]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not pinned in the lock; run make lock")
    main = {name: lock[name] for name in FROM_LOCK}
    return {"main": {**main, **PEER}, "xformers": dict(XFORMERS)}


def wheel_name(path: Path) -> tuple[str, str]:
    """``(canonical name, version)`` from a wheel's file name (PEP 427)."""
    name, version = path.name.split("-")[:2]
    return canonical(name), version


def duplicates(folder: Path) -> list[str]:
    """Distributions with more than one wheel in ``folder``: two stop the whole install."""
    seen: dict[str, list[str]] = {}
    for wheel in sorted(folder.glob("*.whl")):
        seen.setdefault(wheel_name(wheel)[0], []).append(wheel.name)
    return [", ".join(names) for names in seen.values() if len(names) > 1]


def prune(folder: Path, pins: dict[str, str]) -> None:
    """Remove wheels of the pinned names at other versions (an older `make gpu-wheels`)."""
    for wheel in folder.glob("*.whl"):
        name, version = wheel_name(wheel)
        if name in pins and version != pins[name]:
            print(f"removing {wheel.name} (the lock pins {name} {pins[name]})")
            wheel.unlink()


def download(folder: Path, pins: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    prune(folder, pins)
    wanted = [f"{name}=={version}" for name, version in pins.items()]
    cmd = [sys.executable, "-m", "pip", "download", *DOWNLOAD, "-d", str(folder), *wanted]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def copy_peer(script: Path, folder: Path) -> None:
    """The diffusers example script into ``folder/peer``, with where it came from."""
    if script.name != PEER_NAME or not script.is_file():
        raise SystemExit(f"error: --diffusers-script {script}: not a file named {PEER_NAME}")
    peer = folder / "peer"
    peer.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(script, peer / PEER_NAME)
    digest = hashlib.sha256(script.read_bytes()).hexdigest()
    (peer / "SOURCE.txt").write_text(f"{script.resolve()}\nsha256 {digest}\n")


def tree_bytes() -> int:
    """Bytes of what the device tool sends besides carried folders: tracked files and
    untracked files git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    paths = (REPO / p.decode() for p in listed if p)
    return sum(p.stat().st_size for p in paths if p.is_file())


def summary(dest: Path) -> int:
    """Print every file and the transfer's total; the total in bytes."""
    total = 0
    for path in sorted(p for p in dest.rglob("*") if p.is_file()):
        size = path.stat().st_size
        total += size
        print(f"  {size / 2**20:7.2f} MiB  {path.relative_to(dest)}")
    tree = tree_bytes()
    print(f"{dest}: {total / 2**20:.1f} MiB; with the working tree {(total + tree) / 2**20:.1f} "
          f"MiB of the {TRANSFER_LIMIT // 2**20} MiB a call may send")  # fmt: skip
    return total + tree


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", type=Path, default=REPO / ".whl", help="the (ignored) wheel folder")
    p.add_argument("--lock", type=Path, default=LOCK)
    p.add_argument("--diffusers-script", type=Path, help=f"the peer's {PEER_NAME} to carry")
    p.add_argument("--no-xformers", action="store_true", help="leave xformers out")
    args = p.parse_args(argv)
    pins = plan(read_lock(args.lock))
    download(args.dest, pins["main"])
    if not args.no_xformers:
        download(args.dest / "xformers", pins["xformers"])
    if args.diffusers_script:
        copy_peer(args.diffusers_script, args.dest)
    elif not (args.dest / "peer" / PEER_NAME).is_file():
        print(
            f"no {PEER_NAME}: the diffusers runs of the check will be skipped. It ships in "
            "neither the diffusers wheel nor its sdist; take examples/text_to_image/"
            f"{PEER_NAME} from a diffusers checkout: make gpu-wheels DIFFUSERS_SCRIPT=PATH"
        )
    for folder in (args.dest, args.dest / "xformers"):
        if duplicates(folder):
            raise SystemExit(
                f"error: two versions of one package in {folder}: {duplicates(folder)}"
            )
    if summary(args.dest) > TRANSFER_LIMIT:
        raise SystemExit("error: over the transfer limit; leave xformers out (--no-xformers)")


if __name__ == "__main__":
    main()
