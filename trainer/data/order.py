"""The data order: which examples each micro-batch holds, as a pure function of counters.

The loop counts micro-batches ``g`` across epochs. Micro-batch ``g`` is batch ``g % per_epoch``
of epoch ``g // per_epoch``, and an epoch's order is a permutation seeded by (seed, epoch).
Resuming at micro-batch ``g`` therefore starts exactly where the interrupted run stopped, with
no replayed and no skipped batches, and no sampler state to save.

Every random choice about an example (crop, flip, caption dropout) draws from a seed derived
from (seed, epoch, position), so it is reproduced on resume as well.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence


def seed_for(*parts: int | str) -> int:
    """A 63-bit seed derived from any tuple of ints/strings (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_batches(
    groups: Sequence[Sequence[int]], global_batch: int, seed: int, epoch: int
) -> list[list[int]]:
    """The global batches of one epoch, each drawn from a single group (an aspect bucket).

    Each group is shuffled with a seeded generator and cut into full batches (a group's
    incomplete last batch is dropped, so every process always gets equal shares); then the
    batches of all groups are shuffled together.

    Args:
        groups: Example indices, one list per group. One group when bucketing is off.
        global_batch: Examples per micro-batch across all processes.
        seed: Run seed.
        epoch: Epoch number, so every epoch has its own order.
    """
    # Imported here: the run-length plan (and with it `sdlora lr-plot`) uses this module's
    # counting without torch, and torch's import alone takes seconds.
    import torch

    generator = torch.Generator().manual_seed(seed_for(seed, "order", epoch))
    batches: list[list[int]] = []
    for group in groups:
        perm = torch.randperm(len(group), generator=generator).tolist()
        shuffled = [group[i] for i in perm]
        full = len(shuffled) - len(shuffled) % global_batch
        batches += [shuffled[i : i + global_batch] for i in range(0, full, global_batch)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def batches_per_epoch(groups: Sequence[Sequence[int]], global_batch: int) -> int:
    """Full global batches in one epoch (the count :func:`epoch_batches` returns)."""
    return sum(len(g) // global_batch for g in groups)


class ResumableBatchSampler:
    """Yields this process's share of each global batch of an epoch, from a start position.

    Items are ``(example_index, draw_seed)`` pairs; the dataset uses the draw seed for
    per-example randomness. Set ``epoch`` and ``start`` before each pass.
    """

    def __init__(
        self,
        groups: Sequence[Sequence[int]],
        batch_size: int,
        num_processes: int,
        process_index: int,
        seed: int,
    ) -> None:
        self.groups = [list(g) for g in groups]
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def __len__(self) -> int:
        return batches_per_epoch(self.groups, self.batch_size * self.num_processes) - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        global_batch = self.batch_size * self.num_processes
        batches = epoch_batches(self.groups, global_batch, self.seed, self.epoch)
        lo = self.process_index * self.batch_size
        for position in range(self.start, len(batches)):
            share = batches[position][lo : lo + self.batch_size]
            yield [
                (index, seed_for(self.seed, "example", self.epoch, position, lo + slot))
                for slot, index in enumerate(share)
            ]
