"""Write a small synthetic image-caption dataset of simple coloured shapes.

Two layouts, the two the trainer reads:
    kohya (default)  OUT_DIR/img_000.png + OUT_DIR/img_000.txt, one caption file per image
    imagefolder      OUT_DIR/img_000.png ... + OUT_DIR/metadata.jsonl ({"file_name", "text"})

Usage:
    python scripts/make_tiny_dataset.py OUT_DIR [--count 32] [--size 64] [--layout kohya]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 40, 170),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(size: int, shape: str, colour: tuple, background: tuple, rng: random.Random):
    """Draw one shape of random position and scale on a plain background."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.2, 0.4) * size
    cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon(
            [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], colour
        )
    return image


def make_tiny_dataset(
    out_dir: str | Path, count: int = 32, size: int = 64, layout: str = "kohya", seed: int = 0
) -> Path:
    """Write ``count`` images of ``size`` px with captions; return the folder.

    Args:
        out_dir: Folder to write into (created).
        count: Number of images.
        size: Side of the square images in pixels.
        layout: ``kohya`` (caption .txt beside each image) or ``imagefolder`` (metadata.jsonl).
        seed: Seed, so the same arguments always write the same files.
    """
    if layout not in ("kohya", "imagefolder"):
        raise ValueError(f"layout must be 'kohya' or 'imagefolder', not {layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        colour = rng.choice(sorted(COLOURS))
        background = rng.choice(sorted(BACKGROUNDS))
        image = draw_shape(size, shape, COLOURS[colour], BACKGROUNDS[background], rng)
        name = f"img_{i:03d}.png"
        image.save(out / name)
        caption = f"a {colour} {shape} on a {background} background"
        if layout == "kohya":
            (out / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        rows.append({"file_name": name, "text": caption})
    if layout == "imagefolder":
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        (out / "metadata.jsonl").write_text(lines, encoding="utf-8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--layout", default="kohya", choices=["kohya", "imagefolder"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = make_tiny_dataset(args.out_dir, args.count, args.size, args.layout, args.seed)
    print(f"wrote {args.count} images ({args.layout} layout) to {path}")


if __name__ == "__main__":
    main()
