"""The dataset's subsets: their records found, repeated, and regularisation images mixed in.

Each subset (``[[data.subsets]]``, or ``[data]`` as the one subset) is read like a dataset of
its own: its records are listed once per ``repeats`` (and kohya's ``N_name`` subfolders N
times more), tagged with the subset's index so every later step reads its settings.

Regularisation images (``is_reg = true``) are mixed in as kohya's ``DreamBoothDataset`` does
(:func:`reg_counts`): an epoch holds as many regularisation examples as training examples
(repeats counted). A first pass takes each regularisation image with its own repeats, in
order, until the count is reached; further passes add one use per image, in order. So an epoch
of N training examples has about 2·N examples, and with it twice the micro-batches: the run
length derived from ``train.epochs`` counts both. More regularisation images than that leaves
the last ones unused, as kohya does. The count is taken over the images that passed the checks
(kohya counts before its own checks), so the balance holds for what trains.
"""

from __future__ import annotations

from collections.abc import Sequence

from trainer.config.load import DataConfig
from trainer.config.subsets import effective_subsets
from trainer.data import buckets
from trainer.data import dataset as data


def find(config: DataConfig, mask_suffix: str = "") -> list[data.Record]:
    """Every record of every subset, each listed once per use in an epoch, tagged with its
    subset's index; regularisation images listed once per ``repeats`` (mixed in later).
    ``mask_suffix`` (with masked loss): mask files are no records."""
    records: list[data.Record] = []
    for index, subset in enumerate(effective_subsets(config)):
        where = f"data.subsets[{index}].path" if config.subsets else "data.path"
        found = data.find_records(subset, where=where, mask_suffix=mask_suffix)
        tagged = [data.Record(r.path, r.caption, r.problem, index) for r in found]
        records += tagged * subset.repeats
    return records


def is_reg(config: DataConfig, record: data.Record) -> bool:
    """Whether a record belongs to a regularisation subset."""
    return effective_subsets(config)[record.subset].is_reg


def reg_counts(train_examples: int, repeats: Sequence[int]) -> list[int]:
    """How often each regularisation image is used per epoch, by kohya's rule.

    Args:
        train_examples: Training examples per epoch, repeats counted.
        repeats: Each regularisation image's own repeats, in order.

    Returns:
        One count per image (0: not used this epoch).
    """
    counts = [0] * len(repeats)
    used, first_pass = 0, True
    while repeats and used < train_examples:
        for i, r in enumerate(repeats):
            step = r if first_pass else 1
            counts[i] += step
            used += step
            if used >= train_examples:
                break
        first_pass = False
    return counts


def mix_regularisation(prepared: data.Prepared) -> data.Prepared:
    """The checked examples with the regularisation ones balanced against the training ones
    (:func:`reg_counts`), regrouped by bucket. Without regularisation images: unchanged."""
    examples = prepared.examples
    reg = [e for e in examples if e.is_reg]
    if not reg:
        return prepared
    train = [e for e in examples if not e.is_reg]
    # Each distinct regularisation image once, with the uses its repeats gave it, in order.
    uses: dict[tuple, tuple[data.Example, int]] = {}
    for e in reg:
        key = (e.path, e.subset)
        first, n = uses.get(key, (e, 0))
        uses[key] = (first, n + 1)
    images = list(uses.values())
    counts = reg_counts(len(train), [n for _, n in images])
    mixed = train + [e for (e, _), count in zip(images, counts, strict=True) for _ in range(count)]
    sizes, groups = buckets.group_by_bucket([e.size for e in mixed])
    return data.Prepared(mixed, groups, sizes, prepared.skipped, prepared.notes)
