"""Load the frozen Stable Diffusion components the trainer needs.

One path for every source a user has: a local diffusers folder or a hub id go through
``from_pretrained``; a single ``.safetensors`` checkpoint (A1111/ComfyUI style) goes through
``StableDiffusionPipeline.from_single_file``. Only safetensors weights are accepted.
"""

from __future__ import annotations

import logging
import os
import re
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


# A hub id is "owner/name" (or a bare "name" of a legacy repo): no leading dot, slash or tilde.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# The files a diffusers SD folder must hold, whatever its weights format.
FOLDER_CONFIGS = ("unet/config.json", "vae/config.json", "text_encoder/config.json")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def source_problems(config: ModelConfig, hub_timeout: float = 10.0) -> list[str]:
    """Why ``model.pretrained`` cannot be loaded, found in seconds without reading weights.

    A local path that does not exist is called a missing path; a folder that is not a
    diffusers model says which file it lacks; a hub id is looked up in the local cache, and
    online with one short request (a typo'd id would otherwise be retried for minutes).
    """
    source = config.pretrained
    key = f"model.pretrained = {source!r}"
    path = Path(source).expanduser()
    if _is_single_file(source):
        if path.suffix != ".safetensors":
            return [
                f"{key}: only .safetensors checkpoints are loaded (a .ckpt/.pt/.bin file can "
                "run pickled code); convert it first"
            ]
        return [] if path.is_file() else [f"{key}: no such file ({path.resolve()})"]
    if path.is_dir():
        missing = [name for name in FOLDER_CONFIGS if not (path / name).is_file()]
        if missing:
            return [
                f"{key}: the folder is not a diffusers Stable Diffusion model (no "
                f"{', '.join(missing)}); point it at a folder with model_index.json, unet/, "
                "vae/, text_encoder/ and tokenizer/, or at a .safetensors checkpoint"
            ]
        return []
    if path.exists():
        return [f"{key}: not a folder or a .safetensors file"]
    if not _HUB_ID.match(source) or source.count("/") > 1:
        return [f"{key}: no such folder ({path.resolve()})"]
    return _hub_problems(config, key, path, hub_timeout)


def _hub_problems(config: ModelConfig, key: str, path: Path, timeout: float) -> list[str]:
    import huggingface_hub
    from huggingface_hub.utils import HfHubHTTPError, RepositoryNotFoundError

    source, revision = config.pretrained, config.revision or None
    cached = huggingface_hub.try_to_load_from_cache(source, "model_index.json", revision=revision)
    if isinstance(cached, str):
        return []
    local = f"no such folder ({path.resolve()})"
    if _offline():
        return [
            f"{key}: {local}, and as a hub id it is not in the local cache while offline "
            "(HF_HUB_OFFLINE=1); fix the path, or download the model once with network access"
        ]
    try:
        huggingface_hub.model_info(source, revision=revision, timeout=timeout)
    except RepositoryNotFoundError:
        return [
            f"{key}: {local}, and no model of that id exists on the hub (or it is private or "
            "gated: log in with `hf auth login`)"
        ]
    except (HfHubHTTPError, OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return [
            f"{key}: {local}, and the hub could not be reached to look it up ({first}); "
            "check the network, or set HF_HUB_OFFLINE=1 to use only the local cache"
        ]
    return []


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
        where = "folder" if Path(source).exists() else "hub id"
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
