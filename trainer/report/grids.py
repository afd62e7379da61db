"""Image grids with labels: one validation point's samples, and the whole run's progression.

Pure layout on PIL images; what goes in them is decided by the callers: training's samples
(``trainer/report/samples.py``) and ``sdlora sample``'s base-against-LoRA comparison.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from PIL import Image, ImageDraw, ImageFont

GRID_NAME = "grid.png"
PROGRESSION_NAME = "progression.png"
# Longest tile side in the progression grid and in tensorboard: SD-1.x samples stay whole,
# SDXL ones are halved, so 16 columns of 8 prompts stay a viewable, loggable image.
TILE_MAX = 512
# Most validation points in the progression grid; more are thinned out evenly.
MAX_COLUMNS = 16

_PAD = 4
_BACKGROUND = (255, 255, 255)
_BLANK = (128, 128, 128)


# A sample point's per-prompt image, ``samples.image_name``: p<prompt index>-seed<seed>.png.
_PROMPT_IMAGE = re.compile(r"p(\d+)-seed(-?\d+)\.png")


def images_by_prompt(folder: Path) -> dict[int, Path]:
    """A sample point's image of each prompt index, in prompt order (the point's grid of
    them, and any temporary file of an interrupted write, left out)."""
    found: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        match = _PROMPT_IMAGE.fullmatch(path.name)
        if match:
            found.setdefault(int(match.group(1)), path)
    return dict(sorted(found.items()))


def spread(count: int, most: int) -> list[int]:
    """At most ``most`` indices of ``range(count)``, evenly spaced, first and last included."""
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def _font(tile: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    size = max(10, tile // 16)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size only
        return ImageFont.load_default()


def _fit(image: Image.Image, tile_max: int | None) -> Image.Image:
    if tile_max is None or max(image.size) <= tile_max:
        return image
    scale = tile_max / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def grid(
    rows: Sequence[Sequence[Image.Image | None]],
    row_labels: Sequence[str] | None,
    col_labels: Sequence[str] | None = None,
    tile_max: int | None = None,
) -> Image.Image:
    """Tiles in rows and columns, a label left of each row and above each column.

    Args:
        rows: The images, row by row; None leaves a grey tile (a prompt absent at a point).
        row_labels: One per row, or None for no label column.
        col_labels: One per column, or None for no header.
        tile_max: Shrink tiles whose longer side exceeds this; None keeps them whole.
    """
    tiles = [[None if t is None else _fit(t, tile_max) for t in row] for row in rows]
    present = [t for row in tiles for t in row if t is not None]
    width = max((t.width for t in present), default=64)
    height = max((t.height for t in present), default=64)
    font = _font(height)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        box = draw.textbbox((0, 0), text, font=font)
        # Pillow types the box as floats; from an integer origin its fonts give ints.
        left, top, right, bottom = cast("tuple[int, int, int, int]", box)
        return right - left, bottom - top

    label_w = max((text_size(t)[0] for t in row_labels), default=0) + 2 * _PAD if row_labels else 0
    header_h = max((text_size(t)[1] for t in col_labels), default=0) + 2 * _PAD if col_labels else 0
    columns = max((len(row) for row in tiles), default=0)
    canvas = Image.new(
        "RGB", (label_w + columns * width, header_h + len(tiles) * height), _BACKGROUND
    )
    pen = ImageDraw.Draw(canvas)
    for c, text in enumerate(col_labels or []):
        pen.text((label_w + c * width + _PAD, _PAD), text, fill=(0, 0, 0), font=font)
    for r, row in enumerate(tiles):
        top = header_h + r * height
        if row_labels:
            pen.text((_PAD, top + _PAD), row_labels[r], fill=(0, 0, 0), font=font)
        for c, tile in enumerate(row):
            left = label_w + c * width
            if tile is None:
                pen.rectangle((left, top, left + width - 1, top + height - 1), fill=_BLANK)
            else:
                canvas.paste(tile.convert("RGB"), (left, top))
    return canvas
