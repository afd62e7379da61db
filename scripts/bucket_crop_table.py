"""Measure how much of each picture aspect-ratio bucketing cuts away: ours against kohya's.

A seeded spread of image sizes (sides 300-2000 px; common photo ratios in both orientations plus
random ratios) is bucketed four ways at one resolution:

- ``sdlora`` : :func:`trainer.data.buckets.assign` over
  :func:`trainer.data.buckets.bucket_sizes`, with the
  defaults of ``configs/lora.toml`` (64 px grid, sides resolution/2 .. 2 × resolution,
  ``max_upscale = 1``);
- ``sdlora (before)``: the previous rule, kept here for comparison: only the largest size per
  aspect ratio, and the closest aspect ratio the image can fill without upscaling;
- ``kohya``: kohya-ss sd-scripts' default bucketing, re-implemented from its description: for
  every width on the grid the tallest height keeping the area within resolution² (and its
  transpose, plus the largest square); each image goes to the bucket of closest aspect ratio,
  is scaled (up or down) to cover it, and center-cropped;
- ``kohya no_upscale``: its ``bucket_no_upscale`` mode: an image larger than resolution² in area
  is first scaled down to that area at its own aspect ratio, with one side snapped to the grid
  (whichever keeps the aspect closer); the bucket is then the (scaled) size floored to the grid,
  and the remainder is cropped without further scaling.

Crop is measured from the geometry, as the share of the scaled image's area outside the bucket.
"Pixels" is the bucket area relative to resolution², the detail the model trains on.

    python scripts/bucket_crop_table.py [--resolution 512] [--max-crop 0.03 0.05 0.08]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from trainer.data import buckets, images  # noqa: E402

Size = tuple[int, int]
# (bucket, size the image is scaled to before the crop), or None when the image is refused.
Placement = tuple[Size, Size] | None

COMMON_RATIOS = [(1, 1), (4, 3), (3, 2), (16, 9), (5, 4), (3, 4), (2, 3), (9, 16), (4, 5)]


def spread(per_ratio: int = 300, random_count: int = 2700, seed: int = 0) -> list[Size]:
    """Image sizes with both sides in 300..2000 px: common ratios, then random ratios.

    Each size draws its short side uniformly from what keeps the long side ≤ 2000; random
    ratios are log-uniform between 1:2.5 and 2.5:1.
    """
    rng = random.Random(seed)

    def sized(ratio: float) -> Size:
        long_over_short = max(ratio, 1 / ratio)
        short = rng.uniform(300, 2000 / long_over_short)
        long = round(short * long_over_short)
        short = round(short)
        return (long, short) if ratio >= 1 else (short, long)

    sizes = [sized(w / h) for w, h in COMMON_RATIOS for _ in range(per_ratio)]
    sizes += [
        sized(math.exp(rng.uniform(-math.log(2.5), math.log(2.5)))) for _ in range(random_count)
    ]
    return sizes


# ---------------------------------------------------------------- the four bucketings


def sdlora(resolution: int, step: int = 64, max_crop: float = buckets.MAX_CROP):
    """Our bucketing; the scale-to-cover size comes from the crop the loader really does."""
    grid = buckets.bucket_sizes(resolution, step, resolution // 2, resolution * 2)

    def place(image: Size) -> Placement:
        bucket = buckets.assign(image, grid, 1.0, max_crop)
        if bucket is None:
            return None
        resized, _ = images.crop_box(image, bucket, True, random.Random(0))
        return bucket, resized

    return place


def sdlora_before(resolution: int, step: int = 64):
    """The rule before this change: largest size per ratio; closest ratio that fits."""
    limit = resolution * resolution
    largest: dict[float, Size] = {}
    for w in range(resolution // 2, resolution * 2 + 1, step):
        for h in range(resolution // 2, resolution * 2 + 1, step):
            ratio = round(w / h, 6)
            if w * h <= limit and (ratio not in largest or w * h > math.prod(largest[ratio])):
                largest[ratio] = (w, h)
    grid = sorted(largest.values())

    def place(image: Size) -> Placement:
        fits = [b for b in grid if buckets.upscale_needed(image, b) <= 1.0 + 1e-9]
        if not fits:
            return None
        aspect = math.log(image[0] / image[1])
        bucket = min(fits, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))
        resized, _ = images.crop_box(image, bucket, True, random.Random(0))
        return bucket, resized

    return place


def kohya_grid(resolution: int, step: int = 64, low: int = 256, high: int = 1024) -> list[Size]:
    """kohya's predefined buckets: per grid width the tallest grid height within the area."""
    area = resolution * resolution
    square = math.isqrt(area) // step * step
    grid = {(square, square)}
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            grid |= {(width, height), (height, width)}
    return sorted(grid)


def kohya(resolution: int, step: int = 64):
    """kohya's default: closest ratio (linear difference), scale to cover, center crop."""
    grid = kohya_grid(resolution, step)

    def place(image: Size) -> Placement:
        w, h = image
        bucket = image if image in grid else min(grid, key=lambda b: abs(b[0] / b[1] - w / h))
        # Match the side along which the image is relatively shorter, so it covers the bucket.
        scale = bucket[1] / h if w / h > bucket[0] / bucket[1] else bucket[0] / w
        return bucket, (int(w * scale + 0.5), int(h * scale + 0.5))

    return place


def kohya_no_upscale(resolution: int, step: int = 64):
    """kohya's ``bucket_no_upscale``: the bucket follows the image's own size."""
    area = resolution * resolution

    def snap(x: float) -> int:
        x = int(x + 0.5)
        return x - x % step

    def place(image: Size) -> Placement:
        w, h = image
        aspect = w / h
        resized = image
        if w * h > area:
            # Scale down to the area at the image's ratio; snap the width or the height to the
            # grid, whichever snapped pair stays closer to the ratio, and derive the other.
            fit_w = math.sqrt(area * aspect)
            fit_h = area / fit_w
            by_width = snap(fit_w) / snap(snap(fit_w) / aspect)
            by_height = snap(snap(fit_h) * aspect) / snap(fit_h)
            if abs(by_width - aspect) < abs(by_height - aspect):
                resized = (snap(fit_w), int(snap(fit_w) / aspect + 0.5))
            else:
                resized = (int(snap(fit_h) * aspect + 0.5), snap(fit_h))
        bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
        return bucket, resized

    return place


# ---------------------------------------------------------------- the table


def crop_of(bucket: Size, resized: Size) -> float:
    """Share of the scaled image's area that falls outside the bucket."""
    return max(0.0, 1.0 - bucket[0] * bucket[1] / (resized[0] * resized[1]))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile by the nearest-rank rule (no interpolation, no numpy needed)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def left_out(
    buckets_of: Sequence[Size | None], dataset: int = 50, batch: int = 4, draws: int = 200
) -> float:
    """Mean share of a dataset outside full batches, over random datasets from the spread.

    Batches are drawn within one bucket and a bucket's incomplete last batch waits for the
    next epoch (``trainer/data/order.py``), so many thinly filled buckets idle many examples.
    """
    rng = random.Random(0)
    idle = total = 0
    for _ in range(draws):
        counts: dict[Size, int] = {}
        for bucket in rng.sample(list(buckets_of), dataset):
            if bucket is not None:
                counts[bucket] = counts.get(bucket, 0) + 1
        idle += sum(n % batch for n in counts.values())
        total += sum(counts.values())
    return idle / total


def measure(place: Callable[[Size], Placement], sizes: Sequence[Size], resolution: int) -> dict:
    """Summary statistics of one bucketing over a spread of sizes."""
    placed = [(image, place(image)) for image in sizes]
    kept = [(image, p) for image, p in placed if p is not None]
    crops = [crop_of(bucket, resized) for _, (bucket, resized) in kept]
    pixels = [bucket[0] * bucket[1] / resolution**2 for _, (bucket, _) in kept]
    upscaled = [resized[0] > image[0] or resized[1] > image[1] for image, (_, resized) in kept]
    return {
        "refused": 1 - len(kept) / len(sizes),
        "mean": sum(crops) / len(crops),
        "p95": percentile(crops, 0.95),
        "max": max(crops),
        "over5": sum(c > 0.05 for c in crops) / len(crops),
        "over10": sum(c > 0.10 for c in crops) / len(crops),
        "pixels": sum(pixels) / len(pixels),
        "upscaled": sum(upscaled) / len(upscaled),
        "buckets": len({bucket for _, (bucket, _) in kept}),
        "left_out": left_out([p[0] if p else None for _, p in placed]),
    }


def table(rows: dict[str, dict]) -> str:
    """A markdown table, one row per bucketing."""
    pct = "{:.1%}".format
    header = (
        "| bucketing | mean crop | p95 crop | max crop | cropped > 5 % | cropped > 10 % "
        "| pixels / res² | upscaled | refused | buckets used | idle at batch 4 |"
    )
    lines = [header, "|---|" + "---:|" * 10]
    for name, m in rows.items():
        cells = [m["mean"], m["p95"], m["max"], m["over5"], m["over10"], m["pixels"]]
        cells += [m["upscaled"], m["refused"]]
        lines.append(
            f"| {name} | " + " | ".join(pct(c) for c in cells) + f" | {m['buckets']} "
            f"| {pct(m['left_out'])} |"
        )
    return "\n".join(lines)


def photo_table(places: dict[str, Callable[[Size], Placement]], long_side: int = 1920) -> str:
    """Which bucket a large photo of each common ratio gets, and the share cut away."""
    names = list(places)
    lines = ["| photo | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for w, h in COMMON_RATIOS:
        image = (
            (long_side, round(long_side * h / w))
            if w >= h
            else (round(long_side * w / h), long_side)
        )
        cells = []
        for name in names:
            placed = places[name](image)
            if placed is None:
                cells.append("refused")
                continue
            bucket, resized = placed
            cells.append(f"{bucket[0]}×{bucket[1]}, {crop_of(bucket, resized):.1%}")
        lines.append(f"| {w}:{h} ({image[0]}×{image[1]}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512, help="training side in pixels")
    parser.add_argument(
        "--max-crop",
        type=float,
        nargs="*",
        default=[],
        help="also show sdlora with these max_crop values (default: only the built-in one)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the size spread")
    args = parser.parse_args(argv)
    res, sizes = args.resolution, spread(seed=args.seed)
    rows = {f"sdlora (max_crop {buckets.MAX_CROP:g})": measure(sdlora(res), sizes, res)}
    for value in args.max_crop:
        rows[f"sdlora (max_crop {value:g})"] = measure(sdlora(res, max_crop=value), sizes, res)
    rows["sdlora (before)"] = measure(sdlora_before(res), sizes, res)
    rows["kohya"] = measure(kohya(res), sizes, res)
    rows["kohya no_upscale"] = measure(kohya_no_upscale(res), sizes, res)
    print(f"{len(sizes)} images, resolution {res}, 64 px grid\n")
    print(table(rows))
    places = {"sdlora": sdlora(res), "sdlora (before)": sdlora_before(res), "kohya": kohya(res)}
    places["kohya no_upscale"] = kohya_no_upscale(res)
    print(f"\nBucket and crop of a photo with a {1920} px long side\n")
    print(photo_table(places))


if __name__ == "__main__":
    main()
