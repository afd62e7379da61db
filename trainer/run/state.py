"""The one small object the phases of a run share (see ``trainer/run/loop.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import torch
from accelerate import Accelerator

from trainer.config.load import RunConfig
from trainer.data.feed import Feed
from trainer.models.load import Components
from trainer.report.tracking import Tracker
from trainer.run.ema import Ema
from trainer.run.plan import Plan
from trainer.run.validation import Validator

if TYPE_CHECKING:
    from trainer.report.image_scores import ImageScorer


@dataclass
class RunState:
    """A run between setup and finish.

    ``unet``, ``text_encoder`` and ``text_encoder_2`` are the modules as
    ``accelerator.prepare`` returned them (DDP-wrapped under several processes); a text
    encoder is None unless it is trained (``text_encoder_2`` is SDXL's second).
    ``update`` counts optimizer updates done, the clock of the LR schedule and checkpoints.
    """

    config: RunConfig
    accelerator: Accelerator
    plan: Plan
    parts: Components
    feed: Feed
    unet: torch.nn.Module
    text_encoder: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    validator: Validator | None
    weight_dtype: torch.dtype
    resumed_from: Path | None = None
    update: int = 0
    _tracker: Tracker | None = None  # behind `tracker`: set once the resumed update is known
    started_at: float = field(default_factory=time.time)  # the first start, kept on resume
    architecture: str = "sd1"  # trainer/models/architectures.py: sd1, sd2 or sdxl
    text_encoder_2: torch.nn.Module | None = None
    ema: Ema | None = None  # the EMA of the LoRA weights, when [ema] is on
    # Stop after this update as a signal would (checkpoint saved): ``sdlora train --stop-at``,
    # a sweep's shared prefix ending at a branch point.
    stop_at: int | None = None
    # Called with every update's record (the same on every process); True stops the run as a
    # signal would: ``sdlora lr-find``'s divergence test, a warm sweep worker's pruner.
    watch: Callable[[Mapping[str, Any]], bool] | None = None
    scorer: ImageScorer | None = None  # validation.scores' models (main process)

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def tracker(self) -> Tracker:
        """The progress line, metrics and trackers (from the end of setup on)."""
        if self._tracker is None:
            raise RuntimeError("the tracker starts once the resumed update is known")
        return self._tracker

    @tracker.setter
    def tracker(self, tracker: Tracker) -> None:
        self._tracker = tracker

    @property
    def trained(self) -> list[torch.nn.Module]:
        """The prepared modules that carry trainable adapters, in param-group order: the
        UNet, then each trained text encoder."""
        texts = (self.text_encoder, self.text_encoder_2)
        return [self.unet, *(m for m in texts if m is not None)]

    @property
    def encoders(self) -> list[torch.nn.Module]:
        """Every text encoder in pipeline order, the trained (prepared) one where trained."""
        # SD3's third (T5) is never trained.
        trained = (self.text_encoder, self.text_encoder_2, None)[: len(self.parts.text_encoders)]
        pairs = zip(self.parts.text_encoders, trained, strict=True)
        return [trained if trained is not None else frozen for frozen, trained in pairs]

    @property
    def encoders_trained(self) -> list[bool]:
        """Whether each of :attr:`encoders` is trained."""
        trained = (self.text_encoder, self.text_encoder_2, None)
        return [m is not None for m in trained[: len(self.parts.text_encoders)]]

    def trained_text_encoders(self) -> dict[str, torch.nn.Module]:
        """The trained text encoders by component name, unwrapped (for saving and loading)."""
        named = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {k: self.unwrapped(v) for k, v in named.items() if v is not None}

    @overload
    def unwrapped(self, module: torch.nn.Module) -> torch.nn.Module: ...

    @overload
    def unwrapped(self, module: None) -> None: ...

    def unwrapped(self, module: torch.nn.Module | None) -> torch.nn.Module | None:
        """A prepared module without its DDP wrapper (None stays None)."""
        return None if module is None else self.accelerator.unwrap_model(module)
