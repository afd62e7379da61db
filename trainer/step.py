"""The latent-diffusion loss for one batch, as pure functions of their inputs.

Every random draw takes an explicit ``torch.Generator``: the loop seeds one per micro-batch
from (seed, micro-batch index, process), so a resumed run draws exactly the noise and
timesteps the uninterrupted run would have drawn, with no RNG state to save.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Draw from the VAE's diagonal Gaussian posterior (what ``latent_dist.sample`` does).

    Kept here, not in diffusers, so cached (mean, std) and freshly encoded images draw the same
    sample from the same generator.
    """
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * noise


def posterior(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode pixels in [-1, 1] to the VAE posterior's (mean, std), scaled to latent units."""
    dist = vae.encode(pixels).latent_dist
    scale = vae.config.scaling_factor
    return dist.mean * scale, dist.std * scale


def sample_noise(
    latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0
) -> torch.Tensor:
    """Gaussian noise like ``latents``; ``noise_offset`` adds a per-(sample, channel) constant,
    which lets the model learn to shift mean brightness (Guttenberg, 2023)."""
    shape, device, dtype = latents.shape, latents.device, latents.dtype
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if noise_offset:
        offset = torch.randn((*shape[:2], 1, 1), generator=generator, device=device, dtype=dtype)
        noise = noise + noise_offset * offset
    return noise


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) at each timestep, in fp32."""
    a = alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    return a / (1.0 - a)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al., 2023), for an MSE against ε or against v.

    For ε-prediction the weight is min(SNR, γ) / SNR; for v-prediction the MSE on v already
    carries a factor (SNR + 1), so the weight is min(SNR, γ) / (SNR + 1).
    """
    clipped = torch.clamp(snr_t, max=gamma)
    return clipped / (snr_t + 1.0) if prediction_type == "v_prediction" else clipped / snr_t


def training_target(
    noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should predict: ε, or v = √ᾱ·ε − √(1−ᾱ)·x₀."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(
        f"noise scheduler prediction_type {kind!r} is not supported; "
        "set model.prediction_type to 'epsilon' or 'v_prediction'"
    )


def diffusion_loss(
    unet: torch.nn.Module,
    noise_scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    generator: torch.Generator,
    noise_offset: float = 0.0,
    snr_gamma: float = 0.0,
) -> torch.Tensor:
    """The mean latent-diffusion loss of one batch.

    Args:
        unet: UNet (possibly DDP-wrapped, possibly under autocast).
        noise_scheduler: A diffusers noise scheduler with ``add_noise`` and ``alphas_cumprod``.
        latents: Clean latents x₀ in latent units, shape (B, 4, h, w).
        encoder_hidden_states: Text-encoder output, shape (B, 77, D).
        generator: Source of the noise and timesteps.
        noise_offset: See :func:`sample_noise`.
        snr_gamma: Min-SNR-γ; 0 gives the plain mean squared error.
    """
    noise = sample_noise(latents, generator, noise_offset)
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(
        0, steps, (latents.shape[0],), generator=generator, device=latents.device
    )
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = training_target(noise_scheduler, latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
    if not snr_gamma:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
    weights = min_snr_weights(
        snr(noise_scheduler.alphas_cumprod, timesteps),
        snr_gamma,
        noise_scheduler.config.prediction_type,
    )
    return (per_sample * weights).mean()
