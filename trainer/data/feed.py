"""Assemble what feeds the loop: checked examples, caches, the resumable sampler, the loader."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer.config.load import RunConfig
from trainer.config.subsets import SubsetConfig
from trainer.data import cache, holdout, masks, shared_cache, subsets
from trainer.data import dataset as data
from trainer.data.order import ResumableBatchSampler

if TYPE_CHECKING:
    from diffusers.models import AutoencoderKL

log = logging.getLogger("sdlora")
SKIPPED_NAME = "skipped_images.txt"


@dataclass
class Feed:
    """The data side of a run."""

    prepared: data.Prepared
    dataset: data.CaptionedImages
    sampler: ResumableBatchSampler
    loader: torch.utils.data.DataLoader
    cached_latents: str  # "memory", "disk" or "off"
    cached_text: bool
    validation: list[data.Example]


def latent_cache_mode(config: RunConfig) -> str:
    """Where latents are cached; 'auto' turns caching off for random crops, where it is wrong."""
    mode = config.data.cache_latents
    if mode == "auto":
        mode = "memory" if config.data.center_crop else "off"
        if mode == "off":
            log.info("latent cache off: data.center_crop = false draws a new crop every epoch")
    return mode


def text_cache_enabled(config: RunConfig) -> bool:
    """Whether text-encoder outputs are cached: only valid when every text encoder is frozen
    (SDXL: both) and captions are fixed."""
    setting = config.data.cache_text
    if setting != "auto":
        return setting == "on"
    lora = config.lora
    shuffled = any(s.shuffle_tags for s in subsets.effective_subsets(config.data))
    valid = not (lora.train_text_encoder or lora.train_text_encoder_2) and not shuffled
    if not valid:
        log.info("text cache off: a text encoder is trained or tags are shuffled")
    return valid


def _report(prepared: data.Prepared, output_dir: Path, is_main: bool) -> None:
    if not is_main:
        return
    if prepared.skipped:
        path = output_dir / SKIPPED_NAME
        path.write_text("".join(line + "\n" for line in prepared.skipped))
        log.warning("skipped %d unusable file(s); the list is in %s", len(prepared.skipped), path)
    for note in prepared.notes[:5]:
        log.info("converted %s", note)
    if len(prepared.notes) > 5:
        log.info("... and %d more images converted the same ways", len(prepared.notes) - 5)


def _fill_latent_cache(
    config: RunConfig,
    prepared: data.Prepared,
    vae: AutoencoderKL,
    accelerator,
    mode: str,
    shared: Path | None = None,
):
    folder = None
    if mode == "disk":
        folder = Path(config.data.cache_dir or Path(config.output_dir) / "cache")
    store = cache.LatentCache(folder)
    vae_id = cache.module_fingerprint(vae)
    digests = {p: cache.file_digest(p) for p in dict.fromkeys(e.path for e in prepared.examples)}
    flipped = [s.random_flip for s in subsets.effective_subsets(config.data)]
    examples = prepared.examples
    mask_ids = {e.mask: mask_id(e.mask, e.path) for e in examples if e.mask is not None}
    keys = {
        (i, flip): cache.latent_key(
            digests[e.path], vae_id, e.size, "center", flip, mask_ids[e.mask] if e.mask else ""
        )
        for i, e in enumerate(examples)
        for flip in ((False, True) if flipped[e.subset] else (False,))
    }
    # One job per distinct key: repeated images (kohya N_name folders) are encoded once.
    by_key = {
        key: (key, examples[i].path, examples[i].size, flip, examples[i].mask)
        for (i, flip), key in keys.items()
    }
    jobs = list(by_key.values())

    def by_example(entry: Callable[[str], Any], mask: Callable[[str], torch.Tensor]):
        def loss_mask(index: int, flip: bool) -> torch.Tensor:
            example = examples[index]
            if example.mask is None:
                return masks.unmasked(example.size)
            return mask(keys[(index, flip)])

        return (lambda index, flip: entry(keys[(index, flip)])), loss_mask

    if shared is not None and not (mode == "disk" and config.data.cache_dir):
        # A sweep's trials share one cache (a data.cache_dir of the user's own is kept).
        lookup = shared_cache.latents(
            shared, jobs, vae, accelerator.is_main_process, accelerator.wait_for_everyone,
            in_memory=mode == "memory", show_progress=accelerator.is_main_process,
        )  # fmt: skip
        return by_example(lookup.entry, lookup.mask)
    # Disk: the main process fills the shared folder; memory: every process fills its own.
    if mode == "memory" or accelerator.is_main_process:
        encoded = cache.fill_latents(
            store, vae, jobs, vae.dtype, show_progress=accelerator.is_main_process
        )
        log.info("latent cache (%s): %d encoded, %d reused", mode, encoded, len(jobs) - encoded)
    accelerator.wait_for_everyone()
    return by_example(store.get_entry, store.get_mask)


def mask_id(mask: Path, image: Path) -> str:
    """What names a loss mask in the latent cache key: its file's digest, or ``alpha`` for the
    image's own alpha channel (the image's digest is in the key already)."""
    return "alpha" if mask == image else cache.file_digest(mask)


def checked_examples(
    config: RunConfig, show_progress: bool = True, decode: bool = True
) -> tuple[data.Prepared, list[data.Example]]:
    """Training examples (checked, bucketed, regularisation images mixed in) and the held-out
    validation examples (held out from the training images, never the regularisation ones)."""
    suffix = config.data.mask_suffix if config.train.masked_loss else ""
    records = subsets.find(config.data, suffix)
    reg = [r for r in records if subsets.is_reg(config.data, r)]
    records = [r for r in records if not subsets.is_reg(config.data, r)]
    val = config.validation
    held_subsets: Sequence[SubsetConfig] | None = subsets.effective_subsets(config.data)
    if val.path:
        held_out = data.find_records(config.data, val.path, "validation.path", suffix)
        held_subsets = None  # a folder of its own, read with [data]'s settings
    else:
        try:
            records, held_out = holdout.split(records, val.fraction, val.seed)
        except ValueError as err:
            raise data.DataError(str(err)) from err
    found = subsets.effective_subsets(config.data)
    masked = config.train.masked_loss
    prepared = data.prepare(records + reg, config.data, show_progress, decode, found, masked)
    prepared = subsets.mix_regularisation(prepared)
    if not held_out:
        return prepared, []
    checked = data.prepare(held_out, config.data, show_progress, decode, held_subsets)
    prepared.skipped += checked.skipped
    prepared.notes += checked.notes
    return prepared, checked.examples


def build_feed(
    config: RunConfig,
    accelerator,
    parts,
    text_encoder_trained: bool,
    prepared: data.Prepared,
    val_examples: list[data.Example],
    shared: Path | None = None,
) -> Feed:
    """Fill the caches and build the resumable loader over already checked examples.

    Args:
        config: The run config.
        accelerator: For process index/count and the device.
        parts: The loaded models (the VAE and text encoder fill the caches).
        text_encoder_trained: Whether any text encoder's LoRA is trained (no text cache then).
        prepared: The checked training examples (:func:`checked_examples`).
        val_examples: The held-out examples.
        shared: A sweep's shared cache folder (``trainer/data/shared_cache.py``), or None.
    """
    _report(prepared, Path(config.output_dir), accelerator.is_main_process)
    if accelerator.is_main_process:
        count, caption, tokens = data.long_captions(
            parts.tokenizer, [e.caption for e in prepared.examples]
        )
        if count:
            log.warning(
                "%d caption(s) are longer than the text encoder's %d tokens and are cut there "
                "(the longest has %d tokens: %.60r...)",
                count,
                parts.tokenizer.model_max_length,
                tokens,
                caption,
            )

    sdxl = parts.architecture == "sdxl"
    dataset = data.CaptionedImages(prepared.examples, config.data, parts.tokenizers, time_ids=sdxl)
    mode = latent_cache_mode(config)
    if mode != "off":
        filled = _fill_latent_cache(config, prepared, parts.vae, accelerator, mode, shared)
        dataset.latents, dataset.cached_masks = filled
    use_text_cache = text_cache_enabled(config) and not text_encoder_trained
    if use_text_cache:
        captions = {e.caption for e in prepared.examples}
        if any(s.caption_dropout > 0 for s in subsets.effective_subsets(config.data)):
            captions.add("")
        if shared is not None:
            dataset.text = shared_cache.text(
                shared, sorted(captions), parts.text_encoders, parts.tokenizers,
                accelerator.is_main_process, accelerator.wait_for_everyone,
                accelerator.is_main_process,
            )  # fmt: skip
        else:
            store = cache.TextCache()
            store.fill(parts.text_encoders, parts.tokenizers, captions, accelerator.is_main_process)
            dataset.text = store.get

    train = config.train
    sampler = ResumableBatchSampler(
        prepared.groups,
        train.batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        train.seed,
    )
    workers = config.data.num_workers
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=data.collate,
        num_workers=workers,
        persistent_workers=workers > 0 and config.data.persistent_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    return Feed(prepared, dataset, sampler, loader, mode, use_text_cache, val_examples)
