"""The held-out validation images: a seeded fraction of the distinct images, split off before
training so they never train."""

from __future__ import annotations

import random
from collections.abc import Sequence

from trainer.data.dataset import Record
from trainer.data.order import seed_for


def split(records: Sequence[Record], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded ``fraction`` of the distinct images (with all their repeats).

    Returns:
        (training records, validation records, one per held-out image).
    """
    if fraction <= 0:
        return list(records), []
    paths = list(dict.fromkeys(r.path for r in records))
    count = max(1, round(fraction * len(paths)))
    if count >= len(paths):
        raise ValueError(
            f"validation.fraction = {fraction} holds out all {len(paths)} images; lower it"
        )
    held = set(random.Random(seed_for(seed, "validation")).sample(paths, count))
    train = [r for r in records if r.path not in held]
    val = list({r.path: r for r in records if r.path in held}.values())
    return train, val
