"""Export a trained LoRA to the kohya key format read by A1111, ComfyUI, SD.Next and kohya.

The key renaming is diffusers' ``convert_state_dict_to_kohya``. Its ``.alpha`` entries,
though, are set to the rank, which is only right when ``lora.alpha == lora.rank``; a LoRA
trained with another alpha would load at the wrong strength. Here every ``.alpha`` is the
alpha the adapter was trained with, read from the file's own adapter metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_kohya
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainer.lora import ADAPTER_METADATA_KEY, DTYPES, TRAINING_METADATA_KEY, WEIGHTS_NAME

KOHYA_NAME = "pytorch_lora_weights_kohya.safetensors"
_PREFIXES = {"unet.": "lora_unet_", "text_encoder.": "lora_te1_"}


def _weights_file(source: Path) -> Path:
    path = source / WEIGHTS_NAME if source.is_dir() else source
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no LoRA weights; pass an output_dir or its {WEIGHTS_NAME}"
        )
    return path


def to_kohya(source: str | Path, out: str | Path | None = None, dtype: str = "fp16") -> Path:
    """Write the kohya-format file for a LoRA saved by this trainer; return its path.

    Args:
        source: An ``output_dir`` or checkpoint folder, or its LoRA weights file.
        out: Destination file; default ``pytorch_lora_weights_kohya.safetensors`` beside it.
        dtype: ``fp16``, ``bf16`` or ``fp32`` for the weights.
    """
    path = _weights_file(Path(source))
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    adapters = json.loads(header.get(ADAPTER_METADATA_KEY, "{}"))
    state = load_file(str(path))
    converted = convert_state_dict_to_kohya(state)
    for key in converted:
        if key.endswith(".alpha"):
            part = next((p for p, k in _PREFIXES.items() if key.startswith(k)), None)
            alpha = adapters.get(f"{part}lora_alpha") if part else None
            if alpha is None:
                raise ValueError(f"{path}: no lora_alpha in its header for {key}")
            converted[key] = torch.tensor(float(alpha))
    tensors = {
        k: v.to(torch.float32 if k.endswith(".alpha") else DTYPES[dtype]).contiguous()
        for k, v in converted.items()
    }
    training = json.loads(header.get(TRAINING_METADATA_KEY, "{}"))
    metadata = {
        TRAINING_METADATA_KEY: header.get(TRAINING_METADATA_KEY, "{}"),
        # The ss_* keys are what kohya-trained files carry and UIs display.
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(adapters.get("unet.r", "")),
        "ss_network_alpha": str(adapters.get("unet.lora_alpha", "")),
        "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": str(training.get("base_model", "")),
        "ss_steps": str(training.get("steps", "")),
    }
    target = Path(out) if out else path.with_name(KOHYA_NAME)
    save_file(tensors, str(target), metadata=metadata)
    return target
