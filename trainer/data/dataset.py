"""Image-caption datasets: find the examples, check every file once, and serve batches.

Two layouts are read:
- kohya: images with a caption file beside them (``a.png`` + ``a.txt``); a subfolder named
  ``N_name`` repeats its images N times per epoch.
- imagefolder: images plus ``metadata.jsonl`` or ``metadata.csv`` with ``file_name`` and
  ``text`` columns (the Hugging Face ``datasets`` convention).

Every image is decoded once before training (:func:`prepare`), so a corrupt file, a missing
caption or an image too small for its bucket is reported up front, naming the file, instead
of crashing the run hours in. ``data.on_bad_image`` says whether that stops the run ("error",
listing every bad file) or leaves the files out ("skip").
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainer.config.load import DataConfig
from trainer.data import buckets, images
from trainer.errors import UserError
from trainer.models import conditioning

log = logging.getLogger("sdlora")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
# A caption file this large is not a caption (the text encoder reads 77 tokens, a few hundred
# bytes); reading and tokenizing a 10 MB one costs gigabytes of memory for nothing.
MAX_CAPTION_BYTES = 16 * 1024


class DataError(UserError, ValueError):
    """A problem with the dataset; the message names the file(s) and the fix."""


@dataclass(frozen=True)
class Record:
    """One example as found on disk; ``problem`` is set when its caption is unusable."""

    path: Path
    caption: str
    problem: str = ""


@dataclass(frozen=True)
class Example:
    """One checked training example: image, caption, and the size it trains at."""

    path: Path
    caption: str
    size: tuple[int, int]


@dataclass
class Prepared:
    """The checked dataset: examples, their bucket groups, and what was left out."""

    examples: list[Example]
    groups: list[list[int]]
    sizes: list[tuple[int, int]]
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- finding examples


def _read_caption(image: Path, extension: str) -> Record:
    for ext in dict.fromkeys((extension, ".caption", ".txt")):
        caption_file = image.with_suffix(ext)
        if caption_file.is_file():
            size = caption_file.stat().st_size
            if size > MAX_CAPTION_BYTES:
                return Record(
                    image,
                    "",
                    f"{caption_file}: {size:,} bytes is not a caption (the limit is "
                    f"{MAX_CAPTION_BYTES // 1024} KiB; the text encoder reads 77 tokens)",
                )
            try:
                text = caption_file.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                return Record(
                    image, "", f"{caption_file}: caption is not UTF-8 text; re-save it as UTF-8"
                )
            if not text:
                return Record(
                    image,
                    "",
                    f"{caption_file}: empty caption; write one (use data.caption_dropout "
                    "for unconditional training)",
                )
            return Record(image, text)
    return Record(
        image,
        "",
        f"{image}: no caption file ({image.with_suffix(extension).name}); write one beside "
        "the image, or set data.caption_extension to the extension your captions use",
    )


def _broken_link(path: Path) -> str:
    """Why a symbolic link named like an image leads to no file ("" when it does)."""
    if not path.is_symlink() or path.is_file():
        return ""
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 signals a symlink loop this way
        return f"{path}: a symbolic link loop; fix or remove the link"
    except OSError as err:
        if "loop" in str(err).lower() or getattr(err, "errno", None) == 40:  # ELOOP
            return f"{path}: a symbolic link loop; fix or remove the link"
        return f"{path}: a symbolic link to {os.readlink(path)!r}, which does not exist"
    return f"{path}: a symbolic link to something that is not a file"


def _images_in(folder: Path, caption_extension: str) -> list[Record]:
    """A record per image-named entry of ``folder``, broken symbolic links included as bad
    files (skipping them silently would hide a moved dataset)."""
    records = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        broken = _broken_link(path)
        if broken:
            records.append(Record(path, "", broken))
        elif path.is_file():
            records.append(_read_caption(path, caption_extension))
    return records


def find_kohya(root: Path, caption_extension: str) -> list[Record]:
    """Records of a kohya-style folder, with ``N_name`` subfolders repeated N times.

    A subfolder that is (a link to) the root or to a folder already read is read once: a data
    folder linked into itself would otherwise double the dataset without a word.
    """
    records = _images_in(root, caption_extension)
    seen = {root.resolve()}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        real = sub.resolve()
        if real in seen:
            log.warning(
                "data: %s is a link to a folder already read (%s); reading it once", sub, real
            )
            continue
        seen.add(real)
        match = _REPEAT_FOLDER.match(sub.name)
        repeats = int(match.group(1)) if match else 1
        records += _images_in(sub, caption_extension) * repeats
    return records


def _metadata_rows(root: Path) -> tuple[Path, list[tuple[int, dict]]]:
    jsonl, csv_file = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.is_file():
        rows = []
        for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise DataError(f"{jsonl}:{n}: not valid JSON ({err})") from err
        return jsonl, rows
    if csv_file.is_file():
        with csv_file.open(encoding="utf-8", newline="") as f:
            return csv_file, list(enumerate(csv.DictReader(f), 2))
    raise DataError(f"{root}: no metadata.jsonl or metadata.csv for the imagefolder layout")


def find_imagefolder(root: Path) -> list[Record]:
    """Records of an imagefolder with ``metadata.jsonl`` or ``metadata.csv``."""
    source, rows = _metadata_rows(root)
    records = []
    for n, row in rows:
        if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
            raise DataError(f"{source}:{n}: needs 'file_name' and 'text' fields")
        path = root / row["file_name"]
        text = str(row["text"] or "").strip()
        broken = _broken_link(path)
        if broken:
            records.append(Record(path, text, f"{source}:{n}: {broken}"))
        elif not path.is_file():
            records.append(Record(path, text, f"{source}:{n}: image {path} does not exist"))
        elif len(text.encode()) > MAX_CAPTION_BYTES:
            records.append(
                Record(
                    path,
                    "",
                    f"{source}:{n}: a {len(text.encode()):,}-byte caption is not "
                    f"a caption (the limit is {MAX_CAPTION_BYTES // 1024} KiB)",
                )
            )
        elif not text:
            records.append(Record(path, "", f"{source}:{n}: empty caption for {path}"))
        else:
            records.append(Record(path, text))
    return records


def find_records(config: DataConfig, path: str | None = None) -> list[Record]:
    """All records of the configured dataset (or of ``path``), in a stable order."""
    root = Path(path or config.path)
    if not root.is_dir():
        raise DataError(f"data.path = {str(root)!r}: not a folder")
    layout = config.layout
    if layout == "auto":
        has_metadata = any((root / n).is_file() for n in ("metadata.jsonl", "metadata.csv"))
        layout = "imagefolder" if has_metadata else "kohya"
    if layout == "imagefolder":
        records = find_imagefolder(root)
    else:
        records = find_kohya(root, config.caption_extension)
    if not records:
        what = "is empty" if not any(root.iterdir()) else "holds no images"
        raise DataError(
            f"data.path = {str(root)!r}: the folder {what} ({layout} layout; image types: "
            f"{', '.join(IMAGE_EXTENSIONS)})"
        )
    return records


# ---------------------------------------------------------------- checking every file once


def _bucket_grid(config: DataConfig) -> list[tuple[int, int]]:
    res = config.resolution
    if not config.buckets:
        return [(res, res)]
    step = config.bucket_step
    low = config.bucket_min_side or max(step, (res // 2) // step * step)
    high = config.bucket_max_side or res * 2
    return buckets.bucket_sizes(res, step, low, high)


def prepare(
    records: list[Record], config: DataConfig, show_progress: bool = True, decode: bool = True
) -> Prepared:
    """Decode every distinct image once, assign buckets, and apply ``data.on_bad_image``.

    ``decode=False`` reads only image headers (sizes), for previews such as ``lr-plot``.

    Raises:
        DataError: listing every bad file, when the policy is "error" or nothing usable is left.
    """
    grid = _bucket_grid(config)
    unique = list(dict.fromkeys(r.path for r in records if not r.problem))
    infos: dict[Path, images.ImageInfo | str] = {}

    def check(path: Path) -> tuple[Path, images.ImageInfo | str]:
        try:
            return path, images.inspect(path, decode)
        except images.ImageProblem as err:
            return path, str(err)

    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL decodes outside the GIL
        results = pool.map(check, unique)
        for path, info in tqdm(
            results,
            total=len(unique),
            desc="checking images",
            unit="img",
            disable=not show_progress,
        ):
            infos[path] = info
    examples, problems, notes = [], [], []
    for record in records:
        info = infos.get(record.path, record.problem)
        if record.problem:
            problems.append(record.problem)
            continue
        if isinstance(info, str):
            problems.append(info)
            continue
        size = buckets.assign(
            (info.width, info.height), grid, config.max_upscale, config.bucket_max_crop
        )
        if size is None:
            smallest = min(grid, key=lambda b: buckets.upscale_needed((info.width, info.height), b))
            problems.append(
                f"{record.path}: {info.width}×{info.height} is smaller than the training size "
                f"{smallest[0]}×{smallest[1]} (would need ×"
                f"{buckets.upscale_needed((info.width, info.height), smallest):.2f} upscaling); "
                "raise data.max_upscale, lower data.resolution, or remove the image"
            )
            continue
        if info.note:
            notes.append(f"{record.path}: {info.note}")
        examples.append(Example(record.path, record.caption, size))
    problems = list(dict.fromkeys(problems))  # a repeated image is reported once
    notes = list(dict.fromkeys(notes))
    if problems and config.on_bad_image == "error":
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(
            f"{len(problems)} unusable file(s) in {config.path}:\n  {shown}{more}\n"
            'fix them, or set data.on_bad_image = "skip" to train without them'
        )
    if not examples:
        raise DataError(f"data.path = {config.path!r}: no usable images left after checking")
    sizes, groups = buckets.group_by_bucket([e.size for e in examples])
    return Prepared(examples, groups, sizes, problems, notes)


# ---------------------------------------------------------------- serving examples


def shuffle_tags(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """Shuffle comma-separated tags, keeping the first ``keep_tokens`` in place."""
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(t for t in head + tail if t)


def long_captions(tokenizer, captions: list[str]) -> tuple[int, str, int]:
    """Captions the text encoder would cut: (how many, one of them, its token count).

    CLIP reads ``model_max_length`` tokens (77, two of them start/end markers); the rest of a
    longer caption never reaches the model, which users should know rather than guess.
    """
    limit = tokenizer.model_max_length
    distinct = list(dict.fromkeys(captions))
    # verbose=False: the tokenizer's own warning would be a second line saying the same.
    ids = tokenizer(distinct, truncation=False, verbose=False).input_ids
    lengths = [len(x) for x in ids]
    over = [(n, c) for n, c in zip(lengths, distinct, strict=True) if n > limit]
    if not over:
        return 0, "", 0
    n, caption = max(over)
    return len(over), caption, n


class CaptionedImages(torch.utils.data.Dataset):
    """Map-style dataset indexed by ``(example_index, draw_seed)`` pairs.

    The draw seed makes the crop, flip, tag order and caption dropout of an example a function
    of where it sits in the run, so they are reproduced exactly on resume. With a latent cache
    the example's VAE posterior is served instead of its pixels; with a text cache, the
    text-encoder outputs instead of token ids. For SDXL (``time_ids``) each item also carries
    its size and crop ids (``images.Geometry.time_ids``), from the decoded image or the cache.

    Args:
        examples: The checked examples.
        config: The ``[data]`` table.
        tokenizer: The tokenizer, or SDXL's two in order.
        latents: ``(index, flip) -> (mean, std, time_ids)`` from the latent cache.
        text: ``caption -> {"encoder_hidden_states": ..., ["text_embeds": ...]}``.
        time_ids: Serve SDXL's ``time_ids``.
    """

    def __init__(
        self,
        examples: list[Example],
        config: DataConfig,
        tokenizer,
        latents: Callable[[int, bool], tuple[torch.Tensor, ...]] | None = None,
        text: Callable[[str], dict[str, torch.Tensor]] | None = None,
        time_ids: bool = False,
    ) -> None:
        self.examples = examples
        self.config = config
        self.tokenizers = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer]
        self.latents = latents
        self.text = text
        self.time_ids = time_ids

    def __len__(self) -> int:
        return len(self.examples)

    def draw(self, index: int, draw_seed: int) -> tuple[bool, str, random.Random]:
        """The random choices for one example: flip, caption, and the rng for the crop."""
        config, rng = self.config, random.Random(draw_seed)
        flip = config.random_flip and rng.random() < 0.5
        caption = self.examples[index].caption
        if config.shuffle_tags:
            caption = shuffle_tags(caption, config.keep_tokens, rng)
        if rng.random() < config.caption_dropout:
            caption = ""
        return flip, caption, rng

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, draw_seed = key
        flip, caption, rng = self.draw(index, draw_seed)
        # The example's own seed also drives its latent sample, noise and timestep (step.py).
        item = {"seed": torch.tensor(draw_seed)}
        if self.text is not None:
            item.update(self.text(caption))
        else:
            # Keys input_ids, input_ids_2, ...: the names conditioning.condition() reads.
            ids = conditioning.tokenize(self.tokenizers, [caption])
            for n, token_ids in enumerate(ids, start=1):
                item["input_ids" if n == 1 else f"input_ids_{n}"] = token_ids[0]
        if self.latents is not None:
            item["latent_mean"], item["latent_std"], time_ids = self.latents(index, flip)
        else:
            example = self.examples[index]
            item["pixel_values"], geometry = images.load_example(
                example.path, example.size, self.config.center_crop, flip, rng
            )
            time_ids = torch.tensor(geometry.time_ids(), dtype=torch.float32)
        if self.time_ids:
            item["time_ids"] = time_ids
        return item


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack examples into a batch."""
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}
