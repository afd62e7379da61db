"""Image-caption datasets: discover records, load and transform images, tokenize captions.

Two layouts are read:
- kohya: images with a caption file beside them (``a.png`` + ``a.txt``); a subfolder named
  ``N_name`` repeats its images N times per epoch.
- imagefolder: images plus ``metadata.jsonl`` or ``metadata.csv`` with ``file_name`` and
  ``text`` columns (the Hugging Face ``datasets`` convention).
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from trainer.config import DataConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


class DataError(ValueError):
    """A problem with the dataset; the message names the file and the fix."""


@dataclass(frozen=True)
class Record:
    """One training example: an image file and its caption."""

    path: Path
    caption: str


def _read_caption(image: Path, extension: str) -> str:
    for ext in (extension, ".caption", ".txt"):
        caption_file = image.with_suffix(ext)
        if caption_file.is_file():
            try:
                return caption_file.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as err:
                raise DataError(f"{caption_file}: caption is not UTF-8 text ({err})") from err
    raise DataError(
        f"{image}: no caption file ({image.with_suffix(extension).name}); write one beside the "
        "image, or set data.caption_extension to the extension your captions use"
    )


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def find_kohya(root: Path, caption_extension: str) -> list[Record]:
    """Records of a kohya-style folder, with ``N_name`` subfolders repeated N times."""
    records = [Record(p, _read_caption(p, caption_extension)) for p in _images_in(root)]
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        match = _REPEAT_FOLDER.match(sub.name)
        repeats = int(match.group(1)) if match else 1
        found = [Record(p, _read_caption(p, caption_extension)) for p in _images_in(sub)]
        records += found * repeats
    return records


def find_imagefolder(root: Path) -> list[Record]:
    """Records of an imagefolder with ``metadata.jsonl`` or ``metadata.csv``."""
    jsonl, csv_file = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.is_file():
        rows = []
        for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise DataError(f"{jsonl}:{n}: not valid JSON ({err})") from err
        source = jsonl
    elif csv_file.is_file():
        with csv_file.open(encoding="utf-8", newline="") as f:
            rows = list(enumerate(csv.DictReader(f), 2))
        source = csv_file
    else:
        raise DataError(f"{root}: no metadata.jsonl or metadata.csv for the imagefolder layout")
    records = []
    for n, row in rows:
        if "file_name" not in row or "text" not in row:
            raise DataError(f"{source}:{n}: needs 'file_name' and 'text' fields, got {sorted(row)}")
        path = root / row["file_name"]
        if not path.is_file():
            raise DataError(f"{source}:{n}: image {path} does not exist")
        records.append(Record(path, str(row["text"]).strip()))
    return records


def find_records(config: DataConfig) -> list[Record]:
    """All records of the configured dataset, in a stable order."""
    root = Path(config.path)
    if not root.is_dir():
        raise DataError(f"data.path = {config.path!r}: not a folder")
    layout = config.layout
    if layout == "auto":
        has_metadata = any((root / n).is_file() for n in ("metadata.jsonl", "metadata.csv"))
        layout = "imagefolder" if has_metadata else "kohya"
    if layout == "imagefolder":
        records = find_imagefolder(root)
    else:
        records = find_kohya(root, config.caption_extension)
    if not records:
        raise DataError(
            f"data.path = {config.path!r}: no images found ({', '.join(IMAGE_EXTENSIONS)}), "
            f"layout {layout!r}"
        )
    return records


def load_image(
    path: Path, size: tuple[int, int], center_crop: bool, flip: bool, rng: random.Random
) -> torch.Tensor:
    """Load an image as a (3, H, W) float tensor in [-1, 1]: resize to cover, crop, flip.

    Args:
        path: Image file.
        size: Target (width, height).
        center_crop: Crop the center; otherwise at a place drawn from ``rng``.
        flip: Mirror horizontally.
        rng: Source of the crop position.
    """
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot read the image ({err})") from err
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(resized, Image.Resampling.BICUBIC)
    dx, dy = resized[0] - width, resized[1] - height
    left, top = (dx // 2, dy // 2) if center_crop else (rng.randint(0, dx), rng.randint(0, dy))
    image = image.crop((left, top, left + width, top + height))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


class CaptionedImages(torch.utils.data.Dataset):
    """Map-style dataset indexed by ``(example_index, draw_seed)`` pairs.

    The draw seed makes the random crop, flip and caption dropout of an example a function of
    where it sits in the run, so they are reproduced exactly on resume.
    """

    def __init__(self, records: list[Record], config: DataConfig, tokenizer) -> None:
        self.records = records
        self.config = config
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.records)

    def tokenize(self, caption: str) -> torch.Tensor:
        """Token ids padded/truncated to the tokenizer's length (77 for CLIP)."""
        return self.tokenizer(
            caption,
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids[0]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, draw_seed = key
        record = self.records[index]
        rng = random.Random(draw_seed)
        flip = self.config.random_flip and rng.random() < 0.5
        caption = "" if rng.random() < self.config.caption_dropout else record.caption
        size = (self.config.resolution, self.config.resolution)
        pixels = load_image(record.path, size, self.config.center_crop, flip, rng)
        return {"pixel_values": pixels, "input_ids": self.tokenize(caption)}


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack examples into a batch."""
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}
