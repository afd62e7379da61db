"""Schedule-free optimizers: eval-mode weights for evaluating and saving, exact train weights.

A schedule-free optimizer trains the parameters at ``y`` but means ``x`` to be evaluated and
kept; ``optimizer.eval()`` moves the parameters to ``x`` and ``optimizer.train()`` back to
``y``. schedulefree computes each move from the other point and ``z``
(``x = lerp(y, z, 1 - 1/beta1)``, ``y = lerp(x, z, 1 - beta1)``), so an eval/train round trip
changes ``y`` by float rounding. Were that left in, how often a run validated or saved would
change its trajectory, and a resumed run would differ from an uninterrupted one.

So :func:`eval_mode` holds a copy of ``y``, switches to eval mode, and on exit switches back and
restores ``y`` bit for bit. A checkpoint saved inside it stores the eval-mode weights (the LoRA
file, which the final outputs are made from) and, beside the optimizer state, the held ``y``
(:func:`checkpoint_state`); :func:`load_checkpoint_state` puts ``y`` back, so a resumed run
continues exactly where the uninterrupted one did.

Any optimizer with ``train()``/``eval()`` methods and a ``train_mode`` flag in its param groups
(schedulefree's convention) is treated as schedule-free; for every other optimizer these
functions change nothing.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from typing_extensions import TypeIs  # typing.TypeIs is Python 3.13+

# Where the train-mode weights go in a checkpoint's optimizer state.
TRAIN_WEIGHTS = "sdlora_train_weights"

# The train-mode weights of each optimizer while it is held in eval mode by eval_mode().
_held: weakref.WeakKeyDictionary[torch.optim.Optimizer, list[torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer itself, without accelerate's ``AcceleratedOptimizer`` wrapper."""
    inner = getattr(optimizer, "optimizer", None)
    return unwrap(inner) if isinstance(inner, torch.optim.Optimizer) else optimizer


class _ScheduleFree(Protocol):
    """What schedulefree's optimizers add to ``torch.optim.Optimizer``."""

    def train(self) -> object: ...

    def eval(self) -> object: ...


def is_schedule_free(optimizer: Any) -> bool:
    """True for an optimizer that has separate train and eval weights (see the module doc)."""
    return _schedule_free(unwrap(optimizer))


def _schedule_free(opt: Any) -> TypeIs[_ScheduleFree]:
    """:func:`is_schedule_free` of an unwrapped optimizer, telling the type checker so."""
    return (
        callable(getattr(opt, "eval", None))
        and callable(getattr(opt, "train", None))
        and bool(opt.param_groups)
        and all("train_mode" in group for group in opt.param_groups)
    )


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


@contextlib.contextmanager
def eval_mode(optimizer: Any) -> Iterator[None]:
    """Inside the block the parameters are the weights the optimizer means to be evaluated.

    For a schedule-free optimizer in train mode: eval mode inside, then train mode with the
    train-mode weights restored bit for bit. For any other optimizer, or one already in eval
    mode: nothing changes.
    """
    opt = unwrap(optimizer)
    if not _schedule_free(opt) or not opt.param_groups[0]["train_mode"]:
        yield
        return
    held = [p.detach().clone() for p in _params(opt)]
    _held[opt] = held
    opt.eval()
    try:
        yield
    finally:
        del _held[opt]
        opt.train()
        with torch.no_grad():
            for p, y in zip(_params(opt), held, strict=True):
                p.copy_(y)


def to_eval(optimizer: Any) -> None:
    """Leave a schedule-free optimizer's parameters at its eval weights (at the end of a run,
    so the models a run returns are the ones it saved)."""
    opt = unwrap(optimizer)
    if _schedule_free(opt) and opt.param_groups[0]["train_mode"]:
        opt.eval()


def checkpoint_state(optimizer: Any) -> dict[str, Any]:
    """The optimizer's ``state_dict()``, plus the train-mode weights when it is held in eval
    mode by :func:`eval_mode`; tensors and plain data only (a ``weights_only`` load reads it)."""
    opt = unwrap(optimizer)
    state = opt.state_dict()
    held = _held.get(opt)
    return state if held is None else {**state, TRAIN_WEIGHTS: held}


def load_checkpoint_state(optimizer: Any, state: dict[str, Any]) -> None:
    """Restore what :func:`checkpoint_state` saved, after the model weights were loaded.

    A schedule-free optimizer saved in eval mode goes back to train mode with its saved
    train-mode weights, exactly (without them, from schedulefree's own ``train()``).
    """
    state = dict(state)
    held = state.pop(TRAIN_WEIGHTS, None)
    optimizer.load_state_dict(state)
    opt = unwrap(optimizer)
    if not _schedule_free(opt) or opt.param_groups[0]["train_mode"]:
        return
    opt.train()
    if held is None:
        return
    params = _params(opt)
    if len(held) != len(params) or any(
        p.shape != y.shape for p, y in zip(params, held, strict=True)
    ):
        raise ValueError(
            f"the checkpoint's {len(held)} train-mode weights do not match the optimizer's "
            f"{len(params)} parameters"
        )
    with torch.no_grad():
        for p, y in zip(params, held, strict=True):
            p.copy_(y)
