"""Which UNet block an adapted module sits in, numbered as kohya numbers them, and the param
group each trainable adapter tensor goes to (``trainer/config/lr_groups.py`` names them).

kohya's numbering (``networks/lora.py`` ``get_block_index``):

- SD 1.x/2.x, on the diffusers module path: ``down_blocks.i.(resnets|attentions).j`` is down
  block ``3i + j + 1`` and ``down_blocks.i.downsamplers`` is ``3i + 3`` (IN00, the input conv,
  never has one); ``mid_block`` is the mid block; ``up_blocks.i.(resnets|attentions).j`` is up
  block ``3i + j`` and ``up_blocks.i.upsamplers`` is ``3i + 2``.
- SDXL, on the original checkpoint's path (``trainer/lora/keys.py`` ``ldm_unet_path``):
  ``input_blocks.N`` is down block N, ``middle_block.M`` mid block M, ``output_blocks.N`` up
  block N.

Anything else (the input and output convs, the time embedding) is in no block: multiplier 1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from trainer.config.lr_groups import BLOCK_KEYS, LrGroup
from trainer.lora.keys import ldm_unet_path
from trainer.optimizers.build import ParamGroup

_SD_BLOCK = re.compile(
    r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)"
)
_SDXL_BLOCK = re.compile(r"(input_blocks|middle_block|output_blocks)\.(\d+)")
_SDXL_SIDE = {"input_blocks": "down", "middle_block": "mid", "output_blocks": "up"}
# peft's name of LoRA's (and DoRA's) B matrix, the one LoRA+ speeds up.
LORA_B = ".lora_B."


def unet_block(path: str, sdxl: bool) -> tuple[str, int] | None:
    """``("down" | "mid" | "up", index)`` of a UNet module path, or None outside the blocks."""
    if sdxl:
        mapped = ldm_unet_path(path)
        m = _SDXL_BLOCK.match(mapped or "")
        return (_SDXL_SIDE[m.group(1)], int(m.group(2))) if m else None
    if path.startswith("mid_block."):
        return ("mid", 0)
    m = _SD_BLOCK.match(path)
    if not m:
        return None
    side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
    if kind in ("downsamplers", "upsamplers"):
        j = 2
    return (side, 3 * i + j + 1) if side == "down" else (side, 3 * i + j)


def block_multiplier(path: str, lora: Any, sdxl: bool) -> float:
    """The LR multiplier of the UNet module at ``path`` (1 outside the listed blocks)."""
    block = unet_block(path, sdxl)
    if block is None:
        return 1.0
    side, index = block
    values: Sequence[float] = getattr(lora, BLOCK_KEYS[side])
    return float(values[index]) if index < len(values) else 1.0


def param_groups(
    groups: Sequence[LrGroup], lora: Any, models: Mapping[str, torch.nn.Module], sdxl: bool
) -> list[ParamGroup]:
    """The trainable adapter tensors of ``models`` (by component) in ``groups``; adapters of
    blocks at multiplier 0 are frozen (``requires_grad`` off) and in no group.

    Every group is returned, also one that gets no tensor (a multiplier of blocks this model
    does not adapt): it is what ``lr-plot`` shows, and an empty group trains nothing.
    """
    index = {(g.component, g.multiplier, g.plus): i for i, g in enumerate(groups)}
    params: list[list[torch.nn.Parameter]] = [[] for _ in groups]
    for component, model in models.items():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            multiplier = block_multiplier(name, lora, sdxl) if component == "unet" else 1.0
            if multiplier == 0:
                param.requires_grad_(False)  # kohya creates no adapter there; it stays a no-op
                continue
            plus = bool(lora.plus_ratio) and LORA_B in name
            params[index[(component, multiplier, plus)]].append(param)
    components = list(dict.fromkeys(g.component for g in groups))
    return [
        ParamGroup(g.name, p, g.base_lr, components.index(g.component))
        for g, p in zip(groups, params, strict=True)
    ]
