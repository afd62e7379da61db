"""All of training's control flow, top to bottom: check → set up → train → finish.

Read this file first. :func:`run` is the whole story in four calls:

1. ``preflight.check``: everything that can fail without a model fails here, in seconds
   (config, output folder, dataset, run length, model path, LoRA targets, which checkpoint to
   resume), and a run that already finished is recognised without loading anything.
2. :func:`setup`: load the models, attach the adapters, fill the caches, build the
   optimizer, restore a checkpoint. It returns the one :class:`~trainer.run.state.RunState` the
   other phases share.
3. :func:`train`: micro-batches until the planned updates are done or a signal asks to stop.
   :func:`apply_lr_schedule` is where the LR is set, before every optimizer update.
4. :func:`finish`: the last checkpoint, then the final outputs written from it.

The rules it keeps:
- The loop counts optimizer updates itself and sets each param group's LR from the schedule
  before every update. The LR schedule is never given to ``accelerator.prepare`` (accelerate
  steps it once per process per update, and skips it when fp16 overflows).
- Micro-batch ``g`` of the run is a pure function of (seed, g): data order, noise, timesteps,
  crops, flips and dropout all derive their seeds from counters (``trainer.data.order``), so a
  run resumed from a checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration, set_seed

from schedulers import Schedule
from trainer import optimizers
from trainer.config import sd3 as sd3_config
from trainer.config.load import RunConfig, to_toml
from trainer.data.feed import build_feed
from trainer.data.order import seed_for
from trainer.files import write_text
from trainer.lora import adapters as lora
from trainer.lora import blocks
from trainer.models import conditioning, pristine, sd3
from trainer.models import load as models
from trainer.models.accessors import move
from trainer.models.dtypes import DTYPES
from trainer.models.vae import posterior
from trainer.report import prometheus, samples
from trainer.report.progress import SessionStats
from trainer.report.tracking import LOGS_DIR, Tracker, start_trackers, truncate_metrics
from trainer.run import ema, final, flow_matching, preflight, step
from trainer.run.checkpoint import restore_checkpoint, save_checkpoint
from trainer.run.loss import LossOptions, training_noise_scheduler
from trainer.run.preflight import Checked
from trainer.run.signals import StopRequest
from trainer.run.state import RunState
from trainer.run.trial import current_watch, in_sweep, shared_cache_dir
from trainer.run.validation import Validator, load_scorer, score_samples

if TYPE_CHECKING:
    from diffusers.models import AutoencoderKL

log = logging.getLogger("sdlora")


@dataclass
class TrainResult:
    """What a run leaves in memory (the files are in ``output_dir``)."""

    output_dir: Path
    updates: int
    unet: torch.nn.Module | None
    text_encoder: torch.nn.Module | None
    interrupted: bool = False
    is_main_process: bool = True
    # Nothing was trained: the run had finished before (its outputs verified or rewritten).
    already_complete: bool = False
    messages: tuple[str, ...] = ()
    # This session's throughput and pauses (main process; None when nothing was trained).
    stats: SessionStats | None = None
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second, when trained


def run(
    config: RunConfig,
    overwrite: bool = False,
    checked: Checked | None = None,
    stop_at: int | None = None,
) -> TrainResult:
    """Train LoRA adapters as configured, resuming from a checkpoint when asked to.

    Args:
        config: A validated run config.
        overwrite: Replace what an earlier run left in ``output_dir`` (``--overwrite``).
        checked: ``preflight.check``'s answer when the caller ran it already (``sdlora
            train`` does, before importing this module's libraries); else it runs here.
        stop_at: Stop after this update with a checkpoint, as a signal would (``--stop-at``).

    Returns:
        The output folder, the updates done, the unwrapped trained models (None when the run
        had already finished), and whether the run stopped early on a signal.
    """
    if checked is None:
        processes, is_main = preflight.launch()
        checked = preflight.check(config, processes, overwrite, is_main)
    accelerator = make_accelerator(config)
    if accelerator.is_main_process:
        preflight.apply(checked, config, accelerator.num_processes)
        for message in checked.warnings:
            log.warning(message)
        for message in checked.messages:
            log.info(message)
    accelerator.wait_for_everyone()
    if checked.complete:
        accelerator.end_training()  # no trackers were started; this ends the process group
        return TrainResult(
            Path(config.output_dir),
            checked.updates_done,
            None,
            None,
            is_main_process=accelerator.is_main_process,
            already_complete=True,
            messages=tuple(checked.warnings + checked.messages),
        )
    optimizers.check_device(config.optimizer, accelerator.device)  # before any model loads
    # /metrics for Prometheus (logging.prometheus_port) from before the models load until the
    # run returns, however it ends; a sweep's trials each take a port of their own.
    spread = prometheus.SWEEP_PORTS if in_sweep() else 1
    with prometheus.serving(config, accelerator.is_main_process, spread) as metrics:
        state = setup(config, accelerator, checked, metrics)
        state.stop_at = stop_at
        state.watch = current_watch()  # a warm sweep trial's pruning check; else None
        interrupted = train(state)
        return finish(state, interrupted)


# ---------------------------------------------------------------- setup


def make_accelerator(config: RunConfig) -> Accelerator:
    """The Accelerator for this launch (preflight has refused settings the hardware cannot
    run)."""
    precision = config.train.mixed_precision  # fp16 without CUDA: refused by preflight
    if torch.cuda.is_available():
        # PyTorch leaves TF32 matmuls off by default; they are the fast path on every GPU
        # this trainer targets, and the LoRA's fp32 master weights lose nothing by it.
        torch.backends.cuda.matmul.allow_tf32 = config.train.tf32
        torch.backends.cudnn.allow_tf32 = config.train.tf32
    tracker = config.logging.tracker
    # accelerate keeps process-wide singletons; a second run in the same process (tests,
    # sweeps) may use another precision. The distributed state (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    # accelerate only starts gloo for several CPU processes when asked for the CPU explicitly.
    world, _ = preflight.launch()
    accelerator = Accelerator(
        cpu=world > 1 and not torch.cuda.is_available(),
        mixed_precision=precision,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        log_with=None if tracker == "none" else tracker,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=str(Path(config.output_dir) / LOGS_DIR)
        ),
    )
    if accelerator.num_processes != world:
        # Each process would train alone and all would write the same files.
        raise RuntimeError(
            f"launched {world} processes but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}); check the accelerate launch settings"
        )
    return accelerator


def setup(
    config: RunConfig,
    accelerator: Accelerator,
    checked: Checked,
    metrics: prometheus.TrainingMetrics | None = None,
) -> RunState:
    """Load and prepare everything the loop needs; restore the checkpoint when resuming.
    ``metrics``: the Prometheus gauges the tracker updates, when they are served."""
    train_cfg = config.train
    set_seed(train_cfg.seed)  # model init draws (LoRA A matrices) are the same on every process
    weight_dtype = DTYPES[train_cfg.mixed_precision]

    # ---- models: frozen base in the compute dtype, adapters in fp32 on top
    # A warm sweep worker's runs each get a copy of the model it loaded once (pristine.py).
    parts = pristine.load_components(config.model, weight_dtype, checked.architecture)
    parts.noise_scheduler = training_noise_scheduler(parts.noise_scheduler, train_cfg)
    for module in (parts.vae, *parts.text_encoders, parts.unet):
        module.to(accelerator.device)
    if train_cfg.channels_last:
        move(parts.unet, memory_format=torch.channels_last)
        move(parts.vae, memory_format=torch.channels_last)
    trained_texts = {
        name: module
        for name, module, on in (
            ("text_encoder", parts.text_encoder, config.lora.train_text_encoder),
            ("text_encoder_2", parts.text_encoder_2, config.lora.train_text_encoder_2),
        )
        if on and module is not None
    }
    # SDXL conditions on the first encoder's penultimate layer: its last gets no adapter.
    unread = conditioning.unread_layers(parts.architecture == "sdxl")
    # SD3 (its transformer in the UNet's slot) has its own default targets.
    lora.attach(
        parts.unet, trained_texts, sd3_config.resolved_lora(config.lora, parts.architecture), unread
    )
    attention = models.enable_attention_backend(parts.unet, train_cfg.xformers)
    if train_cfg.compile:
        parts.unet.compile()  # in place: parameter names and state_dict keys stay the same
    if train_cfg.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
        for module in trained_texts.values():
            module.gradient_checkpointing_enable()

    # ---- caches and the loader; the order is planned by counters so it can resume
    assert checked.prepared is not None and checked.plan is not None  # preflight set both
    feed = build_feed(
        config, accelerator, parts, bool(trained_texts), checked.prepared, checked.val_examples,
        shared=shared_cache_dir(),
    )  # fmt: skip
    validator = None
    if feed.validation:
        val = config.validation
        validator = Validator(
            feed.validation,
            parts.tokenizers,
            parts.vae,
            val.timesteps,
            val.seed,  # not train.seed: every run of a sweep is scored on the same noise
            val.batch_size,
        )
    if parts.architecture == "sd3":  # T5's outputs cached for every caption; T5 freed
        sd3.settle_t5(parts, config, feed.prepared.examples, feed.validation)
    if feed.cached_latents != "off":
        move(parts.vae, "cpu")  # not needed on the device while training from cached latents

    # ---- optimizer; the LR schedule stays outside accelerate (see the module docstring)
    # Param groups in config.lr_groups() order: the UNet's, then the trained text encoders',
    # split by block LR multiplier and LoRA+ (trainer/config/lr_groups.py).
    trained = [parts.unet, *trained_texts.values()]
    sdxl = parts.architecture == "sdxl"
    models_by_name = cast("dict[str, torch.nn.Module]", {"unet": parts.unet, **trained_texts})
    groups = blocks.param_groups(config.lr_groups(), config.lora, models_by_name, sdxl)
    optimizer = optimizers.create_groups(config.optimizer, groups)
    average = ema.from_config(config.ema, models_by_name)  # after blocks froze theirs
    *prepared, optimizer = accelerator.prepare(*trained, optimizer)
    prepared_texts = dict(zip(trained_texts, prepared[1:], strict=True))
    state = RunState(
        config=config,
        accelerator=accelerator,
        plan=checked.plan,
        parts=parts,
        feed=feed,
        unet=prepared[0],
        text_encoder=prepared_texts.get("text_encoder"),
        text_encoder_2=prepared_texts.get("text_encoder_2"),
        optimizer=optimizer,
        validator=validator,
        weight_dtype=weight_dtype,
        resumed_from=checked.resume_from,
        architecture=checked.architecture,
        ema=average,
    )

    # ---- resume: weights, optimizer, scaler; the data position follows from the update
    if checked.resume_from is not None:
        state.update = restore_checkpoint(state, checked.resume_from)
    state.tracker = start_logging(state, metrics)
    if accelerator.is_main_process:  # the samples it scores are drawn on the main process
        state.scorer = load_scorer(config, accelerator.device, feed.validation or [],
                                   state.tracker.message)  # fmt: skip
    state.tracker.message(
        f"{len(feed.prepared.examples)} examples in {len(feed.prepared.sizes)} bucket(s), "
        f"{state.plan.micro_batches_per_epoch} micro-batches/epoch, "
        f"{state.plan.total_updates} optimizer updates"
        + (f" (resuming at {state.update} from {checked.resume_from})" if state.update else "")
        + f", attention: {attention}, processes: {accelerator.num_processes}, "
        f"precision: {train_cfg.mixed_precision}, latent cache: {feed.cached_latents}, "
        f"text cache: {'on' if feed.cached_text else 'off'}, model: {state.architecture}, "
        f"vae: {parts.vae_note}"
    )
    return state


def start_logging(state: RunState, metrics: prometheus.TrainingMetrics | None = None) -> Tracker:
    """metrics.jsonl and samples cut back to the resumed update, the resolved config, the
    trackers (appending to this output_dir's tensorboard run from the next update), and the
    Prometheus gauges when served."""
    config, accelerator = state.config, state.accelerator
    if accelerator.is_main_process:
        truncate_metrics(state.output_dir, state.update)
        samples.drop_after(state.output_dir, state.update)
        write_text(state.output_dir / "config.toml", to_toml(config.to_dict()))
        start_trackers(accelerator, config, state.update + 1)
    return Tracker(accelerator, config, state.plan, state.update, state.resumed_from, metrics)


# ---------------------------------------------------------------- train


def train(state: RunState) -> bool:
    """Run optimizer updates until the plan is done; return True when a signal stopped it.

    A signal (SIGTERM/SIGINT) lets the current update finish, saves a checkpoint, and stops.
    """
    plan, feed = state.plan, state.feed
    micro = state.update * plan.accumulation
    loss_sum = torch.zeros((), device=state.accelerator.device)
    with StopRequest() as stop:
        while state.update < plan.total_updates:
            # Continue the micro-batch stream where it is (an epoch may end mid-update).
            feed.sampler.epoch, feed.sampler.start = divmod(micro, plan.micro_batches_per_epoch)
            for batch in feed.loader:
                loss_sum += micro_step(state, batch, micro)
                micro += 1
                if not state.accelerator.sync_gradients:
                    continue
                state.update += 1
                stopped = after_update(state, micro, loss_sum, stop.requested)
                loss_sum.zero_()
                if stopped:
                    return True
                if state.update >= plan.total_updates:
                    break
    return False


def micro_step(state: RunState, batch: dict[str, torch.Tensor], micro: int) -> torch.Tensor:
    """Forward and backward of one micro-batch; on the last of an update, the optimizer step."""
    config, accelerator = state.config, state.accelerator
    device = accelerator.device
    with accelerator.accumulate(*state.trained):
        # LoRA dropout draws from the global generator: seed it per micro-batch.
        torch.manual_seed(seed_for(config.train.seed, "micro", micro, accelerator.process_index))
        rand = step.ExampleRandom(batch.pop("seed").tolist(), device)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        latents = encode_latents(batch, state.parts.vae, rand)
        cond = conditioning.condition(batch, state.encoders, state.encoders_trained)
        options = LossOptions.of(config.train)
        weights, mask = batch.get("loss_weight"), batch.get("mask")
        if state.architecture == "sd3":  # flow matching, not ε/v prediction
            loss = flow_matching.flow_matching_loss(
                state.unet, state.parts.noise_scheduler, latents, cond, rand,
                config.flow_matching, options, weights, mask,
            )  # fmt: skip
        else:
            loss = step.diffusion_loss(
                state.unet, state.parts.noise_scheduler, latents, cond, rand,
                options, weights, mask,
            )  # fmt: skip
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            apply_lr_schedule(
                state.optimizer,
                config.lr_scheduler,
                state.update,
                state.plan.total_updates,
                config.base_lrs(),
            )
            if config.train.max_grad_norm:
                params = [p for group in state.optimizer.param_groups for p in group["params"]]
                accelerator.clip_grad_norm_(params, config.train.max_grad_norm)
        state.optimizer.step()  # accelerate only steps on the last micro-batch of an update
        state.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def apply_lr_schedule(
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Schedule,
    update: int,
    total_updates: int,
    base_lrs: list[float],
) -> list[float]:
    """Set every param group's LR for optimizer update ``update`` (0-based); return them.

    The one place the LR is set. The schedule is a pure function of the update index, so a
    resumed run, an accumulated run and a multi-process run all follow the same curve.
    """
    lrs = lr_scheduler.lrs(update, total_updates, base_lrs)
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    return lrs


def encode_latents(
    batch: dict[str, torch.Tensor], vae: AutoencoderKL, rand: step.ExampleRandom
) -> torch.Tensor:
    """Latents x₀ of a batch: sampled from the cached posterior, or from a fresh VAE encode
    in the VAE's own dtype (SDXL's may run in fp32 under fp16, see ``models.vae_dtype``)."""
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"], batch["latent_std"]
    else:
        with torch.no_grad():
            mean, std = posterior(vae, batch["pixel_values"].to(vae.dtype))
    return step.sample_latents(mean.float(), std.float(), rand)


def after_update(state: RunState, micro: int, loss_sum: torch.Tensor, stop: bool) -> bool:
    """Record the update just done, validate and checkpoint when due; return True to stop."""
    config, accelerator, plan, update = state.config, state.accelerator, state.plan, state.update
    if state.ema is not None:
        state.ema.after_update(update)
    # One collective per update: the mean loss, and whether any process was signalled, so
    # all processes stop (and save) at the same update.
    stats = torch.stack([loss_sum, torch.tensor(float(stop), device=loss_sum.device)])
    loss_total, signalled = accelerator.reduce(stats, reduction="sum").tolist()  # one sync
    record = {
        "step": update,
        "loss": loss_total / (plan.accumulation * accelerator.num_processes),
        "lr": [group["lr"] for group in state.optimizer.param_groups],
        "lr_groups": state.config.lr_group_names(),
        "epoch": (micro - 1) // plan.micro_batches_per_epoch,
        "samples": micro * config.train.batch_size * accelerator.num_processes,
    }
    record.update(optimizers.step_metrics(state.optimizer))  # Prodigy's d·lr: "effective_lr"
    val = config.validation
    if update == plan.total_updates or (val.every_n_steps and update % val.every_n_steps == 0):
        with state.tracker.paused("validation"):  # kept out of the throughput shown
            validate(state, record)
    state.tracker.update(record)
    asked = state.stop_at is not None and update >= state.stop_at
    if state.watch is not None and state.watch(record):
        asked = True
    interrupted = (bool(signalled) or asked) and update < plan.total_updates
    every = config.checkpoint.every_n_steps
    if interrupted or (every and update % every == 0 and update < plan.total_updates):
        with state.tracker.paused("checkpoint"):
            folder = save_checkpoint(state)
        state.tracker.checkpointed(folder)
    return interrupted


def validate(state: RunState, record: dict) -> None:
    """The fixed-seed validation loss (overall and per timestep) into ``record``, the
    fixed-seed sample images, and their image scores when configured."""
    accelerator, val = state.accelerator, state.config.validation
    unet = state.unwrapped(state.unet)
    encoder = [state.unwrapped(e) for e in state.encoders]
    # The weights the outputs hold: the EMA with ema.use_for_outputs, else the trained ones.
    outputs = ema.for_outputs
    if state.validator is not None:
        with optimizers.eval_mode(state.optimizer), outputs(state.ema), accelerator.autocast():
            scored = state.validator.evaluate(
                unet, encoder, state.parts.noise_scheduler, accelerator.device
            )
        record.update(scored.record())
    if val.prompts and accelerator.is_main_process:
        with optimizers.eval_mode(state.optimizer), outputs(state.ema), accelerator.autocast():
            folder = samples.sample_point(state, unet, encoder)
        if state.scorer is not None:
            record.update(score_samples(state.scorer, folder, val.prompts))


# ---------------------------------------------------------------- finish


def finish(state: RunState, interrupted: bool) -> TrainResult:
    """The last checkpoint and the final outputs written from it; then close everything."""
    accelerator, plan = state.accelerator, state.plan
    if interrupted:
        state.tracker.message(
            f"stopped at update {state.update}/{plan.total_updates} (checkpoint saved)"
        )
    else:
        folder = save_checkpoint(state)
        if accelerator.is_main_process:
            launch = {"num_processes": accelerator.num_processes}
            written = final.write_outputs(folder, state.output_dir, state.config, launch)
            state.tracker.message(f"saved {', '.join(str(p) for p in written)}")
    samples.write_progression(state)
    stats = state.tracker.close()
    accelerator.wait_for_everyone()
    # Last: it finishes the trackers and destroys the process group, so nothing collective
    # may follow (calling it before wait_for_everyone crashed every multi-process run).
    accelerator.end_training()
    optimizers.to_eval(state.optimizer)  # the returned models hold the weights that were saved
    if state.ema is not None and state.config.ema.use_for_outputs:
        state.ema.copy_to_model()  # ... and with ema.use_for_outputs, those are the EMA's
    return TrainResult(
        state.output_dir,
        state.update,
        state.unwrapped(state.unet),
        state.unwrapped(state.text_encoder),
        interrupted,
        accelerator.is_main_process,
        stats=stats,
        text_encoder_2=state.unwrapped(state.text_encoder_2),
    )
