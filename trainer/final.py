"""A run's final outputs: written from its last checkpoint, verified by a manifest.

The final files are derived from the final checkpoint's files alone, with no model loaded:
the LoRA weights cast to ``lora.save_dtype`` with the training facts in their header, the
schedule state, and the resolved config. A normal run and a rerun that finishes a run killed
between its last checkpoint and its final weights go through this one function, so their
outputs are the same bit for bit.

``manifest.json`` is written last. It records the run's config, its length, and the size and
SHA-256 of every final file, so a rerun can tell "complete" from "half-written" without
guessing: no manifest, or a file that does not match it, means the outputs are incomplete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file

from trainer import checkpoint as ckpt
from trainer import files
from trainer.config import RunConfig, to_toml
from trainer.dtypes import DTYPES
from trainer.lora import TRAINING_METADATA_KEY, WEIGHTS_NAME

MANIFEST_NAME = "manifest.json"
FORMAT = 1


def training_metadata(config: RunConfig, update: int, base_lrs: list[float]) -> dict[str, Any]:
    """The facts about a run stored in the final LoRA file's header."""
    return {
        "base_model": config.model.pretrained,
        "rank": config.lora.rank,
        "alpha": config.lora.alpha,
        "steps": update,
        "seed": config.train.seed,
        "resolution": config.data.resolution,
        "text_encoder_trained": config.lora.train_text_encoder,
        "lr_scheduler": {"name": config.lr_scheduler.name, **config.lr_scheduler.params()},
        "base_lrs": base_lrs,
    }


def write_outputs(checkpoint: Path, output_dir: Path, config: RunConfig, launch: dict) -> Path:
    """Write the final outputs of ``config``'s run from its last checkpoint; return the weights.

    Args:
        checkpoint: The run's final ``checkpoints/step-NNNNNN`` folder (verified).
        output_dir: Where the final files go.
        config: The run's config (``lora.save_dtype`` and the metadata come from it).
        launch: Launch facts that shape the run (``{"num_processes": N}``), for the manifest.
    """
    state = ckpt.read_json(checkpoint, ckpt.TRAINER_STATE)
    update = int(state["global_step"])
    schedule_state = ckpt.read_json(checkpoint, ckpt.LR_SCHEDULER_STATE)
    source = checkpoint / WEIGHTS_NAME
    with safe_open(str(source), framework="pt") as f:
        header = dict(f.metadata() or {})
    dtype = DTYPES[config.lora.save_dtype]
    tensors = {k: v.to(dtype).contiguous() for k, v in load_file(str(source)).items()}
    facts = training_metadata(config, update, schedule_state["base_lrs"])
    header[TRAINING_METADATA_KEY] = json.dumps(facts, sort_keys=True)
    weights = files.save_safetensors(output_dir / WEIGHTS_NAME, tensors, header)
    files.write_text(
        output_dir / ckpt.LR_SCHEDULER_STATE, (checkpoint / ckpt.LR_SCHEDULER_STATE).read_text()
    )
    files.write_text(output_dir / ckpt.CONFIG_NAME, to_toml(config.to_dict()))
    names = [WEIGHTS_NAME, ckpt.LR_SCHEDULER_STATE, ckpt.CONFIG_NAME]
    manifest = {
        "format": FORMAT,
        "global_step": update,
        "total_updates": int(state["total_updates"]),
        "config": {**config.to_dict(), "launch": dict(launch)},
        "files": ckpt.record_files(output_dir, names),
    }
    files.write_json(output_dir / MANIFEST_NAME, manifest)
    return weights


def read_manifest(output_dir: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The manifest of a finished run and the problems of its files (empty: all verified).

    Returns ``(None, [])`` when the run never finished (no manifest).
    """
    path = output_dir / MANIFEST_NAME
    if not path.is_file():
        return None, []
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, [f"{path}: not valid JSON ({err})"]
    if not isinstance(manifest, Mapping) or not isinstance(manifest.get("files"), Mapping):
        return None, [f"{path}: not a manifest of this trainer"]
    return dict(manifest), ckpt.check_records(output_dir, dict(manifest["files"]))
