"""Load the frozen Stable Diffusion components the trainer needs.

One path for every source a user has: a local diffusers folder or a hub id go through
``from_pretrained``; a single ``.safetensors`` checkpoint (A1111/ComfyUI style) goes through
``StableDiffusionPipeline.from_single_file``. Only safetensors weights are accepted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from trainer.config import ModelConfig

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The base model could not be loaded; the message says what to check."""


@dataclass
class Components:
    """The parts of an SD pipeline that training uses."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler


def _is_single_file(source: str) -> bool:
    return source.endswith((".safetensors", ".ckpt", ".pt", ".bin"))


def load_components(config: ModelConfig, dtype: torch.dtype = torch.float32) -> Components:
    """Load tokenizer, text encoder, VAE, UNet and the training noise scheduler, frozen.

    Args:
        config: The ``[model]`` table.
        dtype: dtype of the frozen weights (the mixed-precision compute dtype saves memory).

    Raises:
        ModelLoadError: naming the source and what to check.
    """
    source = config.pretrained
    try:
        if _is_single_file(source):
            parts = _load_single_file(config, dtype)
        else:
            parts = _load_folder(config, dtype)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as err:
        where = "folder" if Path(source).exists() else "hub id (offline? set HF_HUB_OFFLINE=0)"
        raise ModelLoadError(
            f"model.pretrained = {source!r}: could not load it as a diffusers {where}: {err}"
        ) from err
    if config.prediction_type:
        parts.noise_scheduler.register_to_config(prediction_type=config.prediction_type)
    for module in (parts.text_encoder, parts.vae, parts.unet):
        module.requires_grad_(False)
        module.eval()
    return parts


def _load_folder(config: ModelConfig, dtype: torch.dtype) -> Components:
    kwargs = {"revision": config.revision or None}
    weights = {**kwargs, "variant": config.variant or None, "use_safetensors": True}
    weights["torch_dtype"] = dtype
    source = config.pretrained
    return Components(
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs),
        text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights),
        vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **weights),
        unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights),
        # The training noise schedule is DDPM's forward process, whatever sampler the
        # checkpoint ships for inference (SD-1.5 ships PNDM); the betas are the same.
        noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs),
    )


def _load_single_file(config: ModelConfig, dtype: torch.dtype) -> Components:
    from diffusers import StableDiffusionPipeline

    path = Path(config.pretrained)
    if path.suffix != ".safetensors":
        raise ModelLoadError(
            f"model.pretrained = {config.pretrained!r}: only .safetensors checkpoints are "
            "loaded (a .ckpt/.pt/.bin file can run pickled code); convert it first"
        )
    if not path.is_file():
        raise ModelLoadError(f"model.pretrained = {config.pretrained!r}: no such file")
    pipe = StableDiffusionPipeline.from_single_file(
        str(path),
        config=config.single_file_config or None,
        torch_dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
    )
    return Components(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        unet=pipe.unet,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
    )


def enable_attention_backend(unet: UNet2DConditionModel, want_xformers: bool) -> str:
    """Pick the attention kernel; return its name. xformers is optional and CUDA-only."""
    if not want_xformers:
        return "sdpa"
    if not torch.cuda.is_available():
        log.warning("train.xformers: CUDA is not available; falling back to PyTorch SDPA")
        return "sdpa"
    try:
        import xformers  # noqa: F401

        unet.enable_xformers_memory_efficient_attention()
    except Exception as err:  # import error or a kernel that does not support this GPU
        log.warning("train.xformers: xformers unusable (%s); falling back to PyTorch SDPA", err)
        return "sdpa"
    return "xformers"
