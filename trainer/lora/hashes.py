"""The hashes A1111, kohya's tools and sharing sites show for a LoRA, computed as they do.

- ``sshs_model_hash``: sha256 of the tensor bytes, i.e. the file after its safetensors header.
  It is what A1111's "addnet" hash of a ``.safetensors`` LoRA computes from the file, and what
  kohya stores ahead of time (``library/train_util.py``, ``precalculate_safetensors_hashes``).
- ``sshs_legacy_hash``: the first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB of
  the file *as serialised with only its* ``ss_*`` *metadata*; so it depends on that header's
  length (for a file under 1 MiB it is the hash of nothing, ``e3b0c442``).
- ``modelspec.hash_sha256``: the tensor-bytes hash with a ``0x`` prefix, as the SAI model spec
  asks ("a hash of all tensor content, excluding the header").

The tensor bytes do not depend on the header, so these are computed before writing, from the
tensors exactly as they will be saved.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

from trainer.lora.files import load_tensors, read_header

_LEGACY_OFFSET, _LEGACY_LENGTH = 0x100000, 0x10000


def tensor_bytes(serialised: bytes) -> bytes:
    """The part of a safetensors file after its header: the tensors' bytes."""
    header_length = int.from_bytes(serialised[:8], "little")
    return serialised[8 + header_length :]


def legacy_hash(serialised: bytes) -> str:
    """kohya's / sd-webui-additional-networks' legacy hash of a serialised file."""
    window = serialised[_LEGACY_OFFSET : _LEGACY_OFFSET + _LEGACY_LENGTH]
    return hashlib.sha256(window).hexdigest()[:8]


def hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``sshs_model_hash``, ``sshs_legacy_hash`` and ``modelspec.hash_sha256`` of tensors.

    The tensors are serialised with only the ``ss_*`` entries of ``metadata`` (kohya hashes
    that form, so that later user edits to other header keys leave the legacy hash valid).
    """
    from safetensors.torch import save

    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    serialised = save(dict(tensors), metadata=ss_only or None)
    model_hash = hashlib.sha256(tensor_bytes(serialised)).hexdigest()
    return {
        "sshs_model_hash": model_hash,
        "sshs_legacy_hash": legacy_hash(serialised),
        "modelspec.hash_sha256": "0x" + model_hash,
    }


def with_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``metadata`` plus the hashes of ``tensors`` (the tensors exactly as they will be saved)."""
    return {**metadata, **hashes(tensors, metadata)}


def verify(path: str | Path, metadata: Mapping[str, str]) -> dict[str, bool]:
    """Check every hash a file's header stores against the file; ``{key: matches}``.

    Args:
        path: A safetensors file.
        metadata: Its header metadata.
    """
    raw = Path(path).read_bytes()
    content = hashlib.sha256(tensor_bytes(raw)).hexdigest()
    result = {}
    if "sshs_model_hash" in metadata:
        result["sshs_model_hash"] = metadata["sshs_model_hash"] == content
    if "modelspec.hash_sha256" in metadata:
        result["modelspec.hash_sha256"] = metadata["modelspec.hash_sha256"] == "0x" + content
    if "sshs_legacy_hash" in metadata:
        expected = hashes(load_tensors(read_header(path)), metadata)["sshs_legacy_hash"]
        result["sshs_legacy_hash"] = metadata["sshs_legacy_hash"] == expected
    return result
