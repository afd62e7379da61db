"""SD3's objective: flow matching, as diffusers' ``train_dreambooth_lora_sd3.py`` defines it.

For clean latents x₀ and noise ε, a position u ∈ [0, 1) is drawn from the configured density
(``compute_density_for_timestep_sampling``'s three: the sigmoid of a normal, the SD3 paper's
mode sampling, or uniform), picks σ and its timestep from the scheduler's own table (index
``⌊u·N⌋`` into ``FlowMatchEulerDiscreteScheduler``'s ``sigmas``/``timesteps``, which carry the
``shift``), and the transformer predicts the velocity ``ε − x₀`` from
``x_σ = (1 − σ)·x₀ + σ·ε`` (the scheduler's ``scale_noise``). The loss is each example's mean
squared error, weighted by ``compute_loss_weighting_for_sd3``'s scheme (1, σ⁻² or cosmap),
averaged over the batch.

Every draw comes from the per-example generators of :class:`trainer.run.step.ExampleRandom`,
in a fixed order (noise, noise offset, u), so a resumed run draws what the uninterrupted run
drew. The validation loss (:func:`fixed_sigma_loss`) scores the same objective at fixed,
evenly spaced positions of the same table with fixed noise, the analogue of the fixed
timesteps of SD 1.x/SDXL.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from trainer.config.sd3 import FlowMatchingConfig
from trainer.models.conditioning import Conditioning
from trainer.run.step import ExampleRandom, sample_latents, sample_noise


def is_flow_matching(noise_scheduler: Any) -> bool:
    """Whether a noise scheduler is a flow-matching one (SD3's), not DDPM's."""
    return type(noise_scheduler).__name__.startswith("FlowMatch")


def training_scheduler(noise_scheduler: Any, shift: float) -> Any:
    """The scheduler whose σ table training reads: the model's, or one with ``shift``
    (``flow_matching.shift``; 0 keeps the model's). Made once per scheduler and shift."""
    if not shift or shift == noise_scheduler.config.shift:
        return noise_scheduler
    cache = noise_scheduler.__dict__.setdefault("_sdlora_shifted", {})
    if shift not in cache:
        cache[shift] = type(noise_scheduler).from_config(noise_scheduler.config, shift=shift)
    return cache[shift]


def density(rand: ExampleRandom, config: FlowMatchingConfig) -> torch.Tensor:
    """One u ∈ [0, 1) per example, drawn from its generator by ``timestep_density``."""
    draws = []
    for g in rand.generators:
        if config.timestep_density == "logit_normal":
            z = torch.normal(
                config.logit_mean, config.logit_std, (1,), generator=g, device=rand.device
            )
            draws.append(torch.sigmoid(z))
        else:
            u = torch.rand((1,), generator=g, device=rand.device)
            if config.timestep_density == "mode":
                u = 1 - u - config.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
            draws.append(u)
    return torch.cat(draws)


def table_position(noise_scheduler: Any, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ, timestep) at position u of the scheduler's table (index ``⌊u·N⌋``).

    The index is clamped to the table: mode sampling maps a draw of exactly 0 to u = 1, and a
    float32 sigmoid rounds far-out normals to 1 (diffusers' script would index past the end).
    """
    n = noise_scheduler.config.num_train_timesteps
    index = (u * n).long().clamp(max=n - 1).cpu()
    sigmas = noise_scheduler.sigmas[index].to(u.device, torch.float32)
    return sigmas, noise_scheduler.timesteps[index].to(u.device)


def loss_weights(sigmas: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-example loss weights: 1, σ⁻² (``sigma_sqrt``) or 2 / (π(1 − 2σ + 2σ²)) (``cosmap``)."""
    if weighting == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def predict(
    transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    """The transformer's velocity prediction for ``noisy`` at ``timesteps``."""
    return transformer(
        hidden_states=noisy,
        timestep=timesteps,
        encoder_hidden_states=cond.hidden,
        pooled_projections=cond.text_embeds,
        return_dict=False,
    )[0]


def flow_matching_loss(
    transformer: torch.nn.Module,
    noise_scheduler: Any,
    latents: torch.Tensor,
    cond: Conditioning,
    rand: ExampleRandom,
    config: FlowMatchingConfig,
    noise_offset: float = 0.0,
) -> torch.Tensor:
    """The mean flow-matching loss of one batch.

    Args:
        transformer: SD3's transformer (possibly DDP-wrapped, possibly under autocast).
        noise_scheduler: The model's ``FlowMatchEulerDiscreteScheduler`` (its σ table).
        latents: Clean latents x₀ in latent units (shifted and scaled), (B, 16, h, w).
        cond: The text conditioning (hidden states and pooled projections).
        rand: Per-example source of the noise and the σ positions.
        config: The ``[flow_matching]`` table.
        noise_offset: See ``trainer.run.step.sample_noise``.
    """
    noise = sample_noise(latents, rand, noise_offset)
    table = training_scheduler(noise_scheduler, config.shift)
    sigmas, timesteps = table_position(table, density(rand, config))
    sigma = _broadcast(sigmas, latents)
    noisy = (1.0 - sigma) * latents + sigma * noise
    target = noise - latents
    prediction = predict(transformer, noisy, timesteps, cond)
    # Weighted inside the mean, as diffusers' script does (the same sums, the same rounding).
    weights = _broadcast(loss_weights(sigmas, config.loss_weighting).float(), prediction.float())
    error = weights * (prediction.float() - target.float()) ** 2
    return error.reshape(error.shape[0], -1).mean(dim=1).mean()


def fixed_positions(count: int) -> torch.Tensor:
    """``count`` evenly spaced positions u_k = (k + ½) / count of the σ table."""
    return (torch.arange(count, dtype=torch.float64) + 0.5) / count


@torch.no_grad()
def fixed_sigma_loss(
    transformer: torch.nn.Module,
    noise_scheduler: Any,
    batches: Iterable[tuple[Conditioning, torch.Tensor, torch.Tensor, list[int]]],
    count: int,
    device: torch.device | str,
) -> tuple[float, dict[int, float]]:
    """The validation loss: plain MSE against ``ε − x₀`` at ``count`` fixed σ per example, and
    its mean at each of those σ, keyed by the (rounded) timestep the model sees there.

    The σ are read from the model's own table, whatever ``[flow_matching]`` says (density,
    shift, weighting are training choices): runs of a sweep that differ in them are scored at
    the same σ, on the same noise.

    Args:
        transformer: The unwrapped transformer with adapters.
        noise_scheduler: The model's flow-matching scheduler.
        batches: Per batch: its conditioning, posterior mean and std, and draw seeds.
        count: Fixed σ per example (``validation.timesteps``).
        device: Where the models are.
    """
    positions: list[float] = fixed_positions(count).tolist()
    total, n = 0.0, 0
    per_position = dict.fromkeys(positions, 0.0)
    keys: dict[float, int] = {}
    for cond, mean, std, seeds in batches:
        rand = ExampleRandom(seeds, device)
        latents = sample_latents(mean.to(device), std.to(device), rand)
        noise = rand.randn(latents.shape[1:])
        for u in positions:
            at = torch.full((len(seeds),), float(u), dtype=torch.float64)
            sigmas, timesteps = table_position(noise_scheduler, at)
            keys[u] = round(float(timesteps[0]))
            sigma = _broadcast(sigmas.to(device), latents)
            noisy = (1.0 - sigma) * latents + sigma * noise
            pred = predict(transformer, noisy, timesteps.to(device), cond)
            error = (pred.float() - (noise - latents).float()) ** 2
            summed = error.reshape(len(seeds), -1).mean(dim=1).sum().item()
            total += summed
            per_position[u] += summed
            n += len(seeds)
    examples = n // len(positions)
    return total / n, {keys[u]: v / examples for u, v in per_position.items()}
