"""All of training's control flow, top to bottom: build, prepare, resume, loop, save.

Read this file first. The rules it keeps:
- The loop counts optimizer updates itself and sets each param group's LR from the schedule
  before every update. The LR schedule is never given to ``accelerator.prepare`` (accelerate
  steps it once per process per update, and skips it when fp16 overflows).
- Micro-batch ``g`` of the run is a pure function of (seed, g): data order, noise, timesteps,
  crops, flips and dropout all derive their seeds from counters (``trainer.order``), so a
  resumed run continues exactly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration, set_seed

from schedulers import schedule_state
from trainer import lora, models, step
from trainer.config import ConfigError, RunConfig, to_toml
from trainer.data import CaptionedImages, collate, find_records
from trainer.order import ResumableBatchSampler, batches_per_epoch, seed_for
from trainer.tracking import Tracker

log = logging.getLogger("sdlora")

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Plan:
    """How long the run is, in the units the schedule and the checkpoints use."""

    micro_batches_per_epoch: int
    total_updates: int
    accumulation: int

    def position(self, update: int) -> tuple[int, int]:
        """(epoch, micro-batch within the epoch) where optimizer update ``update`` starts."""
        return divmod(update * self.accumulation, self.micro_batches_per_epoch)


def plan_run(config: RunConfig, groups: list[list[int]], num_processes: int) -> Plan:
    """Count micro-batches per epoch and total optimizer updates, as training will run them.

    Accumulation windows run across epoch boundaries (micro-batches form one stream), so an
    epoch whose length is not a multiple of the accumulation never makes a short update.
    """
    train = config.train
    per_epoch = batches_per_epoch(groups, train.batch_size * num_processes)
    examples = sum(len(g) for g in groups)
    if per_epoch == 0:
        raise ConfigError(
            [
                f"train.batch_size: {examples} examples cannot fill one batch of "
                f"{train.batch_size} × {num_processes} process(es); lower the batch size"
            ]
        )
    total = train.max_steps or (train.epochs * per_epoch) // train.gradient_accumulation_steps
    if total < 1:
        raise ConfigError(
            [
                f"train.epochs: {train.epochs} epoch(s) of {per_epoch} micro-batches make no "
                f"update with gradient_accumulation_steps = {train.gradient_accumulation_steps}; "
                "raise train.epochs or set train.max_steps"
            ]
        )
    return Plan(per_epoch, total, train.gradient_accumulation_steps)


def _check_runtime(config: RunConfig, plan: Plan) -> None:
    problems = config.lr_scheduler.check(plan.total_updates)
    if problems:
        raise ConfigError(problems, "config (with the run length derived from the dataset)")


def make_accelerator(config: RunConfig) -> Accelerator:
    """The Accelerator, after refusing settings the hardware cannot run."""
    precision = config.train.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            [
                "train.mixed_precision: 'fp16' needs a CUDA GPU and none is available; "
                "use 'bf16' (runs on CPU) or 'no'"
            ]
        )
    tracker = config.logging.tracker
    # accelerate keeps process-wide singletons; a second run in the same process (tests,
    # sweeps) may use another precision. The distributed state (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        log_with=None if tracker == "none" else tracker,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=str(Path(config.output_dir) / "logs")
        ),
    )


def build_optimizer(
    config: RunConfig, unet: torch.nn.Module, text_encoder: torch.nn.Module | None
) -> torch.optim.Optimizer:
    """One param group for the UNet adapters and, when trained, one for the text encoder's."""
    train = config.train
    groups = [
        {"params": [p for p in unet.parameters() if p.requires_grad], "lr": train.learning_rate}
    ]
    if text_encoder is not None:
        te_lr = train.text_encoder_lr or train.learning_rate
        groups.append(
            {"params": [p for p in text_encoder.parameters() if p.requires_grad], "lr": te_lr}
        )
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.learning_rate, weight_decay=train.weight_decay)
    return torch.optim.AdamW(
        groups,
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_epsilon,
        weight_decay=train.weight_decay,
    )


def training_metadata(config: RunConfig, update: int, base_lrs: list[float]) -> dict:
    """The facts about a run stored in the LoRA file header."""
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


@dataclass
class TrainResult:
    """What a finished run leaves in memory (the files are in ``output_dir``)."""

    output_dir: Path
    updates: int
    unet: torch.nn.Module
    text_encoder: torch.nn.Module | None


def run(config: RunConfig) -> TrainResult:
    """Train LoRA adapters as configured.

    Args:
        config: A validated run config.

    Returns:
        The output folder, the number of updates made and the unwrapped trained models.
    """
    accelerator = make_accelerator(config)
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    train = config.train
    set_seed(train.seed)  # model init draws (LoRA A matrices) are the same on every process
    weight_dtype = DTYPES[train.mixed_precision]

    # ---- models: frozen base in the compute dtype, adapters in fp32 on top
    parts = models.load_components(config.model, weight_dtype)
    device = accelerator.device
    for module in (parts.vae, parts.text_encoder, parts.unet):
        module.to(device)
    text_encoder = parts.text_encoder if config.lora.train_text_encoder else None
    lora.attach(parts.unet, text_encoder, config.lora)
    attention = models.enable_attention_backend(parts.unet, train.xformers)
    if train.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
        if text_encoder is not None:
            text_encoder.gradient_checkpointing_enable()

    # ---- data: the order is planned here, not by a prepared DataLoader, so it can resume
    records = find_records(config.data)
    groups = [list(range(len(records)))]
    plan = plan_run(config, groups, accelerator.num_processes)
    _check_runtime(config, plan)
    dataset = CaptionedImages(records, config.data, parts.tokenizer)
    sampler = ResumableBatchSampler(
        groups, train.batch_size, accelerator.num_processes, accelerator.process_index, train.seed
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=config.data.num_workers,
        pin_memory=device.type == "cuda",
    )

    # ---- optimizer; the LR schedule stays outside accelerate (see the module docstring)
    optimizer = build_optimizer(config, parts.unet, text_encoder)
    trained = [parts.unet] if text_encoder is None else [parts.unet, text_encoder]
    prepared = accelerator.prepare(*trained, optimizer)
    unet, optimizer = prepared[0], prepared[-1]
    text_encoder = prepared[1] if text_encoder is not None else None
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    params = [p for group in optimizer.param_groups for p in group["params"]]

    update = 0
    if accelerator.is_main_process:
        (output_dir / "config.toml").write_text(to_toml(config.to_dict()))
        tracker_name = config.logging.tracker
        if tracker_name != "none":
            from trainer.tracking import flat_hparams

            accelerator.init_trackers(config.logging.project, flat_hparams(config.to_dict()))
    tracker = Tracker(
        accelerator, output_dir, plan.total_updates, update, config.logging.tracker != "none"
    )
    tracker.message(
        f"{len(records)} examples, {plan.micro_batches_per_epoch} micro-batches/epoch, "
        f"{plan.total_updates} optimizer updates, attention: {attention}, "
        f"processes: {accelerator.num_processes}, precision: {train.mixed_precision}"
    )

    # ---- the loop
    schedule = config.lr_scheduler
    loss_sum = torch.zeros((), device=device)
    micro = update * plan.accumulation
    while update < plan.total_updates:
        sampler.epoch, sampler.start = plan.position(update)
        for batch in loader:
            with accelerator.accumulate(*trained):
                seed = seed_for(train.seed, "micro", micro, accelerator.process_index)
                generator = torch.Generator(device).manual_seed(seed)
                torch.manual_seed(seed)  # LoRA dropout draws from the global generator
                pixels = batch["pixel_values"].to(device, weight_dtype, non_blocking=True)
                input_ids = batch["input_ids"].to(device, non_blocking=True)
                with torch.no_grad():
                    mean, std = step.posterior(parts.vae, pixels)
                    latents = step.sample_latents(mean.float(), std.float(), generator)
                with torch.set_grad_enabled(text_encoder is not None):
                    hidden = (text_encoder or parts.text_encoder)(input_ids, return_dict=False)[0]
                loss = step.diffusion_loss(
                    unet, parts.noise_scheduler, latents, hidden, generator,
                    train.noise_offset, train.snr_gamma,
                )  # fmt: skip
                accelerator.backward(loss)
                loss_sum += loss.detach()
                if accelerator.sync_gradients:
                    lrs = schedule.lrs(update, plan.total_updates, base_lrs)
                    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
                        group["lr"] = lr
                    if train.max_grad_norm:
                        accelerator.clip_grad_norm_(params, train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            if not accelerator.sync_gradients:
                continue
            update += 1
            mean_loss = accelerator.reduce(loss_sum, reduction="mean") / plan.accumulation
            loss_sum.zero_()
            epoch, _ = divmod(micro - 1, plan.micro_batches_per_epoch)
            tracker.update(
                {
                    "step": update,
                    "loss": mean_loss.item(),
                    "lr": lrs,
                    "epoch": epoch,
                    "samples": micro * train.batch_size * accelerator.num_processes,
                }
            )
            if update >= plan.total_updates:
                break

    # ---- final weights, the schedule's state beside them, and the resolved config
    accelerator.wait_for_everyone()
    final_unet = accelerator.unwrap_model(unet)
    final_te = accelerator.unwrap_model(text_encoder) if text_encoder is not None else None
    if accelerator.is_main_process:
        path = lora.save(
            output_dir,
            final_unet,
            final_te,
            dtype=config.lora.save_dtype,
            training_metadata=training_metadata(config, update, base_lrs),
        )
        state = schedule_state(
            schedule,
            plan.total_updates,
            update,
            base_lrs,
            [g["lr"] for g in optimizer.param_groups],
        )
        (output_dir / "lr_scheduler.json").write_text(json.dumps(state, indent=2))
        tracker.message(f"saved {path}")
    tracker.close()
    return TrainResult(output_dir, update, final_unet, final_te)
