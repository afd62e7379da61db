"""Everything about a run that can be decided before a model is loaded, decided first.

A config error found after a multi-GB model load costs minutes, so this runs before it:
1. **What the output folder holds**, and what the command asks: a fresh run, a resume, an
   overwrite. Rerunning any command is safe:
   - a finished run whose outputs verify is "already complete" (exit 0, no model loaded);
   - a run killed between its last checkpoint and its final outputs gets them written from
     that checkpoint (again with no model);
   - trained weights are never replaced without ``--overwrite``;
   - a damaged checkpoint is named, set aside as ``step-NNNNNN.damaged``, and ``--resume
     latest`` falls back to the newest intact one.
2. **Every remaining problem at once**: the output folder is writable, the model source
   exists and is a model of the family ``model.arch`` names (SD 1.x, 2.x, SDXL: read from its
   configs or checkpoint header), ``model.vae`` exists, the LoRA targets exist in it, the
   dataset is usable, and the run length derived from it fits the schedule.

:func:`check` only reads. What it decides to change on disk (set damaged checkpoints aside,
clear an old run for ``--overwrite``, write final outputs) is applied by :func:`apply` on the
main process, so every process of a multi-process launch takes the same decision.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import sd3 as sd3_config
from trainer.config.load import ConfigError, RunConfig, build, read_toml
from trainer.config.lr_groups import block_weight_problems
from trainer.data.dataset import DataError, Example, Prepared
from trainer.lora import targets
from trainer.lora.files import WEIGHTS_NAME
from trainer.models import family as model_arch
from trainer.models import source as model_source
from trainer.report import image_scores, prometheus
from trainer.run import checkpoint as ckpt
from trainer.run import final
from trainer.run.loss import zero_snr_problems
from trainer.run.plan import Plan, plan_run
from trainer.run.resume import (
    DATA_KEY,
    PREFIX_KEYS,
    branch_marker,
    check_resumable,
    comparable_config,
    config_diff,
    data_change,
    is_allowed,
    prefix_lr_problem,
)
from trainer.run.trial import in_sweep

# What a run writes into output_dir (the disk latent cache is left alone: it is keyed by
# content, so it stays valid for any later run).
RUN_OUTPUTS = (
    ckpt.CHECKPOINTS,
    WEIGHTS_NAME,
    ckpt.LR_SCHEDULER_STATE,
    ckpt.CONFIG_NAME,
    final.MANIFEST_NAME,
    "metrics.jsonl",
    "logs",
    "samples",
    "skipped_images.txt",
)


@dataclass
class Checked:
    """The decisions taken before any model is loaded."""

    resume_from: Path | None = None
    resume_state: dict = field(default_factory=dict)  # its trainer_state.json
    # The run is finished: its outputs verified, or will once `finalize_from` is written.
    complete: bool = False
    finalize_from: Path | None = None
    updates_done: int = 0
    quarantine: list[Path] = field(default_factory=list)
    clear: bool = False  # --overwrite: remove the previous run's outputs first
    prepared: Prepared | None = None
    val_examples: list[Example] = field(default_factory=list)
    plan: Plan | None = None
    warnings: list[str] = field(default_factory=list)  # logged as warnings
    messages: list[str] = field(default_factory=list)  # logged as information
    architecture: str = "sd1"  # model.arch resolved: sd1, sd2, sdxl or sd3
    # The resumed checkpoint's lr_scheduler.json when it is a shared prefix's branch point:
    # its LRs are checked against this run's once the run length is known.
    prefix_schedule: dict | None = None


def launch() -> tuple[int, bool]:
    """This launch's process count, and whether this is its first process, from the variables
    every launcher sets (accelerate and torchrun: WORLD_SIZE, RANK); a plain ``python train.py``
    is one process. Read before the Accelerator exists, so preflight runs first."""
    return int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("RANK", "0") == "0"


def hardware_problems(config: RunConfig) -> list[str]:
    """Settings this machine cannot run, found before anything loads."""
    import torch  # already imported with the checkpoint module; named here for clarity

    if config.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        return [
            "train.mixed_precision: 'fp16' needs a CUDA GPU and none is available; "
            "use 'bf16' (runs on CPU) or 'no'"
        ]
    return []


def check(
    config: RunConfig, num_processes: int, overwrite: bool = False, show_progress: bool = True
) -> Checked:
    """Decide how this run starts, and find every problem that would stop it later.

    Args:
        config: The validated config.
        num_processes: Processes of this launch (the data order and run length depend on it).
        overwrite: ``--overwrite``: replace whatever an earlier run left in ``output_dir``.
        show_progress: Show the image check's progress bar (the main process does).

    Raises:
        ConfigError: with every problem found (data problems included), naming keys and files.
        CheckpointError: an explicitly named checkpoint is missing or damaged.
    """
    # Every problem in one report: an unusable output_dir, or a start refused there, is
    # reported with the model's and the data's problems, not alone (fix one, rerun, meet
    # the next). The checks after it then assume a fresh start.
    problems = output_dir_problems(Path(config.output_dir))
    problems += hardware_problems(config)
    checked = Checked()
    if not problems:
        try:
            checked = decide_start(config, num_processes, overwrite)
        except ConfigError as err:
            problems += err.problems
        if checked.complete:
            return checked
    if launch()[1]:  # the main process serves the metrics: is its port free?
        spread = prometheus.SWEEP_PORTS if in_sweep() else 1
        problems += prometheus.port_problems(config.logging.prometheus_port, spread)
    source = model_source.source_problems(config.model)
    problems += source
    if not source:
        found, checked.architecture = model_problems(config)
        problems += found
    problems += model_source.vae_problems(config.model)
    problems += zero_snr_problems(config)
    problems += image_scores.model_problems(config.validation)
    problems += _data_and_plan(config, num_processes, checked, show_progress)
    problems += _data_change(config, checked)
    problems += _prefix_problems(config, checked)
    if checked.plan and checked.updates_done >= checked.plan.total_updates:
        problems.append(
            f"train.max_steps: the checkpoint {checked.resume_from} already has "
            f"{checked.updates_done} updates and this run has {checked.plan.total_updates}; "
            "raise train.max_steps and pass --allow-change max_steps to train further"
        )
    if problems:
        raise ConfigError(problems)
    return checked


def model_problems(config: RunConfig) -> tuple[list[str], str]:
    """The model's family against ``model.arch``, and the LoRA targets in its modules, for a
    model source that exists (``model_source.source_problems`` found nothing).

    Returns:
        The problems, and the family training uses (``sd1``, ``sd2``, ``sdxl`` or ``sd3``).
    """
    detected = model_arch.detect(config.model)
    problems = model_arch.problems(config.model, detected)
    architecture = model_arch.resolve(config.model, detected)
    problems += sd3_config.family_problems(config, architecture)  # "auto" resolved now
    lora = config.lora
    if lora.train_text_encoder_2 and architecture not in ("sdxl", "sd3"):
        problems.append(
            "lora.train_text_encoder_2: the model has one text encoder (it is not SDXL or "
            "SD3); use lora.train_text_encoder"
        )
    problems += _folder_problems(config, architecture)
    if config.model.arch == "auto":  # an explicit arch was checked with the config
        problems += block_weight_problems(lora, architecture)
    if problems:
        return problems, architecture
    te_targets = lora.text_encoder_target_modules
    return targets.lora_target_problems(
        config.model.pretrained,
        sd3_config.lora_targets(lora, architecture),
        te_targets if lora.train_text_encoder else None,
        te_targets if lora.train_text_encoder_2 else None,
    ), architecture


def _folder_problems(config: RunConfig, architecture: str) -> list[str]:
    """The component folders a diffusers folder of the family lacks: SDXL's and SD3's second
    text encoder, and SD3's T5 unless ``model.t5 = false``."""
    folder = Path(config.model.pretrained).expanduser()
    if architecture not in ("sdxl", "sd3") or not folder.is_dir():
        return []
    names = ["text_encoder_2", "tokenizer_2"]
    if architecture == "sd3" and config.model.t5:
        names += ["text_encoder_3", "tokenizer_3"]
    missing = [f"{name}/" for name in names if not (folder / name).is_dir()]
    if not missing:
        return []
    title = "an SDXL" if architecture == "sdxl" else "an SD3"
    fix = "; or set model.t5 = false to train without T5" if "text_encoder_3/" in missing else ""
    return [
        f"model.pretrained = {config.model.pretrained!r}: {title} folder needs "
        f"{' and '.join(missing)} beside text_encoder/ and tokenizer/{fix}"
    ]


def _data_and_plan(
    config: RunConfig, num_processes: int, checked: Checked, show_progress: bool
) -> list[str]:
    from trainer.data.feed import checked_examples

    try:
        checked.prepared, checked.val_examples = checked_examples(config, show_progress)
    except DataError as err:
        return [str(err)]
    try:
        checked.plan = plan_run(config, checked.prepared.groups, num_processes)
    except ConfigError as err:
        return err.problems
    batch = config.train.batch_size * num_processes
    idle = [g for g in checked.prepared.groups if len(g) < batch]
    if idle:
        # A batch never mixes buckets, so these images would never be trained on.
        checked.warnings.append(
            f"{sum(len(g) for g in idle)} image(s) sit in {len(idle)} aspect bucket(s) holding "
            f"fewer than one batch ({batch}) and are never trained on; lower train.batch_size, "
            "or widen data.bucket_max_crop / data.bucket_step so they share a bucket"
        )
    if config.train.masked_loss and not any(e.mask for e in checked.prepared.examples):
        checked.warnings.append(
            "train.masked_loss: no image has a mask (no <stem>"
            f"{config.data.mask_suffix}.png beside it"
            + ("" if config.data.alpha_mask else ", and data.alpha_mask is off")
            + "), so every image trains unmasked"
        )
    return []


def _prefix_problems(config: RunConfig, checked: Checked) -> list[str]:
    """A shared prefix resumed under another schedule: its LRs must agree with this run's at
    every update before the branch point (``trainer/run/resume.py``)."""
    if checked.prefix_schedule is None or checked.plan is None:
        return []
    problem = prefix_lr_problem(
        checked.prefix_schedule,
        config.lr_scheduler,
        checked.plan.total_updates,
        config.base_lrs(),
        checked.updates_done,
    )
    return [f"resume from {checked.resume_from}: {problem}"] if problem else []


def _data_change(config: RunConfig, checked: Checked) -> list[str]:
    """Images added to, removed from or changed in ``data.path`` since the checkpoint: refused
    unless allowed (``--allow-change data.images``), like a config change, since the run no
    longer continues the one that was stopped."""
    if checked.resume_from is None or checked.prepared is None or checked.plan is None:
        return []
    now = ckpt.data_record(checked.prepared.examples, ckpt.subset_roots(config.data))
    change = data_change(checked.resume_state, now, checked.plan.total_updates)
    if change is None:
        return []
    if is_allowed(DATA_KEY, config.checkpoint.allow_change):
        checked.warnings.append(f"resume: {change} (allowed)")
        return []
    return [
        f"{change}. Restore the images the checkpoint {checked.resume_from.name} was trained "
        f"on, or continue on these with --allow-change {DATA_KEY}"
    ]


def output_dir_problems(output_dir: Path) -> list[str]:
    """Whether ``output_dir`` is (or can become) a folder this process can write into."""
    key = f"output_dir = {str(output_dir)!r}"
    if output_dir.exists() and not output_dir.is_dir():
        return [f"{key}: is a file, not a folder; choose a folder path"]
    probe = output_dir
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return [f"{key}: cannot be created, because {str(probe)!r} is a file"]
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        where = "" if probe == output_dir else f" (its nearest existing parent {str(probe)!r})"
        return [f"{key}: cannot write into it{where}: {err.strerror}; choose another folder"]
    return []


def decide_start(config: RunConfig, num_processes: int, overwrite: bool) -> Checked:
    """Fresh, resumed, finished or refused: what the output folder and the flags say."""
    output_dir = Path(config.output_dir)
    resume = config.checkpoint.resume
    if overwrite and resume:
        raise ConfigError(
            ["--overwrite starts over and --resume continues; pass one of them, not both"]
        )
    if overwrite:
        names = dict.fromkeys([*RUN_OUTPUTS, *final.manifest_files(output_dir)])
        found = [name for name in names if (output_dir / name).exists()]
        removing = [f"--overwrite: removing the previous run's {', '.join(found)}"]
        return Checked(clear=bool(found), warnings=removing if found else [])
    current = comparable_config(config.to_dict(), num_processes)
    incomplete: list[str] = []
    done = finished_run(output_dir, current, incomplete)
    if done is not None:
        return done
    if resume:
        checked = _resume_point(config, current, resume)
    else:
        checked = _fresh_start(output_dir, current)
    checked.warnings[:0] = incomplete
    return checked


def finished_run(output_dir: Path, current: dict, warnings: list[str]) -> Checked | None:
    """``complete`` when the outputs of this very run exist and verify, else None (and why
    not, in ``warnings``, when they exist but do not verify)."""
    manifest, problems = final.read_manifest(output_dir)
    if manifest is None or problems:
        warnings += [f"final outputs incomplete: {problem}" for problem in problems]
        return None
    if config_diff(saved_run(manifest), current):
        return None
    message = (
        f"already complete: {manifest['global_step']} updates; the final outputs in "
        f"{output_dir} verify against {final.MANIFEST_NAME}"
    )
    return Checked(complete=True, updates_done=int(manifest["global_step"]), messages=[message])


def _resume_point(config: RunConfig, current: dict, resume: str) -> Checked:
    output_dir = Path(config.output_dir)
    checked = Checked()
    if resume == "latest":
        folder, damaged = ckpt.newest_intact(output_dir)
        for bad, why in damaged:
            checked.quarantine.append(bad)
            checked.warnings.append(
                f"checkpoint {bad.name} is damaged ({'; '.join(why)}); it is set aside as "
                f"{bad.name}.damaged"
            )
        if folder is None and damaged:
            raise ConfigError(
                [
                    f"--resume latest: no intact checkpoint in {output_dir / ckpt.CHECKPOINTS}: "
                    + "; ".join(checked.warnings)
                    + ". Pass --overwrite to start over (the damaged folders are removed)"
                ]
            )
        if folder is None:
            if trained_weights(output_dir):
                raise ConfigError(
                    [
                        f"--resume latest: {output_dir} holds final LoRA weights but no checkpoint "
                        "to resume, and its outputs do not match this config; pass --overwrite "
                        "to train again from scratch, or choose another output_dir"
                    ]
                )
            checked.messages.append(
                f"--resume latest: no checkpoint in {output_dir} yet; starting from update 0"
            )
            return checked
        if damaged:
            checked.warnings.append(
                f"resuming from {ckpt.settled(folder).name}, the newest intact checkpoint"
            )
    else:
        folder = ckpt.resolve(output_dir, resume)
    # `folder` may be a save set aside by a crash (step-NNNNNN.old); apply() renames it back
    # before the run reads it, so the run resumes from its settled name.
    settled = ckpt.settled(folder, output_dir)
    saved = read_toml(folder / ckpt.CONFIG_NAME)
    # lr_scheduler.json is the source of truth for the schedule (config.toml holds a copy).
    schedule_json = ckpt.read_json(folder, ckpt.LR_SCHEDULER_STATE)
    saved["lr_scheduler"] = {"name": schedule_json["name"], **schedule_json["params"]}
    saved = with_defaults(saved)
    state = ckpt.read_json(folder, ckpt.TRAINER_STATE)
    saved = comparable_config(saved, state["num_processes"])
    allow = list(config.checkpoint.allow_change)
    branch = branch_marker(folder) is not None
    if branch:  # a shared prefix: another schedule and length, checked against its LRs
        allow += PREFIX_KEYS
        checked.prefix_schedule = schedule_json
    allowed = check_resumable(saved, current, allow, str(folder))
    asked = [d for d in allowed if not branch or is_allowed(d[0], config.checkpoint.allow_change)]
    checked.warnings += [
        f"resume: {key} changed from {old!r} to {new!r} (allowed)" for key, old, new in asked
    ]
    if branch:
        checked.messages.append(
            f"resume: {settled.name} is a shared prefix's branch point; this run continues "
            "it with its own LR schedule and length"
        )
    checked.resume_from = settled
    checked.resume_state = state
    checked.updates_done = int(state["global_step"])
    if not allowed and checked.updates_done >= int(state["total_updates"]):
        # The run finished training; only its final outputs are missing or damaged.
        checked.complete = True
        checked.finalize_from = settled
        checked.messages.append(
            f"already trained: {checked.updates_done} updates; writing the final outputs "
            f"from {settled.name}"
        )
    return checked


def saved_run(manifest: dict) -> dict:
    """A manifest's config with defaults filled in, launch facts kept (to compare)."""
    config = dict(manifest["config"])
    launch = config.pop("launch", {})
    return {**with_defaults(config), "launch": launch}


def with_defaults(saved: dict) -> dict:
    """A saved config with every key this version knows, so a key added since it was written
    compares as its default rather than as a difference (a config this version cannot read
    is compared as written, and the diff shows why)."""
    try:
        return build(saved, "the checkpoint's config.toml").to_dict()
    except ConfigError:
        return saved


def _fresh_start(output_dir: Path, current: dict) -> Checked:
    steps = ckpt.step_folders(output_dir)
    if steps:
        raise ConfigError(
            [
                f"output_dir = {str(output_dir)!r} already holds checkpoints of a run (the "
                f"newest: {ckpt.settled(steps[-1]).name}); resume it with --resume latest, start "
                "over with --overwrite, or choose another output_dir"
            ]
        )
    if trained_weights(output_dir):
        manifest, _ = final.read_manifest(output_dir)
        why = "of an unfinished or damaged run"
        if manifest is not None:
            diff = config_diff(saved_run(manifest), current)[:3]
            shown = "; ".join(f"{k}: {a!r} → {b!r}" for k, a, b in diff)
            why = f"trained with a different config ({shown})"
        raise ConfigError(
            [
                f"output_dir = {str(output_dir)!r} holds LoRA weights {why}; they are not "
                "replaced without --overwrite. Choose another output_dir, or pass --overwrite"
            ]
        )
    if (output_dir / "metrics.jsonl").exists():
        return Checked(messages=["output_dir holds a run that saved no weights; starting it over"])
    return Checked()


def trained_weights(output_dir: Path) -> list[Path]:
    """The final LoRA files an earlier run left: the diffusers file, and whatever its manifest
    lists (the kohya file is named after the run)."""
    names = [WEIGHTS_NAME, *final.manifest_files(output_dir)]
    return [output_dir / n for n in dict.fromkeys(names) if n.endswith(".safetensors")
            and (output_dir / n).exists()]  # fmt: skip


def apply(checked: Checked, config: RunConfig, num_processes: int) -> None:
    """Make the changes on disk that :func:`check` decided (main process only)."""
    output_dir = Path(config.output_dir)
    if checked.clear:
        for name in dict.fromkeys([*RUN_OUTPUTS, *final.manifest_files(output_dir)]):
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    for folder in checked.quarantine:
        ckpt.quarantine(folder)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt.clean_interrupted_saves(output_dir)
    if checked.finalize_from is not None:
        final.write_outputs(
            checked.finalize_from, output_dir, config, {"num_processes": num_processes}
        )
