"""Aspect-ratio buckets: train every image near its own shape instead of a square crop.

Bucket sizes are every (width, height) on a ``step`` grid within the side limits whose area
does not exceed ``resolution²``; for each aspect ratio only the largest such size is kept.
Each image goes to the bucket of closest aspect ratio (log scale) among those it can fill
without being upscaled more than ``max_upscale``; a batch is always drawn from one bucket.
Without bucketing there is one bucket, ``resolution × resolution``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Size = tuple[int, int]  # (width, height)


def bucket_sizes(resolution: int, step: int, min_side: int, max_side: int) -> list[Size]:
    """All bucket sizes, sorted; the largest area per aspect ratio, never above resolution²."""
    limit = resolution * resolution
    best: dict[float, Size] = {}
    for w in range(min_side, max_side + 1, step):
        for h in range(min_side, max_side + 1, step):
            if w * h > limit:
                continue
            ratio = round(w / h, 6)
            if ratio not in best or w * h > best[ratio][0] * best[ratio][1]:
                best[ratio] = (w, h)
    return sorted(best.values())


def upscale_needed(image: Size, bucket: Size) -> float:
    """How much an image must be scaled up to cover a bucket (≤ 1 means no upscaling)."""
    return max(bucket[0] / image[0], bucket[1] / image[1])


def assign(image: Size, buckets: Sequence[Size], max_upscale: float) -> Size | None:
    """The bucket for an image, or None when every bucket needs too much upscaling."""
    fits = [b for b in buckets if upscale_needed(image, b) <= max_upscale + 1e-9]
    if not fits:
        return None
    aspect = math.log(image[0] / image[1])
    return min(fits, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def group_by_bucket(assigned: Sequence[Size]) -> tuple[list[Size], list[list[int]]]:
    """Example indices grouped by bucket: (bucket sizes, one index list per size), sorted."""
    sizes = sorted(set(assigned))
    position = {size: i for i, size in enumerate(sizes)}
    groups: list[list[int]] = [[] for _ in sizes]
    for index, size in enumerate(assigned):
        groups[position[size]].append(index)
    return sizes, groups
