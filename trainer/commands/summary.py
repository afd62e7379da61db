"""The end summary ``sdlora train`` prints: how the run went, where its files are, what next.

The losses come from ``metrics.jsonl`` (so a resumed run reports its whole history), the
throughput and the time split from this session's clock (``progress.SessionStats``), whose
training time leaves out start-up, caching, validation, sampling and checkpoint saves.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config.load import RunConfig
from trainer.lora.files import WEIGHTS_NAME
from trainer.report import progress
from trainer.report.grids import PROGRESSION_NAME
from trainer.report.samples import SAMPLES_DIR
from trainer.report.tracking import LOGS_DIR, METRICS_NAME, read_metrics
from trainer.run import final
from trainer.run.checkpoint import step_folders
from trainer.step_folders import numbered_folders

_INDENT = "  "


@dataclass(frozen=True)
class Commands:
    """The shell commands the summary suggests."""

    export: str
    sample: str
    train_longer: str


def losses(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Final train loss (last and smoothed), and the best and final val loss with updates."""
    out: dict[str, Any] = {}
    if records:
        out["last"] = records[-1]["loss"]
        out["smoothed"] = progress.smoothed(r["loss"] for r in records)[-1]
    scored = [r for r in records if "val_loss" in r]
    if scored:
        best = min(scored, key=lambda r: r["val_loss"])
        out["best_val"], out["best_val_step"] = best["val_loss"], best["step"]
        out["final_val"], out["final_val_step"] = scored[-1]["val_loss"], scored[-1]["step"]
    return out


def commands(config: RunConfig, train_longer: str) -> Commands:
    """The export and sample commands for ``config``'s output; ``train_longer`` as given."""
    root = Path(config.output_dir)
    checkpoints = step_folders(root)
    source = str(checkpoints[-1]) if checkpoints else str(root)
    files = [n for n in final.manifest_files(root) if n.endswith(".safetensors")]
    lora_file = root / (WEIGHTS_NAME if WEIGHTS_NAME in files else (files or [WEIGHTS_NAME])[0])
    prompt = config.validation.prompts[0] if config.validation.prompts else "a photo"
    sample = [
        "sdlora", "sample", "--lora", str(lora_file), "--model", config.model.pretrained,
        "--prompt", prompt, "--scales", "0,0.5,1", "--out", str(root / "lora_scales.png"),
    ]  # fmt: skip
    return Commands(
        export=f"sdlora export {shlex.quote(source)}",
        sample=" ".join(shlex.quote(a) for a in sample),
        train_longer=train_longer,
    )


def outputs(config: RunConfig) -> list[tuple[str, str]]:
    """``(path, what it is)`` for every output of the run that exists."""
    root = Path(config.output_dir)
    logs = root / LOGS_DIR / config.logging.project
    found = [
        (root / WEIGHTS_NAME, "the LoRA (diffusers format)"),
        *[
            (root / name, "the LoRA (kohya format: ComfyUI, A1111/Forge, SD.Next)")
            for name in final.manifest_files(root)
            if name.endswith(".safetensors") and name != WEIGHTS_NAME
        ],
        (root / "lr_scheduler.json", "LR schedule state"),
        (root / "config.toml", "resolved config (--config accepts it)"),
        (root / "manifest.json", "sizes and SHA-256 of the final files"),
        (root / METRICS_NAME, "loss, LR, val loss, time of every update"),
        (logs, f"tensorboard: tensorboard --logdir {shlex.quote(str(root / LOGS_DIR))}"),
        (root / LOGS_DIR / "wandb", "wandb's local files (offline: wandb sync <the run folder>)"),
        (root / SAMPLES_DIR / PROGRESSION_NAME, "samples: rows = prompts, columns = updates"),
        (root / "skipped_images.txt", "images left out, and why"),
    ]
    rows = [(str(path), what) for path, what in found if path.exists()]
    samples = numbered_folders(root / SAMPLES_DIR)
    if samples:
        rows.append((str(root / SAMPLES_DIR / "step-*"), f"{len(samples)} validation points"))
    checkpoints = step_folders(root)
    if checkpoints:
        rows.append((str(checkpoints[-1]), f"last of {len(checkpoints)} checkpoint(s)"))
    return rows


def render(
    config: RunConfig,
    updates: int,
    stats: progress.SessionStats | None,
    duration_s: float,
    train_longer: str,
) -> str:
    """The summary of a run that just finished.

    Args:
        config: The run's config.
        updates: Optimizer updates the run has done in all.
        stats: This session's numbers (None: nothing trained in this process).
        duration_s: Wall time of this ``sdlora train`` command.
        train_longer: The command that resumes with more updates.
    """
    fmt, dur = progress.format_loss, progress.format_duration
    records = read_metrics(config.output_dir)
    session = f" ({stats.updates} in this session)" if stats and stats.updates != updates else ""
    lines = [f"done: {updates} updates{session} in {dur(duration_s)}"]
    if stats and stats.updates:
        validation = stats.paused_s.get("validation", 0.0)
        saving = stats.paused_s.get("checkpoint", 0.0)
        other = max(0.0, duration_s - stats.training_s - validation - saving)
        lines += [
            f"{_INDENT}throughput   {stats.updates_per_s:.2f} updates/s, "
            f"{stats.images_per_s:.1f} images/s (training time only)",
            f"{_INDENT}time         {dur(stats.training_s)} training, {dur(validation)} "
            f"validation and sampling, {dur(saving)} checkpoints,",
            f"{_INDENT}             {dur(other)} start-up, caching and final files",
        ]
    if records and "elapsed" in records[-1] and session:
        lines.append(f"{_INDENT}run time     {dur(records[-1]['elapsed'])} over all sessions")
    loss = losses(records)
    if "last" in loss:
        lines.append(
            f"{_INDENT}train loss   {fmt(loss['smoothed'])} smoothed "
            f"(EMA, factor {progress.LOSS_EMA_BETA}), {fmt(loss['last'])} last update"
        )
    if "best_val" in loss:
        lines.append(
            f"{_INDENT}val loss     {fmt(loss['best_val'])} best (update "
            f"{loss['best_val_step']}), {fmt(loss['final_val'])} final "
            f"(update {loss['final_val_step']})"
        )
    lines.append(f"outputs in {config.output_dir}:")
    rows = outputs(config)
    width = max(len(path) for path, _ in rows) if rows else 0
    lines += [f"{_INDENT}{path:<{width}}  {what}" for path, what in rows]
    cmd = commands(config, train_longer)
    lines += [
        "next:",
        f"{_INDENT}# the base model beside the LoRA at strengths 0, 0.5 and 1, same seed:",
        f"{_INDENT}{cmd.sample}",
        f"{_INDENT}# a checkpoint in the client formats (diffusers and kohya):",
        f"{_INDENT}{cmd.export}",
        f"{_INDENT}# train longer from the last checkpoint:",
        f"{_INDENT}{cmd.train_longer}",
    ]
    return "\n".join(lines)
