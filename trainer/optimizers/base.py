"""The optimizer contract: a typed, frozen ``[optimizer]`` table that builds a torch optimizer.

An optimizer is a frozen dataclass, as an LR schedule is. Its fields are its hyperparameters,
and so also the keys of the ``[optimizer]`` TOML table and the text of its help. It knows:

- :meth:`OptimizerSpec.create`: the torch optimizer over param groups the caller built (one
  per trained model, each with its own ``lr`` and ``weight_decay``);
- :meth:`OptimizerSpec.problems`: its own keys' checks, including "the optional package is not
  installed" (naming the pip extra), run when the table is loaded;
- :meth:`OptimizerSpec.interplay`: the rules that involve the LR schedule and the base LRs
  (schedule-free optimizers take no decaying schedule; optimizers that estimate their own step
  size want a base LR near 1.0), as errors and warnings;
- :meth:`OptimizerSpec.device_problems`: whether it can run on the training device, checked
  before any model is loaded;
- :meth:`OptimizerSpec.effective_lrs`: the step size each param group is about to take, for
  optimizers whose step is not just the LR (Prodigy's ``d · lr``).

This module imports no torch, so loading a config stays fast; ``create`` imports it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, NamedTuple

from typedtables import doc, field_problems

if TYPE_CHECKING:
    import torch

    from schedulers import Schedule

SAME: Final = "same"  # Final: `te != SAME` narrows te to a float


class BaseLR(NamedTuple):
    """One param group's base LR and the config key it comes from (for messages)."""

    key: str
    value: float


@dataclass
class Findings:
    """What the interplay rules found: errors stop the run, warnings are logged."""

    errors: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class OptimizerSpec:
    """Base of every optimizer table: the weight decay of each param group, and the contract.

    Subclasses are ``@dataclass(frozen=True)``, give every field a one-line doc with
    :func:`typedtables.doc`, and implement :meth:`create`.
    """

    # The registered name; until registration it is "module:QualName", which the registry also
    # accepts, so any importable optimizer can be saved in a config and rebuilt.
    name: ClassVar[str] = ""
    # The optional package it needs (its import name) and the sdlora extra that installs it.
    package: ClassVar[str] = ""
    extra: ClassVar[str] = ""
    # Averages its own iterates: needs a constant LR, and eval mode for evaluation and saving.
    schedule_free: ClassVar[bool] = False
    # Estimates its own step size; the base LR multiplies that estimate, so it wants 1.0.
    adapts_step_size: ClassVar[bool] = False

    weight_decay: float = doc("Weight decay of the UNet adapters", 0.0)
    text_encoder_weight_decay: float | Literal["same"] = doc(
        'Weight decay of the text-encoder adapters; "same" uses weight_decay', SAME
    )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = f"{cls.__module__}:{cls.__qualname__}"

    # ------------------------------------------------------------------ building

    def create(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The torch optimizer over ``groups``.

        Args:
            groups: One dict per param group with ``params``, ``lr`` and ``weight_decay``
                (the loop sets ``lr`` again before every update).

        Returns:
            The optimizer, ready for its first step (schedule-free ones in train mode).
        """
        raise NotImplementedError(f"{type(self).__qualname__} does not implement create()")

    def weight_decays(self, count: int) -> list[float]:
        """The weight decay of each of ``count`` param groups: the UNet's, then every text
        encoder's (SDXL has two)."""
        te = self.text_encoder_weight_decay
        te = self.weight_decay if te == SAME else float(te)
        return [self.weight_decay] + [te] * (count - 1)

    # ------------------------------------------------------------------ checks

    def problems(self, where: str = "optimizer") -> list[str]:
        """Every problem with the field values, and a missing optional package.

        Range checks only run once every field has the right type.
        """
        found = field_problems(self, where)
        return (found or self.range_problems(where)) + self.package_problems(where)

    def range_problems(self, where: str) -> list[str]:
        """Problems with well-typed field values; subclasses extend it (call ``super()``)."""
        p = []
        if self.weight_decay < 0:
            p.append(f"{where}.weight_decay: {self.weight_decay} must be >= 0")
        te = self.text_encoder_weight_decay
        if te != SAME and te < 0:
            p.append(f'{where}.text_encoder_weight_decay: {te} must be >= 0 (or "same")')
        return p

    def package_problems(self, where: str) -> list[str]:
        """The optional package is not installed: say which extra installs it."""
        if not self.package or importlib.util.find_spec(self.package) is not None:
            return []
        extra = self.extra or self.package
        return [
            f"{where}.name: {self.name!r} needs the {self.package} package, which is not "
            f"installed; install it with: pip install 'sdlora[{extra}]'"
        ]

    def interplay(
        self, lr_scheduler: Schedule, base_lrs: Sequence[BaseLR], where: str = "optimizer"
    ) -> Findings:
        """The rules between this optimizer, the LR schedule and the base LRs.

        Args:
            lr_scheduler: The run's LR schedule.
            base_lrs: Each param group's base LR with the key it comes from.
            where: The optimizer table's TOML path.

        Returns:
            Errors (the run must not start) and warnings (it may, but probably should not).
        """
        found = Findings()
        if self.schedule_free and not is_constant(lr_scheduler):
            found.errors.append(
                f"{where}.name: {self.name!r} is schedule-free: it averages its iterates itself "
                "and needs a constant LR, so lr_scheduler.name = "
                f"{lr_scheduler.name!r} would decay it twice; use lr_scheduler.name = "
                '"constant" or "constant_with_warmup" (warmup is allowed)'
            )
        if self.adapts_step_size:
            found.warnings += [
                f"{lr.key} = {lr.value!r} with {where}.name = {self.name!r}: this optimizer "
                "estimates the step size itself and the LR multiplies that estimate, so the "
                f"steps would be {_times(lr.value)} what it estimates; use 1.0 (and "
                "tune with the optimizer's own coefficient, e.g. d_coef)"
                for lr in base_lrs
                if not 0.1 <= lr.value <= 10.0
            ]
        return found

    def device_problems(self, device: torch.device, where: str = "optimizer") -> list[str]:
        """Why this optimizer cannot run on ``device`` (empty: it can)."""
        return []

    # ------------------------------------------------------------------ running

    def effective_lrs(self, optimizer: torch.optim.Optimizer) -> list[float] | None:
        """The step size each param group is about to take, read just before ``step()``.

        None (the default) means the step size is the LR itself, so nothing extra is logged.
        """
        return None

    def params(self) -> dict[str, Any]:
        """The field values as JSON-able data (tuples become lists), in field order."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }


def beta_problems(spec: OptimizerSpec, where: str, keys: tuple[str, ...]) -> list[str]:
    """Every beta in [0, 1) and every eps > 0: the checks Adam-like tables share."""
    p = [
        f"{where}.{key}: {getattr(spec, key)} must be in [0, 1)"
        for key in keys
        if not 0 <= getattr(spec, key) < 1
    ]
    eps = getattr(spec, "eps", None)
    if eps is not None and eps <= 0:
        p.append(f"{where}.eps: {eps} must be > 0")
    return p


def is_constant(lr_scheduler: Schedule) -> bool:
    """True for ``constant`` and ``constant_with_warmup``: the base LR after any warmup."""
    from schedulers.constant import Constant

    return (
        isinstance(lr_scheduler, Constant)
        and type(lr_scheduler).after_warmup is Constant.after_warmup
    )


def _times(lr: float) -> str:
    factor = 1.0 / lr if lr < 1 else lr
    return f"{factor:,.0f}× {'smaller than' if lr < 1 else 'larger than'}"
