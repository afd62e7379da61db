"""The VAE's encode: pixels to the posterior's mean and std, in latent units.

Used by training (uncached batches), the latent cache and validation alike, so all three see
the same latents for the same pixels.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from trainer.models.accessors import move

if TYPE_CHECKING:
    from diffusers.models import AutoencoderKL

log = logging.getLogger("sdlora")


def posterior(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode pixels in [-1, 1] to the VAE posterior's (mean, std), in latent units: the
    posterior of ``(z − shift_factor) · scaling_factor``, the latents SD3's VAE (16 channels,
    ``shift_factor`` 0.0609) feeds its transformer; SD 1.x/SDXL VAEs have no shift.

    An fp16 VAE whose activations overflow (SDXL's own VAE does; ``models.vae_dtype`` runs it
    in fp32 when its config says so) would return NaN latents and train on them silently.
    So an fp16 encode is checked: a batch that is not finite is encoded again with the VAE
    upcast to fp32 for that call. fp16 → fp32 → fp16 is exact, so the weights are unchanged
    after it, and whether a batch is upcast depends only on the batch: resume stays exact.

    Raises:
        FloatingPointError: the latents are not finite even in fp32 (a broken VAE or image).
    """
    dist = vae.encode(pixels).latent_dist
    mean, std = _latent_units(vae, dist)
    if pixels.dtype != torch.float16 or (mean.isfinite().all() and std.isfinite().all()):
        return mean, std
    if not getattr(vae, "_sdlora_upcast_warned", False):
        vae._sdlora_upcast_warned = True  # type: ignore[assignment]  # stub: tensors only
        log.warning(
            "the VAE overflowed in fp16 (non-finite latents); such batches are encoded in fp32. "
            "Set model.vae to a VAE made for fp16 (for SDXL: madebyollin/sdxl-vae-fp16-fix), "
            "or keep this VAE and let it run in fp32 by setting force_upcast in its config"
        )
    move(vae, torch.float32)
    try:
        dist = vae.encode(pixels.float()).latent_dist
    finally:
        move(vae, torch.float16)
    mean, std = _latent_units(vae, dist)
    if not (mean.isfinite().all() and std.isfinite().all()):
        raise FloatingPointError(
            "the VAE gives non-finite latents even in fp32; check model.vae and the images"
        )
    return mean, std


def _latent_units(vae: torch.nn.Module, dist: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior's mean and std shifted and scaled as the VAE's config says."""
    config: Any = vae.config
    scale, shift = config.scaling_factor, config.get("shift_factor") or 0.0
    mean = (dist.mean - shift) * scale if shift else dist.mean * scale
    return mean, dist.std * scale
