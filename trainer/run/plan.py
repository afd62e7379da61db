"""How long a run is: micro-batches per epoch and optimizer updates, as training counts them.

Shared by the loop and by ``sdlora lr-plot``, so the preview derives the same run length.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config.load import ConfigError, RunConfig
from trainer.data.order import batches_per_epoch


@dataclass(frozen=True)
class Plan:
    """How long the run is, in the units the schedule and the checkpoints use."""

    micro_batches_per_epoch: int
    total_updates: int
    accumulation: int

    def position(self, update: int) -> tuple[int, int]:
        """(epoch, micro-batch within the epoch) where optimizer update ``update`` starts."""
        return divmod(update * self.accumulation, self.micro_batches_per_epoch)


def plan_run(config: RunConfig, groups: list[list[int]], num_processes: int) -> Plan:
    """Count micro-batches per epoch and total optimizer updates, as training will run them.

    Accumulation windows run across epoch boundaries (micro-batches form one stream), so an
    epoch whose length is not a multiple of the accumulation never makes a short update.
    """
    train = config.train
    per_epoch = batches_per_epoch(groups, train.batch_size * num_processes)
    examples = sum(len(g) for g in groups)
    if per_epoch == 0:
        raise ConfigError(
            [
                f"train.batch_size: {examples} examples cannot fill one batch of "
                f"{train.batch_size} × {num_processes} process(es); lower the batch size"
            ]
        )
    total = train.max_steps or (train.epochs * per_epoch) // train.gradient_accumulation_steps
    if total < 1:
        raise ConfigError(
            [
                f"train.epochs: {train.epochs} epoch(s) of {per_epoch} micro-batches make no "
                f"update with gradient_accumulation_steps = {train.gradient_accumulation_steps}; "
                "raise train.epochs or set train.max_steps"
            ]
        )
    problems = config.lr_scheduler.check(total, base_lrs=config.base_lrs())
    if problems:
        raise ConfigError(problems, "config (with the run length derived from the dataset)")
    return Plan(per_epoch, total, train.gradient_accumulation_steps)
