"""A run's final outputs: written from its last checkpoint, verified by a manifest.

The final files are derived from the final checkpoint's files alone, with no model loaded:
the LoRA (its EMA with ``ema.use_for_outputs``) in the formats ``output.format`` asks for
(``trainer/lora/outputs.py``: key names, metadata and hashes the clients read), cast to
``output.save_dtype``, with the run's facts that the
checkpoint recorded; the schedule state; and the resolved config. A normal run and a rerun
that finishes a run killed between its last checkpoint and its final weights go through this
one function, so their outputs are the same bit for bit.

``manifest.json`` is written last. It records the run's config, its length, and the size and
SHA-256 of every final file, so a rerun can tell "complete" from "half-written" without
guessing: no manifest, or a file that does not match it, means the outputs are incomplete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainer import files
from trainer.config.load import RunConfig, to_toml
from trainer.lora import metadata as meta
from trainer.lora import outputs
from trainer.lora.files import ADAPTER_METADATA_KEY, WEIGHTS_NAME, load_tensors, read_header
from trainer.run import checkpoint as ckpt
from trainer.run.ema import EMA_WEIGHTS

MANIFEST_NAME = "manifest.json"
FORMAT = 1


def write_outputs(
    checkpoint: Path, output_dir: Path, config: RunConfig, launch: dict
) -> list[Path]:
    """Write the final outputs of ``config``'s run from its last checkpoint; return the LoRA
    files written (``output.format``: the diffusers file, the kohya file, or both).

    Args:
        checkpoint: The run's final ``checkpoints/step-NNNNNN`` folder (verified).
        output_dir: Where the final files go.
        config: The run's config (``output.*`` and the metadata come from it).
        launch: Launch facts that shape the run (``{"num_processes": N}``), for the manifest.
    """
    state = ckpt.read_json(checkpoint, ckpt.TRAINER_STATE)
    source = read_header(checkpoint / weights_file(checkpoint, config))
    adapters = json.loads(source.metadata.get(ADAPTER_METADATA_KEY, "{}"))
    facts = meta.RunFacts(**state.get("run_facts", {"steps": int(state["global_step"])}))
    # The checkpoint's own save time, so outputs written again from it are the same.
    record = meta.training_record(
        config, state.get("architecture", "sd1"), facts, finished_at=state.get("saved_at")
    )
    written = outputs.write_lora_files(
        output_dir,
        load_tensors(source),
        adapters,
        record,
        config.output.format,
        outputs.output_name(config),
        outputs.save_dtype(config),
    )
    files.write_text(
        output_dir / ckpt.LR_SCHEDULER_STATE, (checkpoint / ckpt.LR_SCHEDULER_STATE).read_text()
    )
    files.write_text(output_dir / ckpt.CONFIG_NAME, to_toml(config.to_dict()))
    names = [p.name for p in written] + [ckpt.LR_SCHEDULER_STATE, ckpt.CONFIG_NAME]
    manifest = {
        "format": FORMAT,
        "global_step": int(state["global_step"]),
        "total_updates": int(state["total_updates"]),
        "config": {**config.to_dict(), "launch": dict(launch)},
        "files": ckpt.record_files(output_dir, names),
    }
    files.write_json(output_dir / MANIFEST_NAME, manifest)
    return written


def weights_file(checkpoint: Path, config: RunConfig) -> str:
    """The checkpoint file the final LoRA comes from: the EMA's with ``ema.use_for_outputs``
    (every checkpoint of such a run holds it), else the trained weights'."""
    ema = config.ema
    if ema.enabled and ema.use_for_outputs and (checkpoint / EMA_WEIGHTS).is_file():
        return EMA_WEIGHTS
    return WEIGHTS_NAME


def manifest_files(output_dir: Path) -> list[str]:
    """The final files a finished run's manifest lists (empty without a readable manifest)."""
    manifest, _ = read_manifest(output_dir)
    return sorted(manifest["files"]) if manifest else []


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
