"""Writing files that must never be seen half-written: final outputs and checkpoint parts.

Every file is written under a temporary name in its own folder, fsynced, given the mode the
user's umask gives a new file (safetensors writes 0600, which a ComfyUI or A1111 server
running as another user cannot read), and renamed into place with ``os.replace``. A kill at
any moment leaves either the old file or the complete new one, plus at worst a ``.tmp-*``
file that nothing reads.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def umask_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_path(path: Path) -> None:
    """fsync a file or a folder, so a rename that follows is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a temporary file beside ``path``, then move it into place.

    Args:
        path: The final file.
        write: Called with the temporary path; it must create that file.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode())
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any) -> Path:
    """Write pretty JSON (with a trailing newline) atomically."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def save_safetensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> Path:
    """Write a safetensors file atomically, readable as the umask allows."""
    from safetensors.torch import save_file

    return write_atomic(
        path, lambda tmp: save_file(dict(tensors), str(tmp), metadata=dict(metadata))
    )


def remove_stale_tmp(folder: str | Path) -> list[Path]:
    """Delete temporary files that an interrupted :func:`write_atomic` left in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.glob(".*.tmp-*") if p.is_file())
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
