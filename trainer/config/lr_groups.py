"""The optimizer's param groups, named, each with its base LR: decided by the config alone.

One group per trained component (``unet``, ``text_encoder``, ``text_encoder_2``), split two
ways, with kohya's semantics:

- **Per-block LR multipliers** (``lora.down_lr_weight``, ``mid_lr_weight``, ``up_lr_weight``,
  kohya's network args of the same names): each UNet block's adapters train at the UNet's LR
  times their block's multiplier. Blocks that share a multiplier share a group, named by it
  (``unet_x0.5``); ``unet`` holds the blocks at 1 and every adapted module outside the blocks.
  A multiplier of 0 freezes its blocks' adapters (no group). Blocks are numbered as kohya
  numbers them (``trainer/lora/blocks.py``); lists shorter than the model's blocks are filled
  with 1, as kohya fills them.
- **LoRA+** (``lora.plus_ratio``, kohya's ``loraplus_lr_ratio``): the ``B`` matrices of each
  group train at ``plus_ratio`` times that group's LR, in a sibling group ``<name>_plus``.

Since the groups follow from the config, ``sdlora lr-plot`` shows the groups training logs,
without a model. Every group's LR is its base LR times the one schedule's factor (with a
``min_lr_ratio`` floor, a fraction of each group's own base).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Blocks per side, as kohya counts them (networks/lora.py): SD 1.x/2.x IN00-IN11, MID, OUT00-
# OUT11; SDXL input_blocks 0-8, middle_block 0-2, output_blocks 0-8.
BLOCK_COUNTS = {
    "sd1": {"down": 12, "mid": 1, "up": 12},
    "sd2": {"down": 12, "mid": 1, "up": 12},
    "sdxl": {"down": 9, "mid": 3, "up": 9},
}
BLOCK_KEYS = {"down": "down_lr_weight", "mid": "mid_lr_weight", "up": "up_lr_weight"}


@dataclass(frozen=True)
class LrGroup:
    """One optimizer param group: its name, what it trains, and its base LR."""

    name: str
    component: str  # unet, text_encoder or text_encoder_2
    multiplier: float  # the block multiplier of its adapters (1 outside the UNet)
    plus: bool  # the B matrices of LoRA+
    base_lr: float


def component_lrs(config: Any) -> list[tuple[str, float]]:
    """``(component, base LR)`` of each trained component, in param-group order."""
    lora, train = config.lora, config.train
    lrs = [("unet", train.learning_rate)]
    if lora.train_text_encoder:
        lrs.append(("text_encoder", train.text_encoder_lr or train.learning_rate))
    if lora.train_text_encoder_2:
        # One text-encoder LR for both unless the second is given its own (as kohya's
        # single --text_encoder_lr value applies to both).
        te2 = train.text_encoder_2_lr or train.text_encoder_lr or train.learning_rate
        lrs.append(("text_encoder_2", te2))
    return lrs


def unet_multipliers(lora: Any) -> list[float]:
    """The UNet groups' multipliers: 1 first, then every other non-zero block multiplier in
    the order the lists give them (down, mid, up)."""
    found = [1.0]
    for key in BLOCK_KEYS.values():
        for value in getattr(lora, key):
            if value and float(value) not in found:
                found.append(float(value))
    return found


def group_name(component: str, multiplier: float, plus: bool) -> str:
    """``unet``, ``unet_x0.5``, ``unet_plus``, ``text_encoder_plus``..."""
    name = component if multiplier == 1 else f"{component}_x{multiplier:g}"
    return f"{name}_plus" if plus else name


def lr_groups(config: Any) -> list[LrGroup]:
    """Every param group of the run, in order: per component, each multiplier's group and
    then (with LoRA+) its ``_plus`` sibling."""
    ratio = config.lora.plus_ratio
    groups = []
    for component, lr in component_lrs(config):
        multipliers = unet_multipliers(config.lora) if component == "unet" else [1.0]
        for m in multipliers:
            groups.append(LrGroup(group_name(component, m, False), component, m, False, lr * m))
            if ratio:
                plus_lr = lr * m * ratio
                groups.append(LrGroup(group_name(component, m, True), component, m, True, plus_lr))
    return groups


def block_weight_problems(lora: Any, architecture: str) -> list[str]:
    """Block multiplier lists longer than the model's blocks (kohya drops the rest with a
    warning; here it is a mistake to fix). ``architecture``: sd1, sd2 or sdxl."""
    counts = BLOCK_COUNTS.get(architecture)
    if counts is None:
        return []
    p = []
    for side, key in BLOCK_KEYS.items():
        values = getattr(lora, key)
        if len(values) > counts[side]:
            p.append(
                f"lora.{key}: {len(values)} values, but a {architecture} UNet has "
                f"{counts[side]} {side} block(s) as kohya numbers them; give at most "
                f"{counts[side]} (missing ones are 1)"
            )
    return p
