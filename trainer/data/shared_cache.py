"""A sweep-wide cache of frozen-encoder outputs: encoded once, read by every trial.

Every trial of a schedule sweep encodes the same images with the same VAE into the same
latents, and the same captions with the same frozen text encoders. With a shared folder (a
sweep's ``cache/``, given to its trials by ``trainer/run/trial.py``), the first trial that
needs a cache fills it and every later trial, and every worker on the machine, reads it:

- **Identical means the same content key.** A latent cache's key is every entry's own key
  (image content hash, VAE weights fingerprint with its dtype, target size from the
  resolution and buckets, crop and flip, and the loss mask's file digest when masked loss
  is on; the mask is stored beside its entry) plus what else decides the values: the device type
  the VAE ran on, torch's version, the fill's chunking and this format's version. A text
  cache's key is the encoders' fingerprints, the token ids of every caption, and the same
  rest. The folder is named by a hash of the key and holds the key itself (``key.json``),
  compared in full before anything is read: a mismatch (another key under the same name, a
  damaged folder) is never read as a hit; it is filled again.
- **Filled atomically, once.** The filler holds an exclusive ``flock`` on the cache's lock
  file, encodes with the same functions a run without the cache uses (``cache.fill_latents``,
  ``cache.TextCache.fill``: the same chunks, so the same values, bit for bit), writes the
  folder through ``files.write_folder_atomic`` (a ``.tmp`` folder renamed into place) and
  logs ``shared ... cache: filled``. A trial arriving meanwhile waits on the lock, then reads.
  A killed filler leaves only a ``.tmp`` folder, which nothing reads and the next filler
  replaces.
- **In memory once per process**: a warm sweep worker keeps the caches it read (by content
  key) for its next trials.

Entries are stored as fp32 (latents) or as the encoder's output dtype (text), the dtypes the
per-run caches hold, so a trial reading the shared cache trains on exactly the values it would
have encoded itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainer.data import cache
from trainer.files import finish_folder_write, write_folder_atomic
from trainer.models import conditioning

if TYPE_CHECKING:
    from diffusers.models import AutoencoderKL

log = logging.getLogger("sdlora")
FORMAT = 2  # bump when what an entry holds, or how it is encoded, changes (2: loss masks)
KEY_NAME, TENSORS_NAME = "key.json", "tensors.safetensors"
# Caches a process keeps in memory (a warm worker's trials share them): the newest few.
MEMO_SIZE = 4
_memo: dict[str, tuple[str, Any]] = {}

Entry = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# (entry key, image, size, flip, loss mask file or None): cache.fill_latents' jobs. A mask's
# identity is in the entry key (cache.latent_key), so the content key covers it.
LatentJob = tuple[str, Path, tuple[int, int], bool, Path | None]
PARTS = ("mean", "std", "time_ids")  # the tensors of a latent entry
MASK = "mask"  # an entry's loss mask, stored beside it when the job has one


@dataclass(frozen=True)
class Latents:
    """The shared latent cache's readers, by entry key."""

    entry: Callable[[str], Entry]  # (mean, std, time ids)
    mask: Callable[[str], torch.Tensor]  # the loss mask at the latent's size


def content_name(kind: str, content: dict[str, Any]) -> tuple[str, str]:
    """The folder name of a cache with this key, and the key as the text stored in it."""
    text = json.dumps(content, sort_keys=True)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:20]}", text


def _common(device: torch.device) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "chunk": cache.CHUNK,
        "device": device.type,
        "torch": torch.__version__,
    }


def latent_content(jobs: Sequence[LatentJob], vae: AutoencoderKL) -> dict[str, Any]:
    """The content key of the latent cache of these jobs (see the module docstring)."""
    param = next(vae.parameters())
    return {
        **_common(param.device),
        "kind": "latents",
        "vae_dtype": str(param.dtype),
        "entries": sorted(key for key, *_ in jobs),
    }


def text_content(
    captions: Sequence[str], text_encoders: Sequence[torch.nn.Module], tokenizers: Sequence
) -> dict[str, Any]:
    """The content key of the text cache of these captions (sorted) and encoders."""
    ids = conditioning.tokenize(tokenizers, list(captions)) if captions else []
    digest = hashlib.sha256()
    for tensor in ids:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.cpu().contiguous().numpy().tobytes())
    return {
        **_common(next(text_encoders[0].parameters()).device),
        "kind": "text",
        "encoders": [cache.module_fingerprint(m) for m in text_encoders],
        "captions": list(captions),
        "token_ids": digest.hexdigest(),
    }


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` for the block (released when the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_filled(folder: Path, key_text: str) -> bool:
    """Whether ``folder`` holds a complete cache of exactly this key."""
    try:
        stored = (folder / KEY_NAME).read_text(encoding="utf-8")
    except OSError:
        return False
    return stored == key_text and (folder / TENSORS_NAME).is_file()


def ensure(
    root: Path,
    kind: str,
    content: dict[str, Any],
    fill: Callable[[], dict[str, torch.Tensor]],
    is_main: bool,
    wait: Callable[[], None],
) -> Path:
    """The folder of the cache with this key, filled by the main process when missing.

    Args:
        root: The shared cache folder.
        kind: ``latents`` or ``text`` (the folder's prefix, and the log line's word).
        content: The content key.
        fill: Encodes every entry: the tensors to store, by name.
        is_main: Whether this is the process that fills (the others wait, then read).
        wait: The launch's barrier (``accelerator.wait_for_everyone``).
    """
    name, key_text = content_name(kind, content)
    folder = root / name
    if is_main:
        with locked(root / f"{name}.lock"):
            finish_folder_write(folder)  # what a killed filler left: never read
            if is_filled(folder, key_text):
                log.info("shared %s cache: reused %s", kind, folder)
            else:
                tensors = fill()

                def write(tmp: Path) -> None:
                    save_file(tensors, str(tmp / TENSORS_NAME))
                    (tmp / KEY_NAME).write_text(key_text, encoding="utf-8")

                write_folder_atomic(folder, write)
                log.info("shared %s cache: filled %s (%d tensors)", kind, folder, len(tensors))
    wait()
    if not is_filled(folder, key_text):  # only a concurrent refill of a clashing key
        raise RuntimeError(f"the shared {kind} cache {folder} does not hold this run's key")
    return folder


def _remember(name: str, key_text: str, value: Any) -> Any:
    _memo.pop(name, None)
    _memo[name] = (key_text, value)
    while len(_memo) > MEMO_SIZE:
        _memo.pop(next(iter(_memo)))
    return value


def _recalled(name: str, key_text: str) -> Any | None:
    found = _memo.get(name)
    return found[1] if found is not None and found[0] == key_text else None


def latents(
    root: Path,
    jobs: Sequence[LatentJob],
    vae: AutoencoderKL,
    is_main: bool,
    wait: Callable[[], None],
    in_memory: bool,
    show_progress: bool = True,
) -> Latents:
    """Every job's (mean, std, time ids) and loss mask by entry key, from the shared cache.

    Args:
        root: The shared cache folder.
        jobs: One ``(entry key, image, size, flip, mask)`` per distinct entry.
        vae: The frozen VAE (encodes when the cache is missing).
        is_main: The process that fills; the others wait on ``wait``, then read.
        wait: The launch's barrier.
        in_memory: Hold every entry in memory (``data.cache_latents = "memory"``); else read
            each one from the cache file when it is served (``"disk"``).
        show_progress: Show the encode's progress bar.
    """
    content = latent_content(jobs, vae)
    name, key_text = content_name("latents", content)
    memo = _recalled(name, key_text) if in_memory else None
    if memo is not None:
        log.info("shared latents cache: reused %s (in memory)", root / name)
        return memo

    def fill() -> dict[str, torch.Tensor]:
        store = cache.LatentCache(None)
        cache.fill_latents(store, vae, jobs, vae.dtype, show_progress)
        # clone(): an entry is a view of its chunk's batch, and a file holds whole tensors.
        out: dict[str, torch.Tensor] = {}
        for key, entry in store.memory.items():
            out |= {f"{key}/{n}": t.clone() for n, t in zip(PARTS, entry, strict=True)}
        out |= {f"{key}/{MASK}": mask.clone() for key, mask in store.memory_masks.items()}
        return out

    folder = ensure(root, "latents", content, fill, is_main, wait)
    path = folder / TENSORS_NAME
    if in_memory:
        tensors = load_file(str(path))
        entries: dict[str, Entry] = {
            key: (tensors[f"{key}/mean"], tensors[f"{key}/std"], tensors[f"{key}/time_ids"])
            for key, *_ in jobs
        }
        loss_masks = {key: tensors[f"{key}/{MASK}"] for key, *_, mask in jobs if mask}
        held = Latents(entries.__getitem__, loss_masks.__getitem__)
        return _remember(name, key_text, held)

    def read(key: str) -> Entry:
        with safe_open(str(path), framework="pt") as f:
            mean, std, time_ids = (f.get_tensor(f"{key}/{n}") for n in PARTS)
        return mean, std, time_ids

    def read_mask(key: str) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(f"{key}/{MASK}")

    return Latents(read, read_mask)


def text(
    root: Path,
    captions: Sequence[str],
    text_encoders: Sequence[torch.nn.Module],
    tokenizers: Sequence,
    is_main: bool,
    wait: Callable[[], None],
    show_progress: bool = True,
) -> Callable[[str], dict[str, torch.Tensor]]:
    """Every caption's text-encoder outputs, from the shared cache (see :func:`latents`)."""
    captions = sorted(set(captions))
    content = text_content(captions, text_encoders, tokenizers)
    name, key_text = content_name("text", content)
    memo = _recalled(name, key_text)
    if memo is not None:
        log.info("shared text cache: reused %s (in memory)", root / name)
        return memo.__getitem__

    def fill() -> dict[str, torch.Tensor]:
        store = cache.TextCache()
        store.fill(text_encoders, tokenizers, captions, show_progress)
        return {
            f"{i}/{part}": tensor.clone()
            for i, caption in enumerate(captions)
            for part, tensor in store.get(caption).items()
        }

    folder = ensure(root, "text", content, fill, is_main, wait)
    tensors = load_file(str(folder / TENSORS_NAME))
    entries: dict[str, dict[str, torch.Tensor]] = {c: {} for c in captions}
    for name_part, tensor in tensors.items():
        index, part = name_part.split("/", 1)
        entries[captions[int(index)]][part] = tensor
    return _remember(name, key_text, entries).__getitem__
