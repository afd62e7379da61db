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

from trainer.models.conditioning import Conditioning
from trainer.run.loss import (  # noqa: F401  (snr and min_snr_weights: step's names too)
    LossOptions,
    batch_loss,
    min_snr_weights,
    sample_timesteps,
    snr,
)

log = logging.getLogger("sdlora")


PLAIN = LossOptions()  # the plain MSE with uniform timesteps


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

    def rand(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform draws in [0, 1) of ``shape`` per example: a (batch, *shape) tensor."""
        return torch.stack(
            [
                torch.rand(tuple(shape), generator=g, device=self.device, dtype=dtype)
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
    options: LossOptions = PLAIN,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The latent-diffusion loss of one batch (``trainer/run/loss.py``: its options and how it
    is reduced).

    Args:
        unet: UNet (possibly DDP-wrapped, possibly under autocast).
        noise_scheduler: A diffusers noise scheduler with ``add_noise`` and ``alphas_cumprod``.
        latents: Clean latents x₀ in latent units, shape (B, 4, h, w).
        cond: The text (and SDXL size) conditioning (``trainer.models.conditioning``).
        rand: Per-example source of the noise and timesteps.
        options: Noise offset, timestep sampling, the loss and its weights.
        weights: Each example's loss weight (a subset's ``loss_weight``, the prior loss
            weight of a regularisation image); None weighs every example 1.
        mask: Each example's loss mask at the latent's size (``train.masked_loss``).
    """
    noise = sample_noise(latents, rand, options.noise_offset)
    timesteps = sample_timesteps(rand, noise_scheduler.config.num_train_timesteps, options)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = training_target(noise_scheduler, latents, noise, timesteps)
    prediction = unet(noisy, timesteps, **cond.unet_kwargs(), return_dict=False)[0]
    return batch_loss(prediction, target, timesteps, noise_scheduler, options, weights, mask)
