"""The diffusers LoRA file: its name and header keys, writing it, and reading any safetensors
file's header safely, with an error that says what is wrong.

Writing needs no peft (the tensors are already collected), so everything that only writes or
reads files (final outputs, export, preflight) works without importing the training libraries.

A LoRA file from anywhere may be truncated (an interrupted download), not safetensors at all
(a pickle renamed, an HTML error page), or a model of another kind. This module reads the
header without loading tensors, checks that it describes the file that is actually on disk,
and turns every such problem into a :class:`LoraFileError` naming the file and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.files import save_safetensors
from trainer.lora import keys as lora_keys
from trainer.lora.metadata import strip_paths

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# The header key diffusers reads the adapter config from (diffusers.loaders.lora_base).
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
TRAINING_METADATA_KEY = "sdlora_training"

# safetensors refuses headers above 100 MB; so do we, before reading one into memory.
MAX_HEADER_BYTES = 100 * 1024 * 1024


class LoraFileError(UserError, ValueError):
    """A file cannot be read as a LoRA; the message names the file and what to do."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Header:
    """A safetensors header: its metadata, its tensors and the file's size."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    size: int


def read_header(path: str | Path) -> Header:
    """Read and check the header of a safetensors file.

    Raises:
        LoraFileError: the file is missing, not safetensors, or shorter than its header says.
    """
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path}: no such file")
    size = path.stat().st_size
    not_safetensors = (
        f"{path}: not a safetensors file; LoRAs are .safetensors files (a .ckpt/.pt pickle "
        "is not read, since loading one can run code)"
    )
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise LoraFileError(f"{path}: {size} bytes, too short to be a safetensors file")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES:
            raise LoraFileError(not_safetensors)
        raw = f.read(length)
    if len(raw) < length:
        raise LoraFileError(
            f"{path}: truncated inside its header ({size} bytes on disk); the file was cut "
            "short, e.g. by an interrupted download or copy; get it again"
        )
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoraFileError(not_safetensors) from None
    if not isinstance(data, dict):
        raise LoraFileError(not_safetensors)
    metadata = data.pop("__metadata__", None) or {}
    tensors, end = {}, 0
    try:
        for name, info in data.items():
            tensors[name] = TensorInfo(str(info["dtype"]), tuple(int(d) for d in info["shape"]))
            end = max(end, int(info["data_offsets"][1]))
    except (KeyError, TypeError, ValueError, IndexError):
        raise LoraFileError(not_safetensors) from None
    available = size - 8 - length
    if end > available:
        raise LoraFileError(
            f"{path}: truncated: its header describes {end} bytes of tensors but only "
            f"{available} follow; the file was cut short, e.g. by an interrupted download or "
            "copy; get it again"
        )
    return Header(path, {str(k): str(v) for k, v in metadata.items()}, tensors, size)


def load_tensors(header: Header, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load the named tensors (all by default) of a file whose header was checked."""
    from safetensors import safe_open

    with safe_open(str(header.path), framework="pt") as f:
        return {n: f.get_tensor(n) for n in (names if names is not None else f.keys())}


def save_state(
    folder: str | Path,
    tensors: Mapping[str, torch.Tensor],
    adapter_metadata: Mapping[str, object],
    training_metadata: Mapping[str, object] | None = None,
    extra_metadata: Mapping[str, str] | None = None,
    name: str = WEIGHTS_NAME,
) -> Path:
    """Write collected LoRA tensors as ``folder/pytorch_lora_weights.safetensors`` (or
    ``folder/name``).

    Args:
        folder: Destination folder (created).
        tensors: Diffusers-format tensors (``unet.…lora_A.weight``), in the dtype to store.
        adapter_metadata: diffusers' packed adapter config (``unet.r``, ``unet.lora_alpha``,
            ...), which ``load_lora_weights`` reads to restore the scale.
        training_metadata: JSON-able facts about the run (absolute paths are reduced).
        extra_metadata: More header entries (string values).
    """
    header = {
        **dict(extra_metadata or {}),
        "format": "pt",
        # peft records base_model_name_or_path, the local model folder: reduced like the rest.
        ADAPTER_METADATA_KEY: json.dumps(
            strip_paths(dict(adapter_metadata)), sort_keys=True, default=str
        ),
        TRAINING_METADATA_KEY: json.dumps(
            strip_paths(dict(training_metadata or {})), sort_keys=True
        ),
    }
    tensors = lora_keys.canonical_state(tensors)
    return save_safetensors(Path(folder) / name, tensors, header)
