"""Writing files and folders that must never be seen half-written: final outputs, checkpoints.

One file (:func:`write_atomic`): it is written under a temporary name in its own folder, given
the mode the user's umask gives a new file (safetensors writes 0600, which a ComfyUI or A1111
server running as another user cannot read), fsynced, and renamed into place with
``os.replace`` (:func:`move_into_place`). A kill at any moment leaves either the old file or
the complete new one, plus at worst a hidden ``.NAME.tmp-*`` file that nothing reads and the
next start removes (:func:`remove_stale_tmp`).

One folder (:func:`write_folder_atomic`, a checkpoint): its files are written into
``NAME.tmp/``, each given the umask's mode and fsynced as above, and the folder is renamed into
place. A folder cannot be renamed over another, so one that exists is first set aside as
``NAME.old`` and deleted once the new one is in; :func:`finish_folder_write` settles what a
kill between those steps left.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Beside a folder written by write_folder_atomic: the new one being written, and the old one
# set aside while the new one replaces it.
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


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


def seal(path: Path) -> None:
    """Make a freshly written file ready to be renamed into place: the umask's mode (not the
    0600 some writers use) and its bytes on disk."""
    os.chmod(path, umask_mode())
    fsync_path(path)


def move_into_place(tmp: Path, path: Path, durable: bool = True) -> Path:
    """Rename a complete file ``tmp`` over ``path`` (same file system), durably.

    Args:
        tmp: The complete file.
        path: Its final name.
        durable: fsync the file and its folder, so a power cut keeps the new file. Off only
            for what can be made again (cache entries): the rename alone already means no
            reader ever sees a half-written file.

    Returns:
        ``path``.
    """
    if durable:
        seal(tmp)
    else:
        os.chmod(tmp, umask_mode())
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)
    return path


def write_atomic(path: str | Path, write: Callable[[Path], object], durable: bool = True) -> Path:
    """Let ``write`` fill a temporary file beside ``path``, then move it into place.

    Args:
        path: The final file.
        write: Called with the temporary path; it must create that file.
        durable: See :func:`move_into_place`.

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
        return move_into_place(tmp, path, durable)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write a binary file atomically."""
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


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


def write_folder_atomic(final: Path, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a fresh ``<final>.tmp`` folder, fsync it, and rename it to ``final``.

    A crash at any moment leaves a complete ``final`` (the old one or the new one, the old one
    possibly set aside as ``<final>.old``) or, for a folder never written before, none; never a
    half-written ``final``. An existing ``final`` is renamed aside first and deleted only once
    the new one is in place: folders cannot be replaced by a rename, and deleting first would
    leave a window with no complete folder.

    Returns:
        ``final``.
    """
    tmp = final.with_name(final.name + TMP_SUFFIX)
    old = final.with_name(final.name + OLD_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    for f in tmp.iterdir():
        seal(f)
    fsync_path(tmp)
    if final.exists():
        if old.exists():  # left by a crash after an earlier swap: `final` is the newer one
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if old.exists():
        shutil.rmtree(old)
    return final


def finish_folder_write(final: Path) -> list[Path]:
    """Finish what an interrupted :func:`write_folder_atomic` of ``final`` left; return the
    folders removed.

    ``<final>.tmp`` is deleted. ``<final>.old`` is deleted when ``final`` exists (the swap
    finished), and renamed back to ``final`` when not (it is the only complete copy).
    """
    removed = []
    tmp = final.with_name(final.name + TMP_SUFFIX)
    old = final.with_name(final.name + OLD_SUFFIX)
    if old.is_dir() and not final.exists():
        os.replace(old, final)
    for stale in (tmp, old):
        if stale.is_dir():
            shutil.rmtree(stale)
            removed.append(stale)
    return removed
