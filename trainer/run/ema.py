"""An exponential moving average (EMA) of the trained LoRA weights (``[ema]``).

Every ``ema.every_n_steps`` optimizer updates, each trainable adapter tensor's average moves
towards its current value: ``ema ← d·ema + (1 − d)·w``. The decay ``d`` of the k-th average
update (k = 0, 1, ...) ramps up as diffusers' ``EMAModel`` ramps it: 0 at the first (the
average starts at the weights then), then ``min(decay, (1 + k)/(10 + k))`` (``ema.warmup =
"ratio"``, diffusers' default and OneTrainer's) or ``min(decay, 1 − (1 + k/inv_gamma)^−power)``
(``"power"``, diffusers' ``use_ema_warmup``); with ``"off"``, ``decay`` from the start,
averaging from the initial weights.

The average is kept in fp32 beside the weights, is a pure function of the weights at the
averaged updates, and is saved in every checkpoint as a LoRA file of its own
(``ema_lora_weights.safetensors``), read back on resume; so a resumed run continues it bit for
bit. With ``ema.use_for_outputs`` (the default), validation, the samples and the final LoRA
files use it (:meth:`Ema.applied` swaps it into the model for as long as they need).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

EMA_WEIGHTS = "ema_lora_weights.safetensors"


def decay_at(config: Any, k: int) -> float:
    """The decay of the k-th average update (0-based), by ``[ema]``'s settings."""
    if config.warmup == "off":
        return config.decay
    if k == 0:
        return 0.0  # diffusers' EMAModel: the first update copies the weights
    if config.warmup == "ratio":
        return min(config.decay, (1.0 + k) / (10.0 + k))
    return min(config.decay, 1.0 - (1.0 + k / config.inv_gamma) ** -config.power)


class Ema:
    """The EMA of every trainable tensor of ``models`` (by component: ``unet``,
    ``text_encoder``...), starting from their current values.

    Args:
        config: The ``[ema]`` table.
        models: The trained models, unwrapped, with their adapters attached and frozen
            blocks already frozen (only tensors that train are averaged).
    """

    def __init__(self, config: Any, models: Mapping[str, torch.nn.Module]) -> None:
        self.config = config
        self.params = {
            f"{component}.{name}": param
            for component, model in models.items()
            for name, param in model.named_parameters()
            if param.requires_grad
        }
        self.shadow = {k: p.detach().float().clone() for k, p in self.params.items()}
        self.updates = 0  # average updates done

    def after_update(self, update: int) -> None:
        """Average in the weights after optimizer update ``update`` (1-based), when due."""
        if update % self.config.every_n_steps:
            return
        weight = 1.0 - decay_at(self.config, self.updates)
        with torch.no_grad():
            for key, param in self.params.items():
                self.shadow[key].lerp_(param.detach().float(), weight)
        self.updates += 1

    def resume_at(self, update: int) -> None:
        """Set the average-update count of a run resumed after ``update`` optimizer updates."""
        self.updates = update // self.config.every_n_steps

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The average in the model's tensors meanwhile; the trained ones back after."""
        saved = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for key, param in self.params.items():
                param.copy_(self.shadow[key])
        try:
            yield
        finally:
            with torch.no_grad():
                for key, param in self.params.items():
                    param.copy_(saved[key])

    def copy_to_model(self) -> None:
        """Put the average in the model's tensors for good (a run that has finished)."""
        with torch.no_grad():
            for key, param in self.params.items():
                param.copy_(self.shadow[key])

    def take_from_model(self) -> None:
        """Read the average from the model's tensors (after a checkpoint's EMA file was loaded
        into them inside :meth:`applied`, which then puts the trained ones back)."""
        for key, param in self.params.items():
            self.shadow[key] = param.detach().float().clone()


def from_config(config: Any, models: Mapping[str, torch.nn.Module]) -> Ema | None:
    """The run's EMA, or None when ``ema.enabled`` is off."""
    return Ema(config, models) if config.enabled else None


def for_outputs(average: Ema | None) -> AbstractContextManager[None]:
    """The EMA in the model meanwhile when it is what outputs hold (``ema.use_for_outputs``);
    else nothing changes."""
    if average is None or not average.config.use_for_outputs:
        return nullcontext()
    return average.applied()
