"""Aspect-ratio buckets: train every image near its own shape instead of a square crop.

Bucket sizes are every (width, height) on a ``step`` grid within the side limits whose area
does not exceed ``resolution²`` (smaller sizes included, so an image a little under the
training size still finds a bucket of its own shape instead of being cut to another one).

An image is scaled to cover its bucket and the overflow is cropped, so the share of the
picture cut away depends only on the two aspect ratios (:func:`crop_fraction`). Each image
goes to the **largest** bucket it can fill (upscaled at most ``max_upscale``) that crops at
most ``max_crop`` of it; when no bucket is that close in shape, to the largest of those that
crop least. So:

- the crop never exceeds ``max_crop`` whenever a bucket within ``max_crop`` fits the image;
- among buckets that keep the picture, the one with the most training pixels wins: a 4:3 photo
  trains at 576×448 (3.6 % cut) rather than an exact but 24 % smaller 512×384;
- near-square images get square buckets: on a 64 px grid at 512 the closest non-square shape
  under the area limit is 8:7, so squares crop least up to a ratio of about 1.07.

Without bucketing there is one bucket, ``resolution × resolution``. ``docs/buckets.md`` measures
the crop against kohya's bucketing (``scripts/bucket_crop_table.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

Size = tuple[int, int]  # (width, height)

# The crop an image may get for a bigger bucket. 5 % of the picture is about 2.5 % off each of
# two opposite edges: framing survives, and it still lets common photo ratios (4:3, 5:4, 16:10)
# use buckets of nearly the full training area; see docs/buckets.md for the measured trade-off.
MAX_CROP = 0.05

# Float slack for comparisons of ratios computed from integers.
_EPS = 1e-9


def bucket_sizes(resolution: int, step: int, min_side: int, max_side: int) -> list[Size]:
    """Every bucket size, sorted: sides on the ``step`` grid, area never above resolution².

    Args:
        resolution: Training side; bucket areas are at most its square.
        step: Bucket sides are multiples of this.
        min_side: Smallest side (rounded up to the grid).
        max_side: Largest side.
    """
    limit = resolution * resolution
    first = -(-min_side // step) * step  # the grid's first side ≥ min_side
    sides = range(first, max_side + 1, step)
    return sorted((w, h) for w in sides for h in sides if w * h <= limit)


def upscale_needed(image: Size, bucket: Size) -> float:
    """How much an image must be scaled up to cover a bucket (≤ 1 means no upscaling)."""
    return max(bucket[0] / image[0], bucket[1] / image[1])


def crop_fraction(image: Size, bucket: Size) -> float:
    """Share of the picture cut away when the image is scaled to cover the bucket and cropped.

    Scaled to cover, the image matches the bucket along one side and overflows along the
    other by the ratio of the two aspect ratios; that overflow is what the crop removes.
    """
    image_aspect = image[0] / image[1]
    bucket_aspect = bucket[0] / bucket[1]
    return 1.0 - min(image_aspect / bucket_aspect, bucket_aspect / image_aspect)


def assign(
    image: Size, buckets: Sequence[Size], max_upscale: float, max_crop: float = MAX_CROP
) -> Size | None:
    """The bucket for an image, or None when every bucket needs too much upscaling.

    Args:
        image: (width, height) of the upright image.
        buckets: Candidate sizes, e.g. from :func:`bucket_sizes`.
        max_upscale: Largest upscaling allowed to fill a bucket.
        max_crop: Largest share of the picture that may be cut to use a bigger bucket.

    Returns:
        The largest-area bucket among those that fit and crop at most ``max_crop`` (or, when
        none does, at most the least crop any fitting bucket achieves); ties go to the smaller
        crop, then to the smaller size, so the choice never depends on the order of
        ``buckets``.
    """
    fits = [b for b in buckets if upscale_needed(image, b) <= max_upscale + _EPS]
    if not fits:
        return None
    crops = {b: crop_fraction(image, b) for b in fits}
    allowed = max(max_crop, min(crops.values())) + _EPS
    kept = [b for b in fits if crops[b] <= allowed]
    return min(kept, key=lambda b: (-b[0] * b[1], crops[b], b))


def group_by_bucket(assigned: Sequence[Size]) -> tuple[list[Size], list[list[int]]]:
    """Example indices grouped by bucket: (bucket sizes, one index list per size), sorted."""
    sizes = sorted(set(assigned))
    position = {size: i for i, size in enumerate(sizes)}
    groups: list[list[int]] = [[] for _ in sizes]
    for index, size in enumerate(assigned):
        groups[position[size]].append(index)
    return sizes, groups
