"""``[[data.subsets]]``: the dataset as several folders, each with its own repeats, captions,
training size and role (training images or regularisation images).

A subset table names its ``path`` and may set any of :data:`INHERITED`; a key it leaves out
takes ``[data]``'s value, so ``[data]`` holds what the folders share. The tables are resolved
when the config loads: the run's ``config.toml`` lists every key of every subset, so a resumed
or swept run compares them as they were trained.

Without subsets, ``[data]`` is the one subset (``data.path``, repeats 1), as before subsets
existed. kohya's ``N_name`` subfolders still repeat their images N times within a subset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from typedtables import build_table, doc

if TYPE_CHECKING:
    from trainer.config.schema import DataConfig

# The [data] keys a subset may set for itself; the ones it leaves out come from [data].
INHERITED = (
    "layout",
    "caption_extension",
    "resolution",
    "random_flip",
    "caption_dropout",
    "shuffle_tags",
    "keep_tokens",
    "alpha_mask",
)


@dataclass(frozen=True)
class SubsetConfig:
    """[[data.subsets]]: one folder of the dataset (keys it leaves out come from [data])."""

    path: str = doc("This subset's folder of images and captions (required)", "")
    repeats: int = doc(
        "Times each image is seen per epoch (kohya's num_repeats); N_name subfolders multiply "
        "it by N",
        1,
    )
    is_reg: bool = doc(
        "Regularisation (prior-preservation) images: mixed in as kohya does, as many per "
        "epoch as there are training images, their loss weighted by data.prior_loss_weight",
        False,
    )
    loss_weight: float = doc("Multiplies the loss of this subset's images", 1.0)
    layout: Literal["auto", "kohya", "imagefolder"] = doc("As data.layout", "auto")
    caption_extension: str = doc("As data.caption_extension", ".txt")
    resolution: int = doc("As data.resolution: this subset's training side in pixels", 512)
    random_flip: bool = doc("As data.random_flip", False)
    caption_dropout: float = doc("As data.caption_dropout", 0.0)
    shuffle_tags: bool = doc("As data.shuffle_tags", False)
    keep_tokens: int = doc("As data.keep_tokens", 0)
    alpha_mask: bool = doc("As data.alpha_mask: mask this subset's images by their alpha", False)

    def problems(self, where: str) -> list[str]:
        """Checks of this table alone."""
        from trainer.config.schema import caption_problems, resolution_problems

        p = []
        if not self.path.strip():
            p.append(f"{where}.path: required; the folder of this subset's images and captions")
        if self.repeats < 1:
            p.append(f"{where}.repeats: {self.repeats} must be >= 1")
        if self.loss_weight < 0:
            p.append(f"{where}.loss_weight: {self.loss_weight} must be >= 0")
        return p + resolution_problems(where, self.resolution) + caption_problems(where, self)


def build_subsets(data: DataConfig, raw: Any, problems: list[str]) -> tuple[SubsetConfig, ...]:
    """The ``[[data.subsets]]`` tables, each completed with ``[data]``'s values.

    Args:
        data: The ``[data]`` table, built.
        raw: The TOML value of ``data.subsets`` (an array of tables).
        problems: Receives every problem, each naming ``data.subsets[i].key``.
    """
    if not isinstance(raw, list):
        problems.append(
            "data.subsets: expected an array of tables ([[data.subsets]] blocks, or "
            f"[{{path = ...}}, ...]), got {type(raw).__name__}"
        )
        return ()
    inherited = {key: getattr(data, key) for key in INHERITED}
    subsets = []
    for i, table in enumerate(raw):
        where = f"data.subsets[{i}]"
        if not isinstance(table, Mapping):
            problems.append(f"{where}: expected a table with at least `path`, got {table!r}")
            continue
        subsets.append(build_table(SubsetConfig, {**inherited, **table}, where, problems))
    return tuple(subsets)


def subset_problems(data: DataConfig) -> list[str]:
    """What ``data.path`` and the subsets say together."""
    if data.subsets and data.path.strip():
        return [
            "data.path / [[data.subsets]]: both are set; with subsets every folder is a "
            'subset: move data.path into a [[data.subsets]] table (or set data.path = "")'
        ]
    if not data.subsets and not data.path.strip():
        return [
            "data.path: required; the folder holding your images and captions (or several "
            "folders as [[data.subsets]] tables)"
        ]
    if data.subsets and all(s.is_reg for s in data.subsets):
        return [
            "data.subsets: every subset has is_reg = true; regularisation images are mixed in "
            "against training images, so at least one subset must hold training images"
        ]
    return []


def effective_subsets(data: DataConfig) -> tuple[SubsetConfig, ...]:
    """The subsets a run reads: ``[[data.subsets]]``, or ``[data]`` as the one subset."""
    if data.subsets:
        return data.subsets
    shared = {key: getattr(data, key) for key in INHERITED}
    return (SubsetConfig(path=data.path, **shared),)


def with_subsets(data: DataConfig, subsets: tuple[SubsetConfig, ...]) -> DataConfig:
    """``data`` holding ``subsets``."""
    return dataclasses.replace(data, subsets=subsets)
