"""Any schedule as a standard ``torch.optim.lr_scheduler.LRScheduler``, for anyone's loop.

Usage, as with any PyTorch LR scheduler::

    lr_scheduler = ScheduleLR(optimizer, schedulers.get("cosine")(warmup_steps=100), 1000)
    for batch in data:
        loss(batch).backward()
        optimizer.step()
        lr_scheduler.step()      # once per optimizer update, never per micro-batch
        optimizer.zero_grad()

``last_epoch`` is the index of the update whose LR is in the optimizer: 0 after construction,
``k`` after ``k`` calls to ``step()``. Every LR is computed from the schedule's closed form,
so ``step(epoch)`` may jump anywhere and a resumed run gets bit-identical LRs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler

from schedulers.base import Schedule
from schedulers.errors import SOURCE
from schedulers.state import schedule_from_state, schedule_state
from typedtables import ConfigError


class ScheduleLR(LRScheduler):
    """A :class:`Schedule` driving an optimizer's param-group LRs.

    Args:
        optimizer: The optimizer; each param group's ``lr`` (or ``initial_lr`` when
            resuming with ``last_epoch >= 0``) is its base LR.
        schedule: The schedule.
        total_steps: Optimizer updates in the run.
        last_epoch: As in PyTorch: -1 starts a run; ``k`` resumes after update ``k``.

    Raises:
        ConfigError: The schedule is invalid or does not fit ``total_steps``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        total_steps: int,
        last_epoch: int = -1,
    ) -> None:
        problems = schedule.check(total_steps)
        if problems:
            raise ConfigError(problems, SOURCE)
        self.schedule = schedule
        self.total_steps = total_steps
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float | Tensor]:
        """The LRs for update ``last_epoch``, straight from the schedule."""
        # PyTorch lets a param group's LR be a 0-dim tensor; the schedule's float arithmetic
        # runs on it unchanged (its LRs are then tensors too), so it is passed through as is.
        base_lrs = cast(list[float], self.base_lrs)
        return [*self.schedule.lrs(self.last_epoch, self.total_steps, base_lrs)]

    # The schedule is a closed form, so `step(epoch)` needs nothing else.
    _get_closed_form_lr = get_lr

    def state_dict(self) -> dict[str, Any]:
        """The JSON-serialisable state (see :mod:`schedulers.state`); ``step`` is ``last_epoch``."""
        return schedule_state(
            self.schedule, self.total_steps, self.last_epoch, self.base_lrs, self.get_last_lr()
        )

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`, rebuilding the schedule by name and params.

        The optimizer's param groups get the LRs of update ``step`` at once, so a resume is
        exact even when the optimizer's own state was not restored.
        """
        schedule = schedule_from_state(state_dict)
        base_lrs: list[float | Tensor] = [float(x) for x in state_dict["base_lrs"]]
        groups = self.optimizer.param_groups
        if len(base_lrs) != len(groups):
            raise ValueError(
                f"lr_scheduler state has {len(base_lrs)} base LRs but the optimizer has "
                f"{len(groups)} param groups"
            )
        self.schedule = schedule
        self.total_steps = int(state_dict["total_steps"])
        self.base_lrs = base_lrs
        self.last_epoch = int(state_dict["step"])
        lrs = self.get_lr()
        for group, lr in zip(groups, lrs, strict=True):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = list(lrs)
