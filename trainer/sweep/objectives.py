"""What a sweep compares its configurations on (the sweep file's ``objective``).

Each objective is a number every run writes into ``metrics.jsonl`` at its validation points:
the fixed-seed validation loss (``final``: its value at the end; ``best``: its lowest over
the run, for users who keep the best checkpoint), or an image score of ``validation.scores``
(CLIP-T, CLIP-I, DINO; ``trainer/report/image_scores.py``). Losses are better lower, scores
higher. One objective is an Optuna study with one direction; two make a multi-objective
study, and the report draws their Pareto front.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Objective:
    """What a sweep compares its configurations on: a number each run writes in
    ``metrics.jsonl``, its final value or its best over the run."""

    name: str  # as the sweep file's ``objective`` names it
    title: str  # in the report's words
    metric: str  # the metrics.jsonl key
    lower_is_better: bool
    over_run: bool = False  # the best value of the run, not the final one
    score: str = ""  # the validation.scores entry the runs must compute; "" = the loss

    @property
    def best_word(self) -> str:
        return "lowest" if self.lower_is_better else "highest"

    @property
    def direction(self) -> Literal["minimize", "maximize"]:
        """Optuna's study direction."""
        return "minimize" if self.lower_is_better else "maximize"


OBJECTIVES = {
    o.name: o
    for o in (
        Objective("final", "final validation loss", "val_loss", True),
        Objective("best", "best validation loss", "val_loss", True, over_run=True),
        Objective("clip_t", "CLIP-T", "clip_t", False, score="clip_t"),
        Objective("clip_i", "CLIP-I", "clip_i", False, score="clip_i"),
        Objective("dino", "DINO score", "dino", False, score="dino"),
    )
}  # fmt: skip
MAX_OBJECTIVES = 2  # a Pareto front of two is a picture; more is not


def objective_problems(names: Sequence[str]) -> list[str]:
    """An objective list the sweep can use: known names, one or two, none repeated."""
    p = []
    for name in names:
        if name not in OBJECTIVES:
            close = difflib.get_close_matches(name, list(OBJECTIVES), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            p.append(f"objective: {name!r} is not one of {', '.join(OBJECTIVES)}{hint}")
    if not names or len(names) > MAX_OBJECTIVES:
        p.append(f"objective: give one or two of {', '.join(OBJECTIVES)} (got {list(names)})")
    if len(set(names)) != len(names):
        p.append(f"objective: {list(names)} names one objective twice")
    return p
