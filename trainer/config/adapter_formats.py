"""Which file formats each adapter type may be written in: the one rule for training's
``output.format`` and for ``sdlora export --format`` (docs/adapters.md, "Files and clients").

A type is written only in the formats where a client applies it exactly: A1111/Forge and
ComfyUI read DoRA with per-input magnitudes, LoHa and LoKr from the kohya file; diffusers
reads only LoRA and peft's own DoRA (per-output magnitudes) from the diffusers file. The
diffusers-format file of the other types is still written beside the kohya file with
``both``: it is what ``sdlora sample``, ``inspect`` and ``export`` read, while the clients
load the kohya file. No torch here: the config check imports this.
"""

from __future__ import annotations

from typing import NamedTuple

KOHYA = ("kohya", "both")


class Refusal(NamedTuple):
    """Why a format is not written for an adapter type, and the formats that are."""

    why: str
    allowed: tuple[str, ...]


def label(adapter_type: str, dora_axis: str = "input") -> str:
    """The adapter as the config spells it: ``lora.type = 'dora', lora.dora_axis = 'input'``."""
    text = f"lora.type = {adapter_type!r}"
    return f"{text}, lora.dora_axis = {dora_axis!r}" if adapter_type == "dora" else text


def refusal(adapter_type: str, dora_axis: str, fmt: str) -> Refusal | None:
    """None when ``fmt`` (``diffusers``, ``kohya`` or ``both``) may be written for this
    adapter, else why not and which formats may.

    Args:
        adapter_type: ``lora``, ``dora``, ``loha`` or ``lokr``.
        dora_axis: ``input`` or ``output`` (read only for ``dora``).
        fmt: The format asked for.
    """
    if adapter_type == "dora" and dora_axis == "output":
        why = (
            "a per-output DoRA magnitude cannot be written in the kohya format: A1111/Forge "
            "apply dora_scale per input column and ComfyUI divides a per-output one by the "
            "base weight's norm, so both would load it wrong"
        )
        allowed: tuple[str, ...] = ("diffusers",)
    elif adapter_type == "dora":
        why = (
            "diffusers applies DoRA per output row and cannot load a per-input DoRA; only "
            "the kohya file (A1111/Forge, ComfyUI) applies it"
        )
        allowed = KOHYA
    elif adapter_type in ("loha", "lokr"):
        why = (
            "diffusers' load_lora_weights reads only LoRA and DoRA; the kohya file is what "
            "A1111/Forge and ComfyUI load"
        )
        allowed = KOHYA
    else:
        return None
    return None if fmt in allowed else Refusal(why, allowed)
