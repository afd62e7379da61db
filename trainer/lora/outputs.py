"""The LoRA files a run leaves in ``output_dir``; ``sdlora export`` writes them the same way.

``output.format`` picks them:

- ``diffusers``: ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(folder)``;
- ``kohya``: ``<output.name>.safetensors`` for A1111/Forge, ComfyUI, SD.Next and kohya's
  scripts, with the ``ss_*`` metadata they show and the hashes sharing sites read;
- ``both`` (the default).

Both carry the ``modelspec.*`` keys and our run record (``sdlora_training``), and are written
atomically with the permissions the umask gives (``trainer/files.py``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from trainer.files import save_safetensors
from trainer.lora import files as lora_files
from trainer.lora import hashes as lora_hashes
from trainer.lora import keys as lora_keys
from trainer.lora import metadata as meta
from trainer.models import architectures
from trainer.models.dtypes import DTYPES

FORMATS = ("diffusers", "kohya", "both")
DIFFUSERS_IMPLEMENTATION = "diffusers"


def save_dtype(config: Any) -> str:
    """``output.save_dtype``, or the deprecated ``lora.save_dtype`` where a config still sets it."""
    return config.lora.save_dtype or config.output.save_dtype


def output_name(config: Any) -> str:
    """``output.name``, else the name of ``output_dir``; safe as a file name."""
    name = config.output.name or Path(config.output_dir).resolve().name
    return clean_name(name)


def clean_name(name: str) -> str:
    """A LoRA name usable as a file name on every OS (A1111 lists the LoRA by it)."""
    cleaned = re.sub(r'[\\/:*?"<>|\x00-\x1f]', "_", name).strip(" .")
    return cleaned or "lora"


def kohya_file_name(name: str, steps: int | None = None) -> str:
    """``name.safetensors``, or ``name-stepNNNNNNNN.safetensors`` for an intermediate state,
    as kohya names its per-step saves."""
    stem = name if steps is None else f"{name}-step{steps:08d}"
    if f"{stem}.safetensors" == lora_files.WEIGHTS_NAME:
        stem += "_kohya"  # diffusers would pick it as its own file
    return f"{stem}.safetensors"


def _alphas(adapter_metadata: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> dict:
    components = {lora_keys.split_peft_key(k)[0] for k in state}
    alphas = {}
    for component in components:
        # peft's LoraConfig calls it lora_alpha; its LoHa and LoKr configs call it alpha.
        alpha = adapter_metadata.get(f"{component}.lora_alpha")
        alpha = adapter_metadata.get(f"{component}.alpha") if alpha is None else alpha
        if alpha is None:
            raise ValueError(
                f"no {component}.lora_alpha in the adapter metadata; the LoRA's strength is "
                "unknown, so no kohya file can be written"
            )
        alphas[component] = float(alpha)
    return alphas


def _ranks(adapter_metadata: Mapping[str, Any]) -> dict[str, int]:
    suffix = ".r"
    return {k[: -len(suffix)]: int(v) for k, v in adapter_metadata.items() if k.endswith(suffix)}


def write_lora_files(
    folder: str | Path,
    state: Mapping[str, torch.Tensor],
    adapter_metadata: Mapping[str, Any],
    record: Mapping[str, Any],
    fmt: str,
    name: str,
    dtype: str,
    kohya_file: str | None = None,
) -> list[Path]:
    """Write the LoRA in the formats asked for; return the files written.

    Args:
        folder: Destination folder (created).
        state: Diffusers-format LoRA tensors (any text-encoder naming; made canonical here).
        adapter_metadata: diffusers' packed adapter config (``unet.r``, ``unet.lora_alpha``...).
        record: The run record (:func:`trainer.lora.metadata.training_record`).
        fmt: ``diffusers``, ``kohya`` or ``both``.
        name: The LoRA's name: kohya file name and ``ss_output_name``/``modelspec.title``.
        dtype: ``fp16``, ``bf16`` or ``fp32`` for the weights.
        kohya_file: File name of the kohya file (default ``<name>.safetensors``).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    folder = Path(folder)
    arch = architectures.get(record.get("architecture", "sd1"))
    torch_dtype = DTYPES[dtype]
    tensors = {
        k: v.to(torch_dtype).contiguous() for k, v in lora_keys.canonical_state(state).items()
    }
    record_json = json.dumps(meta.strip_paths(dict(record)), sort_keys=True)
    written = []
    if fmt in ("diffusers", "both"):
        spec = meta.modelspec_metadata(record, name, DIFFUSERS_IMPLEMENTATION)
        spec["modelspec.hash_sha256"] = lora_hashes.hashes(tensors, {})["modelspec.hash_sha256"]
        written.append(lora_files.save_state(folder, tensors, adapter_metadata, record, spec))
    if fmt in ("kohya", "both"):
        alphas = _alphas(adapter_metadata, tensors)
        kohya = lora_keys.to_kohya(tensors, arch, alphas, _ranks(adapter_metadata))
        header = {
            **meta.kohya_metadata(record, name, lora_keys.adapter_type(tensors)),
            **meta.modelspec_metadata(record, name),
            lora_files.TRAINING_METADATA_KEY: record_json,
        }
        path = folder / (kohya_file or kohya_file_name(name))
        written.append(save_safetensors(path, kohya, lora_hashes.with_hashes(kohya, header)))
    return written
