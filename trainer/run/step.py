"""The latent-diffusion loss for one batch, as pure functions of their inputs.

Every random draw comes from :class:`ExampleRandom`: one generator per example, seeded from the
example's draw seed (which depends only on the run seed and where the example sits in the
run). So a resumed run draws exactly the noise and timesteps the uninterrupted run drew, with
no RNG state to save, and the draws do not depend on how a global batch is split across
processes: two processes of batch 2 see the same noise as one process of batch 4.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from trainer.models.conditioning import Conditioning

log = logging.getLogger("sdlora")


class ExampleRandom:
    """One ``torch.Generator`` per example; draws are stacked along the batch dimension."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal draws of ``shape`` per example: a (batch, *shape) tensor."""
        return torch.stack(
            [
                torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype)
                for g in self.generators
            ]
        )

    def randint(self, high: int) -> torch.Tensor:
        """One integer in [0, high) per example."""
        return torch.cat(
            [torch.randint(0, high, (1,), generator=g, device=self.device) for g in self.generators]
        )


def sample_latents(mean: torch.Tensor, std: torch.Tensor, rand: ExampleRandom) -> torch.Tensor:
    """Draw from the VAE's diagonal Gaussian posterior (what ``latent_dist.sample`` does).

    Kept here, not in diffusers, so cached (mean, std) and freshly encoded images draw the same
    sample from the same generators.
    """
    return mean + std * rand.randn(mean.shape[1:], mean.dtype)


def sample_noise(
    latents: torch.Tensor, rand: ExampleRandom, noise_offset: float = 0.0
) -> torch.Tensor:
    """Gaussian noise like ``latents``; ``noise_offset`` adds a per-(sample, channel) constant,
    which lets the model learn to shift mean brightness (Guttenberg, 2023)."""
    noise = rand.randn(latents.shape[1:], latents.dtype)
    if noise_offset:
        offset = rand.randn((latents.shape[1], 1, 1), latents.dtype)
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
    cond: Conditioning,
    rand: ExampleRandom,
    noise_offset: float = 0.0,
    snr_gamma: float = 0.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mean latent-diffusion loss of one batch: each example's mean over its latent,
    weighted, then the mean over the batch (kohya's reduction).

    Args:
        unet: UNet (possibly DDP-wrapped, possibly under autocast).
        noise_scheduler: A diffusers noise scheduler with ``add_noise`` and ``alphas_cumprod``.
        latents: Clean latents x₀ in latent units, shape (B, 4, h, w).
        cond: The text (and SDXL size) conditioning (``trainer.models.conditioning``).
        rand: Per-example source of the noise and timesteps.
        noise_offset: See :func:`sample_noise`.
        snr_gamma: Min-SNR-γ; 0 gives the plain mean squared error.
        weights: Each example's loss weight (a subset's ``loss_weight``, the prior loss
            weight of a regularisation image); None weighs every example 1.
    """
    noise = sample_noise(latents, rand, noise_offset)
    timesteps = rand.randint(noise_scheduler.config.num_train_timesteps)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = training_target(noise_scheduler, latents, noise, timesteps)
    prediction = unet(noisy, timesteps, **cond.unet_kwargs(), return_dict=False)[0]
    if not snr_gamma and weights is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
    if snr_gamma:
        per_sample = per_sample * min_snr_weights(
            snr(noise_scheduler.alphas_cumprod, timesteps),
            snr_gamma,
            noise_scheduler.config.prediction_type,
        )
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device, per_sample.dtype)
    return per_sample.mean()
