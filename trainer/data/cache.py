"""Caches of frozen-encoder outputs: VAE latents and text-encoder hidden states.

Caching the VAE posterior saves its encode, the largest single cost of a step at SD scale
(about 44% of a step's FLOPs at 512 px). We cache the posterior's (mean, std), not a sample,
and sample it each step from the step's generator, so training on cached latents draws the
same latents as training on pixels. Each entry also stores the crop it was encoded from as
SDXL's six size and crop ids (``images.Geometry.time_ids``), so cached latents are always
conditioned on the crop they show.

A latent entry is keyed by the image file's content hash, the VAE's weights fingerprint, the
target size, the crop mode and the flip, so changing any of them misses the cache instead of
reusing a stale entry. Both caches are filled up front, in a fixed order and fixed chunks, so
a resumed run sees exactly the values the original run saw.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from trainer.data import images
from trainer.files import write_atomic
from trainer.models import conditioning
from trainer.models.vae import posterior

if TYPE_CHECKING:
    from diffusers.models import AutoencoderKL

CHUNK = 8  # images per VAE call while filling the cache; fixed so values never depend on the run


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (first 32 hex digits)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:32]


def module_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's parameter bytes and dtypes: changes when any weight changes."""
    h = hashlib.blake2b(digest_size=12)
    for name, tensor in module.state_dict().items():
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        # reshape(-1), not contiguous(): a channels_last weight with a 1×1 kernel counts as
        # contiguous yet has a last stride above 1, which view(uint8) refuses. The bytes are
        # in logical order either way, so the key does not depend on the memory format.
        h.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def latent_key(digest: str, vae_id: str, size: tuple[int, int], crop: str, flip: bool) -> str:
    """The cache key of one (image, VAE, size, crop, flip) combination."""
    return f"{digest}-{vae_id}-{size[0]}x{size[1]}-{crop}-{'flip' if flip else 'noflip'}"


# The tensors of an entry; a disk entry written before time ids were cached lacks one and is
# encoded again.
_ENTRY = ("mean", "std", "time_ids")


class LatentCache:
    """VAE posteriors (mean, std) and their crop's time ids by key, held in memory or as
    safetensors files on disk."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder  # None: memory only
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def _file(self, key: str) -> Path:
        if self.folder is None:  # only a disk cache is asked for its files
            raise RuntimeError("a memory-only latent cache has no files")
        return self.folder / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        """True when the entry is cached (in memory, or complete on disk)."""
        if key in self.memory:
            return True
        if self.folder is None or not self._file(key).is_file():
            return False
        try:
            with safe_open(str(self._file(key)), framework="pt") as f:
                return set(_ENTRY) <= set(f.keys())
        except (OSError, ValueError):  # a damaged entry is encoded again
            return False

    def put(self, key: str, mean: torch.Tensor, std: torch.Tensor, time_ids: torch.Tensor) -> None:
        """Store one entry (CPU; mean and std fp32)."""
        mean, std = (
            mean.detach().float().cpu().contiguous(),
            std.detach().float().cpu().contiguous(),
        )
        time_ids = time_ids.detach().float().cpu().contiguous()
        if self.folder is None:
            self.memory[key] = (mean, std, time_ids)
            return
        entry = dict(zip(_ENTRY, (mean, std, time_ids), strict=True))
        # A killed fill never leaves a half-written entry; no fsync, an entry can be made again.
        write_atomic(self._file(key), lambda tmp: save_file(entry, str(tmp)), durable=False)

    def get_entry(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (mean, std, time_ids) of an entry."""
        if self.folder is None:
            return self.memory[key]
        tensors = load_file(str(self._file(key)))
        return tensors["mean"], tensors["std"], tensors["time_ids"]

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mean, std) of an entry."""
        return self.get_entry(key)[:2]


def fill_latents(
    cache: LatentCache,
    vae: AutoencoderKL,
    jobs: Sequence[tuple[str, Path, tuple[int, int], bool]],
    dtype: torch.dtype,
    show_progress: bool = True,
) -> int:
    """Encode every job ``(key, path, size, flip)`` not yet cached; return how many were encoded.

    Jobs are grouped by size (one VAE call needs one shape) and encoded in fixed chunks.
    """
    missing = [job for job in jobs if not cache.has(job[0])]
    by_size: dict[tuple[int, int], list] = {}
    for job in missing:
        by_size.setdefault(job[2], []).append(job)
    device = next(vae.parameters()).device
    bar = tqdm(total=len(missing), desc="caching latents", unit="img", disable=not show_progress)
    for size, group in sorted(by_size.items()):
        for start in range(0, len(group), CHUNK):
            chunk = group[start : start + CHUNK]
            loaded = [
                images.load_example(path, size, True, flip, None) for _, path, _, flip in chunk
            ]
            pixels = torch.stack([p for p, _ in loaded])
            with torch.no_grad():
                mean, std = posterior(vae, pixels.to(device, dtype))
            for i, (key, *_) in enumerate(chunk):
                cache.put(key, mean[i], std[i], torch.tensor(loaded[i][1].time_ids()))
            bar.update(len(chunk))
    bar.close()
    return len(missing)


class TextCache:
    """Text-encoder outputs by caption, for frozen encoders and fixed captions: the hidden
    states, and for SDXL also the second encoder's pooled projection.

    Keyed by the caption text, so serving a cached example needs no tokenizer call. Filled
    through ``conditioning.encode_ids``, the function training calls without the cache.
    """

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, caption: str) -> dict[str, torch.Tensor]:
        """``encoder_hidden_states`` (and ``text_embeds``) of one caption."""
        return self.entries[caption]

    def fill(
        self,
        text_encoders: Sequence[torch.nn.Module],
        tokenizers: Sequence,
        captions: Iterable[str],
        show_progress: bool = True,
    ) -> int:
        """Encode every caption not cached yet, in sorted order; return how many were encoded."""
        missing = sorted(set(captions) - set(self.entries))
        device = next(text_encoders[0].parameters()).device
        bar = tqdm(total=len(missing), desc="caching text", unit="cap", disable=not show_progress)
        for start in range(0, len(missing), CHUNK):
            chunk = missing[start : start + CHUNK]
            ids = [t.to(device) for t in conditioning.tokenize(tokenizers, chunk)]
            with torch.no_grad():
                hidden, pooled = conditioning.encode_ids(text_encoders, ids)
            for i, caption in enumerate(chunk):
                entry = {"encoder_hidden_states": hidden[i].cpu()}
                if pooled is not None:
                    entry["text_embeds"] = pooled[i].cpu()
                self.entries[caption] = entry
            bar.update(len(chunk))
        bar.close()
        return len(missing)
