"""A fixed-seed validation loss and fixed-seed samples, so runs (e.g. LR schedules in a
sweep) compare fairly.

Each held-out example is scored at ``validation.timesteps`` evenly spaced timesteps with noise
drawn from a seed fixed per example, so the number depends only on the weights: two runs, or
two points of one run, are compared on exactly the same noisy inputs. Images are center
cropped, never flipped, and captions are used as written.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch

from trainer import conditioning, images, step
from trainer.data import Example, Record
from trainer.order import seed_for


def split(records: Sequence[Record], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded ``fraction`` of the distinct images (with all their repeats).

    Returns:
        (training records, validation records, one per held-out image).
    """
    if fraction <= 0:
        return list(records), []
    paths = list(dict.fromkeys(r.path for r in records))
    count = max(1, round(fraction * len(paths)))
    if count >= len(paths):
        raise ValueError(
            f"validation.fraction = {fraction} holds out all {len(paths)} images; lower it"
        )
    held = set(random.Random(seed_for(seed, "validation")).sample(paths, count))
    train = [r for r in records if r.path not in held]
    val = list({r.path: r for r in records if r.path in held}.values())
    return train, val


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class Validator:
    """Scores the current adapters on the held-out examples.

    The held-out images are encoded once, at construction (the VAE is frozen), so scoring
    needs only the text encoders and the UNet. Their conditioning is built by the function
    training uses (``conditioning.condition``), SDXL's time ids from each center crop.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer,
        vae: torch.nn.Module,
        timesteps: int,
        seed: int,
        batch_size: int,
    ) -> None:
        """Args:
        examples: The held-out examples.
        tokenizer: The tokenizer, or SDXL's two in order (then time ids are scored too).
        vae: The frozen VAE.
        timesteps: Fixed timesteps per example.
        seed: The run seed (the noise is seeded per example from it).
        batch_size: Examples per forward pass.
        """
        self.timesteps = timesteps
        self.batches = []
        tokenizers = _as_list(tokenizer)
        device, dtype = vae.device, vae.dtype
        for start in range(0, len(examples), batch_size):
            for group in _by_size(examples[start : start + batch_size]):
                loaded = [images.load_example(e.path, e.size, True, False, None) for e in group]
                pixels = torch.stack([p for p, _ in loaded])
                with torch.no_grad():
                    mean, std = step.posterior(vae, pixels.to(device, dtype))
                ids = conditioning.tokenize(tokenizers, [e.caption for e in group])
                text = {"input_ids": ids[0]} | {
                    f"input_ids_{n}": t for n, t in enumerate(ids[1:], 2)
                }
                if len(tokenizers) > 1:
                    text["time_ids"] = torch.tensor([g.time_ids() for _, g in loaded]).float()
                seeds = [seed_for(seed, "val", str(e.path)) for e in group]
                self.batches.append((text, mean.float().cpu(), std.float().cpu(), seeds))

    @torch.no_grad()
    def loss(self, unet: torch.nn.Module, text_encoder, noise_scheduler, device) -> float:
        """Mean loss over examples × fixed timesteps (plain MSE against the training target).

        Args:
            unet: The unwrapped UNet with adapters (no DDP collectives inside).
            text_encoder: The (unwrapped) text encoder, or SDXL's two in order.
            noise_scheduler: The training noise scheduler.
            device: Where the models are.
        """
        encoders = _as_list(text_encoder)
        steps = noise_scheduler.config.num_train_timesteps
        fixed = [int((k + 0.5) * steps / self.timesteps) for k in range(self.timesteps)]
        total, count = 0.0, 0
        for text, mean, std, seeds in self.batches:
            cond = conditioning.condition({k: v.to(device) for k, v in text.items()}, encoders)
            rand = step.ExampleRandom(seeds, device)
            latents = step.sample_latents(mean.to(device), std.to(device), rand)
            noise = rand.randn(latents.shape[1:])
            for t in fixed:
                timesteps = torch.full((len(seeds),), t, device=device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                target = step.training_target(noise_scheduler, latents, noise, timesteps)
                pred = unet(noisy, timesteps, **cond.unet_kwargs(), return_dict=False)[0]
                total += (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3)).sum().item()
                count += len(seeds)
        return total / count


def _by_size(chunk: Sequence[Example]) -> list[list[Example]]:
    groups: dict[tuple[int, int], list[Example]] = {}
    for e in chunk:
        groups.setdefault(e.size, []).append(e)
    return list(groups.values())


def sampling_pipeline(parts, unet: torch.nn.Module, text_encoder, scheduler):
    """The diffusers pipeline of the model's family around the live (adapted) modules:
    ``StableDiffusionXLPipeline`` for SDXL, ``StableDiffusionPipeline`` otherwise.

    Args:
        parts: The loaded components (VAE, tokenizers, frozen text encoders).
        unet: The UNet with adapters.
        text_encoder: The text encoder to use, or SDXL's two in order (trained or frozen).
        scheduler: The sampler.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    encoders = _as_list(text_encoder)
    if parts.text_encoder_2 is not None:
        return StableDiffusionXLPipeline(
            vae=parts.vae,
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=parts.tokenizer,
            tokenizer_2=parts.tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    return StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=encoders[0],
        tokenizer=parts.tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def write_samples(
    folder: Path,
    prompts: Sequence[str],
    parts,
    unet: torch.nn.Module,
    text_encoder,
    size: int,
    steps: int,
    guidance_scale: float,
    seed: int,
) -> list[Path]:
    """Draw one fixed-seed image per prompt with the current adapters; return the PNG paths.

    The noise depends only on ``seed`` and the prompt's position, so images from different
    steps of a run, or from runs with different LR schedules, differ only by the weights.
    SDXL models sample through the SDXL pipeline (both text encoders, size conditioning).
    """
    from diffusers import DDIMScheduler

    device = next(unet.parameters()).device
    vae_device = parts.vae.device
    parts.vae.to(device)  # the VAE may sit on the CPU while training from cached latents
    pipe = sampling_pipeline(
        parts, unet, text_encoder, DDIMScheduler.from_config(parts.noise_scheduler.config)
    )
    pipe.set_progress_bar_config(disable=True)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for k, prompt in enumerate(prompts):
            generator = torch.Generator(device).manual_seed(seed_for(seed, "sample", k))
            image = pipe(
                prompt,
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generator,
            ).images[0]
            paths.append(folder / f"{k:02d}.png")
            image.save(paths[-1])
    finally:
        parts.vae.to(vae_device)
    return paths
