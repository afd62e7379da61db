"""The one small object the phases of a run share (see ``trainer/loop.py``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from trainer.config import RunConfig
from trainer.feed import Feed
from trainer.models import Components
from trainer.plan import Plan
from trainer.tracking import Tracker
from trainer.validation import Validator


@dataclass
class RunState:
    """A run between setup and finish.

    ``unet`` and ``text_encoder`` are the modules as ``accelerator.prepare`` returned them
    (DDP-wrapped under several processes); ``text_encoder`` is None unless it is trained.
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
    tracker: Tracker | None = None  # set once the resumed update is known
    started_at: float = field(default_factory=time.time)  # the first start, kept on resume
    architecture: str = "sd1"  # trainer/architectures.py: sd1, sd2 or sdxl

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def trained(self) -> list[torch.nn.Module]:
        """The prepared modules that carry trainable adapters."""
        return [self.unet] if self.text_encoder is None else [self.unet, self.text_encoder]

    @property
    def encoder(self) -> torch.nn.Module:
        """The text encoder that turns captions into hidden states: trained or frozen."""
        return self.text_encoder if self.text_encoder is not None else self.parts.text_encoder

    def unwrapped(self, module: torch.nn.Module | None) -> torch.nn.Module | None:
        """A prepared module without its DDP wrapper (None stays None)."""
        return None if module is None else self.accelerator.unwrap_model(module)
