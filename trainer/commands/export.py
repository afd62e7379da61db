"""``sdlora export``: write any saved LoRA (final output or checkpoint) in the client formats.

The source is a folder this trainer wrote (``output_dir`` or ``checkpoints/step-NNNNNN``) or
its ``pytorch_lora_weights.safetensors``. The files are written by the same writer as the end
of a run (``trainer/lora/outputs.py``), so an exported checkpoint gets the same key names, metadata
and hashes as a final LoRA. Older files, whose text-encoder keys lack ``text_model.`` (trained
under transformers 5 before keys were made canonical), are renamed on the way.

The run record comes from the file's header when it has one (final outputs); a checkpoint's
is rebuilt from the ``config.toml`` and ``trainer_state.json`` beside it, and facts nobody
recorded there (image count, tags, optimizer) are left out of the metadata rather than guessed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer import files
from trainer.config import adapter_formats
from trainer.errors import UserError
from trainer.lora import formats as lora_formats
from trainer.lora import keys as lora_keys
from trainer.lora import metadata as meta
from trainer.lora import outputs
from trainer.lora.files import (
    ADAPTER_METADATA_KEY,
    TRAINING_METADATA_KEY,
    WEIGHTS_NAME,
    Header,
    LoraFileError,
    load_tensors,
    read_header,
)
from trainer.models import architectures
from trainer.run import checkpoint as ckpt

EXPORT_DIR = "export"


class ExportError(UserError, ValueError):
    """The source cannot be exported; the message names the file and the fix."""


def _weights_file(source: Path) -> Path:
    path = source / WEIGHTS_NAME if source.is_dir() else source
    if not path.is_file():
        latest = ckpt.find_latest(source) if source.is_dir() else None
        if latest is not None:
            # e.g. output.format = "kohya": the run's folder holds no diffusers file to
            # export from, but its checkpoints do.
            raise ExportError(
                f"{path}: not there (the run wrote no diffusers file); export a checkpoint, "
                f"e.g. sdlora export {latest}"
            )
        raise ExportError(
            f"{path}: no LoRA weights; pass an output_dir or checkpoint folder, or its "
            f"{WEIGHTS_NAME}"
        )
    return path


def default_out(folder: Path) -> Path:
    """Where an export goes unless ``--out`` says otherwise.

    A checkpoint's export goes to ``output_dir/export/step-NNNNNN/``, outside the checkpoint,
    so ``checkpoint.keep_last`` pruning never deletes it; any other source's to ``export/``
    inside its folder.
    """
    if folder.parent.name == ckpt.CHECKPOINTS:
        return folder.parent.parent / EXPORT_DIR / folder.name
    return folder / EXPORT_DIR


def _cross_attention_width(state: dict[str, torch.Tensor]) -> int | None:
    for key, value in state.items():
        if ".attn2.to_k." in key and key.endswith(lora_keys.PEFT_DOWN):
            return int(value.shape[1])
    return None


def _prediction_type(config: Any) -> str:
    """The config's override, else the local base model's scheduler config, else epsilon."""
    if config.model.prediction_type:
        return config.model.prediction_type
    scheduler = Path(config.model.pretrained) / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        return json.loads(scheduler.read_text()).get("prediction_type", "epsilon")
    return "epsilon"


def _rebuilt_record(folder: Path, old: dict, state: dict, finished_at: float) -> dict:
    """A run record for a file whose header has none: from the files beside it."""
    from trainer.config import load as config_module

    texts = {lora_keys.split_peft_key(k)[0] for k in state} - set(lora_keys.DENOISERS)
    trainer_state = {}
    if (folder / ckpt.TRAINER_STATE).is_file():
        trainer_state = ckpt.read_json(folder, ckpt.TRAINER_STATE)
    # A checkpoint records its family; the tensors' widths only guess it (a UNet-only SDXL
    # LoRA of another width than 2048 would read as SD 1.x).
    recorded = trainer_state.get("architecture") or old.get("architecture")
    if recorded in architectures.ARCHITECTURES:
        arch = architectures.get(recorded)
    elif any(k.startswith(lora_keys.TRANSFORMER + ".") for k in state):
        arch = architectures.get("sd3")  # only SD3's denoiser is a transformer
    else:
        arch = architectures.detect_from_width(_cross_attention_width(state), len(texts))
    steps = int(trainer_state.get("global_step", old.get("steps", 0)))
    if not (folder / ckpt.CONFIG_NAME).is_file():
        # A lone file: only what its header and tensors say.
        return meta.strip_paths(
            {**old, "architecture": arch.name, "steps": steps, "finished_at": finished_at}
        )
    config = config_module.load(folder / ckpt.CONFIG_NAME)
    if "run_facts" in trainer_state:
        # What the loop knew (image count, tags, optimizer...), as the final files use it.
        facts = meta.RunFacts(**trainer_state["run_facts"])
        finished_at = trainer_state.get("saved_at", finished_at)
    else:  # a checkpoint from before run_facts were recorded
        facts = meta.RunFacts(
            steps=steps,
            epochs=int(trainer_state["epoch"]) + 1 if "epoch" in trainer_state else 0,
            num_processes=int(trainer_state.get("num_processes", 1)),
            prediction_type=_prediction_type(config),
        )
    return meta.training_record(config, arch.name, facts, finished_at)


def _default_name(folder: Path) -> tuple[str, str | None]:
    """(LoRA name, save dtype) from the run's config beside the source, if there is one."""
    from trainer.config import load as config_module

    if (folder / ckpt.CONFIG_NAME).is_file():
        config = config_module.load(folder / ckpt.CONFIG_NAME)
        return outputs.output_name(config), outputs.save_dtype(config)
    root = folder.parent.parent if folder.parent.name == ckpt.CHECKPOINTS else folder
    return outputs.clean_name(root.resolve().name), None


def same_lora(a: Path, b: Path) -> bool:
    """Two safetensors files hold the same tensors and header metadata (safetensors writes
    the header's keys in no fixed order, so bytes cannot tell). A damaged file is nobody's
    equal: it is in the way like any other file."""
    try:
        ha, hb = read_header(a), read_header(b)
    except LoraFileError:
        return False
    if ha.metadata != hb.metadata or ha.tensors != hb.tensors:
        return False
    ta, tb = load_tensors(ha), load_tensors(hb)
    return all(torch.equal(ta[k], tb[k]) for k in ta)


def _new_folders(target: Path) -> list[Path]:
    """The folders that creating ``target`` makes, deepest first (empty: it exists)."""
    new, folder = [], target.absolute()
    while not folder.exists():
        new.append(folder)
        folder = folder.parent
    return new


def _write_guarded(
    target: Path, write: Callable[[Path], list[Path]], overwrite: bool
) -> list[Path]:
    """Write the files into a scratch folder beside their destination, then move each into
    place (:func:`trainer.files.move_into_place`). A destination file with other contents (a
    trained LoRA, another export) is replaced only with ``overwrite``; one with the same
    contents (a rerun) is left as it is. Either all files land or none does, and a failed
    export leaves no folder it created."""
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target}: a file, not a folder; pass --out with a folder")
    created = _new_folders(target)
    try:
        target.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=target))
    except OSError as err:
        _remove_empty(created)
        raise ExportError(f"{target}: cannot write there ({err.strerror}); pass --out") from None
    try:
        return _place_files(target, scratch, write, overwrite)
    except BaseException:
        _remove_empty(created)  # an interrupted export too: Ctrl-C leaves no empty --out
        raise


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this export created, deepest first, while they are empty (so
    nothing another process put there is lost); never a folder that existed before."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _place_files(
    target: Path, scratch: Path, write: Callable[[Path], list[Path]], overwrite: bool
) -> list[Path]:
    try:
        fresh = write(scratch)
        there = [f for f in fresh if (target / f.name).exists()]
        same = {f for f in there if same_lora(target / f.name, f)}
        clashes = [target / f.name for f in there if f not in same]
        if clashes and not overwrite:
            names = ", ".join(str(c) for c in clashes)
            raise ExportError(
                f"{names}: already there, with other weights or metadata; nothing was "
                "written. Pass --overwrite to replace it, or --out with another folder"
            )
        for f in fresh:
            if f not in same:
                # Same file system, so each move is atomic (and durable, as every final file).
                files.move_into_place(f, target / f.name)
        return [target / f.name for f in fresh]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _json(path: Path, header: Header, key: str) -> dict:
    try:
        value = json.loads(header.metadata.get(key, "{}"))
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ExportError(f"{path}: its header's {key} is not a JSON object; the file is damaged")
    return value


def _kohya_source(path: Path, record: dict) -> Path | None:
    """What sdlora wrote a kohya file of ours from: the diffusers file beside it (same run
    record), else the checkpoint of its step (``output_dir``, or ``export/step-NNNNNN``)."""
    beside = path.parent / WEIGHTS_NAME
    try:
        if beside.is_file() and _json(beside, read_header(beside), TRAINING_METADATA_KEY) == record:
            return beside
    except (LoraFileError, ExportError):
        pass  # a damaged diffusers file beside is no source to name
    if not isinstance(record.get("steps"), int):
        return None
    roots = [path.parent]
    if path.parent.parent.name == EXPORT_DIR:
        roots.append(path.parent.parent.parent)
    for root in roots:
        checkpoint = ckpt.step_dir(root, record["steps"])
        if (checkpoint / WEIGHTS_NAME).is_file():
            return checkpoint
    return None


def _no_adapter_record(path: Path, header: Header) -> ExportError:
    """Why a file without peft's adapter config cannot be exported, and what to export."""
    parsed = lora_formats.parse(header)
    kohya = parsed is not None and parsed.format in (
        lora_formats.FORMAT_KOHYA,
        lora_formats.FORMAT_LYCORIS,
    )
    if kohya and TRAINING_METADATA_KEY in header.metadata:
        ours = (
            f"{path}: sdlora's kohya-format file; it has no {ADAPTER_METADATA_KEY} (peft's "
            "adapter config) to write a diffusers file from, so export reads the "
            "diffusers-format file it was written from"
        )
        source = _kohya_source(path, _json(path, header, TRAINING_METADATA_KEY))
        if source is not None:
            return ExportError(f"{ours}: sdlora export {source}")
        return ExportError(
            f"{ours}, and none is beside it: export the run's {WEIGHTS_NAME} or its "
            "checkpoints/step-NNNNNN folder (the kohya file itself is ready for A1111/Forge "
            "and ComfyUI as it is)"
        )
    return ExportError(
        f"{path}: no {ADAPTER_METADATA_KEY} in its header, so rank and alpha are unknown; "
        "only LoRAs saved by sdlora can be exported (`sdlora inspect` reads any LoRA)"
    )


def _check_format(path: Path, header: Header, fmt: str) -> None:
    """Refuse a format the adapter type may not be written in, as training does
    (``trainer/config/adapter_formats.py``), before anything is written."""
    try:
        kind = lora_keys.adapter_type(header.tensors)
    except ValueError as err:
        raise ExportError(f"{path}: {err}; not a LoRA sdlora wrote") from None
    magnitudes = [
        info.shape
        for key, info in header.tensors.items()
        if key.endswith("." + lora_keys.PEFT_MAGNITUDE)
    ]
    axis = "output" if any(len(shape) < 2 for shape in magnitudes) else "input"
    refused = adapter_formats.refusal(kind, axis, fmt)
    if refused:
        fix = " or ".join(f"--format {f}" for f in refused.allowed)
        raise ExportError(
            f"{path}: --format {fmt} with {adapter_formats.label(kind, axis)}: {refused.why}; "
            f"export it with {fix}"
        )


def _read_source(path: Path, fmt: str) -> tuple[Header, dict]:
    """The checked header of an exportable file and its adapter config.

    Raises:
        LoraFileError: a missing, truncated or non-safetensors file.
        ExportError: no adapter config (naming what to export instead), or a format its
            adapter type may not be written in.
    """
    header = read_header(path)
    if ADAPTER_METADATA_KEY not in header.metadata:
        raise _no_adapter_record(path, header)
    _check_format(path, header, fmt)
    return header, _json(path, header, ADAPTER_METADATA_KEY)


def export(
    source: str | Path,
    fmt: str = "both",
    out: str | Path | None = None,
    dtype: str | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write a saved LoRA as ``fmt`` (``diffusers``, ``kohya`` or ``both``); return the files.

    Args:
        source: An ``output_dir`` or checkpoint folder, or its weights file.
        fmt: Which files to write.
        out: Destination folder (default: :func:`default_out`).
        dtype: ``fp16``, ``bf16`` or ``fp32`` (default: the run's ``output.save_dtype``, else
            fp16).
        name: The LoRA's name (default: the run's ``output.name`` or output folder's name).
        overwrite: Replace destination files that hold something else.

    Raises:
        LoraFileError: a source file that is not a whole safetensors file.
        ExportError: a missing source, a file without adapter metadata, a format its
            adapter type is not written in, an export that would overwrite its own source,
            or (without ``overwrite``) other files in the way.
    """
    path = _weights_file(Path(source))
    folder = path.parent
    header, adapters = _read_source(path, fmt)
    target = Path(out) if out else default_out(folder)
    if fmt in ("diffusers", "both") and target.resolve() == folder.resolve():
        raise ExportError(
            f"{target}: exporting the diffusers file here would overwrite the source "
            f"{path.name}; pass --out with another folder"
        )
    state = load_tensors(header)
    old = _json(path, header, TRAINING_METADATA_KEY)
    if old.get("format", 0) >= meta.RECORD_FORMAT:
        record = old
    else:
        record = _rebuilt_record(folder, old, state, path.stat().st_mtime)
    run_name, run_dtype = _default_name(folder)
    name = outputs.clean_name(name) if name else run_name
    is_checkpoint = folder.parent.name == ckpt.CHECKPOINTS
    steps = int(record.get("steps", 0)) if is_checkpoint else None

    def write(folder: Path) -> list[Path]:
        try:
            return outputs.write_lora_files(
                folder,
                state,
                adapters,
                record,
                fmt,
                name,
                dtype or run_dtype or "fp16",
                kohya_file=outputs.kohya_file_name(name, steps),
            )
        except ValueError as err:  # e.g. no alpha recorded, so no kohya file
            raise ExportError(f"{path}: {err}; export it with --format diffusers") from err

    return _write_guarded(target, write, overwrite)
