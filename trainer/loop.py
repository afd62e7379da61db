"""All of training's control flow, top to bottom: build, prepare, resume, loop, save.

Read this file first. The rules it keeps:
- The loop counts optimizer updates itself and sets each param group's LR from the schedule
  before every update. The LR schedule is never given to ``accelerator.prepare`` (accelerate
  steps it once per process per update, and skips it when fp16 overflows).
- Micro-batch ``g`` of the run is a pure function of (seed, g): data order, noise, timesteps,
  crops, flips and dropout all derive their seeds from counters (``trainer.order``), so a
  run resumed from a checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration, set_seed

from schedulers import schedule_state
from trainer import checkpoint as ckpt
from trainer import lora, models, step
from trainer.config import ConfigError, RunConfig, to_toml
from trainer.feed import build_feed, checked_examples
from trainer.lora_metadata import collect_run_facts
from trainer.order import seed_for
from trainer.outputs import write_final
from trainer.plan import plan_run
from trainer.resume import find_resume_point, restore_checkpoint, save_checkpoint
from trainer.signals import StopRequest
from trainer.tracking import Tracker, flat_hparams, truncate_metrics
from trainer.validation import Validator, write_samples

log = logging.getLogger("sdlora")

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    """What a finished run leaves in memory (the files are in ``output_dir``)."""

    output_dir: Path
    updates: int
    unet: torch.nn.Module
    text_encoder: torch.nn.Module | None
    interrupted: bool = False
    is_main_process: bool = True


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
    # accelerate only starts gloo for several CPU processes when asked for the CPU explicitly.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        cpu=world > 1 and not torch.cuda.is_available(),
        mixed_precision=precision,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        log_with=None if tracker == "none" else tracker,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=str(Path(config.output_dir) / "logs")
        ),
    )
    if accelerator.num_processes != world:
        # Each process would train alone and all would write the same files.
        raise RuntimeError(
            f"launched {world} processes but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}); check the accelerate launch settings"
        )
    return accelerator


def build_optimizer(
    config: RunConfig, unet: torch.nn.Module, text_encoder: torch.nn.Module | None
) -> torch.optim.Optimizer:
    """One param group for the UNet adapters and, when trained, one for the text encoder's."""
    train = config.train
    trained = [unet] if text_encoder is None else [unet, text_encoder]
    groups = [
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}
        for model, lr in zip(trained, config.base_lrs(), strict=True)
    ]
    impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    kernel = impl[train.optimizer_impl]
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=train.learning_rate, weight_decay=train.weight_decay, **kernel
        )
    return torch.optim.AdamW(
        groups,
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_epsilon,
        weight_decay=train.weight_decay,
        **kernel,
    )


def encode_latents(
    batch: dict[str, torch.Tensor],
    vae: torch.nn.Module,
    dtype: torch.dtype,
    rand: step.ExampleRandom,
) -> torch.Tensor:
    """Latents x₀ of a batch: sampled from the cached posterior, or from a fresh VAE encode."""
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"], batch["latent_std"]
    else:
        with torch.no_grad():
            mean, std = step.posterior(vae, batch["pixel_values"].to(dtype))
    return step.sample_latents(mean.float(), std.float(), rand)


def run(config: RunConfig) -> TrainResult:
    """Train LoRA adapters as configured, resuming from a checkpoint when asked to.

    Args:
        config: A validated run config.

    Returns:
        The output folder, the updates done, the unwrapped trained models, and whether the
        run stopped early on a signal.
    """
    accelerator = make_accelerator(config)
    output_dir = Path(config.output_dir)
    train = config.train
    set_seed(train.seed)  # model init draws (LoRA A matrices) are the same on every process
    weight_dtype = DTYPES[train.mixed_precision]
    resume_from = find_resume_point(config, accelerator.num_processes)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_tmp(output_dir)

    # ---- data first: every image is checked before minutes go into loading the models
    prepared, val_examples = checked_examples(config, accelerator.is_main_process)

    # ---- models: frozen base in the compute dtype, adapters in fp32 on top
    parts = models.load_components(config.model, weight_dtype)
    device = accelerator.device
    for module in (parts.vae, parts.text_encoder, parts.unet):
        module.to(device)
    text_encoder = parts.text_encoder if config.lora.train_text_encoder else None
    lora.attach(parts.unet, text_encoder, config.lora)
    attention = models.enable_attention_backend(parts.unet, train.xformers)
    if train.compile:
        parts.unet.compile()  # in place: parameter names and state_dict keys stay the same
    if train.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
        if text_encoder is not None:
            text_encoder.gradient_checkpointing_enable()

    # ---- caches and loader; the order is planned by counters so it can resume
    trains_text = text_encoder is not None
    feed = build_feed(config, accelerator, parts, trains_text, prepared, val_examples)
    plan = plan_run(config, feed.prepared.groups, accelerator.num_processes)
    validator = None
    if feed.validation:
        val = config.validation
        validator = Validator(
            feed.validation, parts.tokenizer, parts.vae, val.timesteps, train.seed, val.batch_size
        )
    if feed.cached_latents != "off":
        parts.vae.to("cpu")  # not needed on the device while training from cached latents

    # ---- optimizer; the LR schedule stays outside accelerate (see the module docstring)
    optimizer = build_optimizer(config, parts.unet, text_encoder)
    trained = [parts.unet] if text_encoder is None else [parts.unet, text_encoder]
    prepared = accelerator.prepare(*trained, optimizer)
    unet, optimizer = prepared[0], prepared[-1]
    text_encoder = prepared[1] if text_encoder is not None else None
    trained = prepared[:-1]
    base_lrs = config.base_lrs()
    params = [p for group in optimizer.param_groups for p in group["params"]]

    # ---- resume: weights, optimizer, scaler; the data position follows from the update
    update = 0
    if resume_from is not None:
        update = restore_checkpoint(resume_from, accelerator, unet, text_encoder, optimizer)
        if update >= plan.total_updates:
            raise ConfigError(
                [
                    f"train.max_steps: the checkpoint {resume_from} already has {update} "
                    f"updates and this run has {plan.total_updates}; raise train.max_steps "
                    "and pass --allow-change max_steps to train further"
                ]
            )
    if accelerator.is_main_process:
        truncate_metrics(output_dir, update)
        (output_dir / ckpt.CONFIG_NAME).write_text(to_toml(config.to_dict()))
        if config.logging.tracker != "none":
            accelerator.init_trackers(config.logging.project, flat_hparams(config.to_dict()))
    tracker = Tracker(
        accelerator, output_dir, plan.total_updates, update, config.logging.tracker != "none"
    )
    tracker.message(
        f"{len(feed.prepared.examples)} examples in {len(feed.prepared.sizes)} bucket(s), "
        f"{plan.micro_batches_per_epoch} micro-batches/epoch, "
        f"{plan.total_updates} optimizer updates"
        + (f" (resuming at {update} from {resume_from})" if resume_from else "")
        + f", attention: {attention}, processes: {accelerator.num_processes}, "
        f"precision: {train.mixed_precision}, latent cache: {feed.cached_latents}, "
        f"text cache: {'on' if feed.cached_text else 'off'}"
    )

    # ---- the loop
    schedule = config.lr_scheduler
    encoder = text_encoder if text_encoder is not None else parts.text_encoder  # trained or frozen
    every = config.checkpoint.every_n_steps
    stats = torch.zeros(2, device=device)  # [sum of micro-batch losses, stop requested]
    micro = update * plan.accumulation
    interrupted = False
    with StopRequest() as stop:
        while update < plan.total_updates and not interrupted:
            # Continue the micro-batch stream where it is (an epoch may end mid-update).
            feed.sampler.epoch, feed.sampler.start = divmod(micro, plan.micro_batches_per_epoch)
            for batch in feed.loader:
                with accelerator.accumulate(*trained):
                    # LoRA dropout draws from the global generator: seed it per micro-batch.
                    torch.manual_seed(
                        seed_for(train.seed, "micro", micro, accelerator.process_index)
                    )
                    rand = step.ExampleRandom(batch.pop("seed").tolist(), device)
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    latents = encode_latents(batch, parts.vae, weight_dtype, rand)
                    if "encoder_hidden_states" in batch:
                        hidden = batch["encoder_hidden_states"]
                    else:
                        with torch.set_grad_enabled(text_encoder is not None):
                            hidden = encoder(batch["input_ids"], return_dict=False)[0]
                    loss = step.diffusion_loss(
                        unet, parts.noise_scheduler, latents, hidden, rand,
                        train.noise_offset, train.snr_gamma,
                    )  # fmt: skip
                    accelerator.backward(loss)
                    stats[0] += loss.detach()
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
                # One collective per update: the mean loss, and whether any process was
                # signalled, so all processes stop (and save) at the same update.
                stats[1] = float(stop.requested)
                totals = accelerator.reduce(stats, reduction="sum")
                stats.zero_()
                record = {
                    "step": update,
                    "loss": totals[0].item() / (plan.accumulation * accelerator.num_processes),
                    "lr": lrs,
                    "epoch": (micro - 1) // plan.micro_batches_per_epoch,
                    "samples": micro * train.batch_size * accelerator.num_processes,
                }
                val = config.validation
                val_due = update == plan.total_updates or (
                    val.every_n_steps and update % val.every_n_steps == 0
                )
                if val_due and validator:
                    with accelerator.autocast():
                        record["val_loss"] = validator.loss(
                            accelerator.unwrap_model(unet),
                            accelerator.unwrap_model(encoder),
                            parts.noise_scheduler,
                            device,
                        )
                if val_due and val.prompts and accelerator.is_main_process:
                    with accelerator.autocast():
                        write_samples(
                            output_dir / "samples" / f"step-{update:06d}",
                            val.prompts,
                            parts,
                            accelerator.unwrap_model(unet),
                            accelerator.unwrap_model(encoder),
                            config.data.resolution,
                            val.sample_steps,
                            val.guidance_scale,
                            val.sample_seed,
                        )
                tracker.update(record)
                interrupted = bool(totals[1].item()) and update < plan.total_updates
                due = every and update % every == 0 and update < plan.total_updates
                if due or interrupted:
                    args = (config, accelerator, plan, update, unet, text_encoder, optimizer)
                    folder = save_checkpoint(*args, base_lrs, resume_from)
                    tracker.message(f"checkpoint: {folder}")
                if interrupted or update >= plan.total_updates:
                    break

    # ---- the last checkpoint, the final weights with the schedule's state beside them
    final_unet = accelerator.unwrap_model(unet)
    final_te = accelerator.unwrap_model(text_encoder) if text_encoder is not None else None
    if interrupted:
        tracker.message(f"stopped at update {update}/{plan.total_updates} (checkpoint saved)")
    else:
        args = (config, accelerator, plan, update, unet, text_encoder, optimizer)
        save_checkpoint(*args, base_lrs, resume_from)
        if accelerator.is_main_process:
            facts = collect_run_facts(
                feed.prepared.examples,
                steps=update,
                epochs=-(-micro // plan.micro_batches_per_epoch),
                optimizer=optimizer,
                num_processes=accelerator.num_processes,
                prediction_type=parts.noise_scheduler.config.prediction_type,
            )
            path = ", ".join(map(str, write_final(output_dir, final_unet, final_te, config, facts)))
            last_lrs = [group["lr"] for group in optimizer.param_groups]
            state = schedule_state(schedule, plan.total_updates, update, base_lrs, last_lrs)
            ckpt.write_json(output_dir / ckpt.LR_SCHEDULER_STATE, state)
            tracker.message(f"saved {path}")
    tracker.close()
    accelerator.wait_for_everyone()
    return TrainResult(
        output_dir, update, final_unet, final_te, interrupted, accelerator.is_main_process
    )
