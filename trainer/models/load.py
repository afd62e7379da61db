"""Load the frozen Stable Diffusion components the trainer needs (SD 1.x, SD 2.x, SDXL; SD3's
own loading is ``trainer/models/sd3.py``, dispatched from here).

One path for every source a user has: a local diffusers folder or a hub id go through
``from_pretrained``; a single ``.safetensors`` checkpoint (A1111/ComfyUI style) goes through
the pipeline's ``from_single_file``. Only safetensors weights are accepted. Which family the
model is (``model.arch``) is decided before any weights load (``trainer/models/family.py``); the
VAE and the dtype it runs in are chosen here (``vae_dtype``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# From the submodules, not `diffusers`: to a type checker, diffusers' top-level names are the
# placeholder classes it defines for a missing torch (its __init__ imports those first).
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from trainer.config.load import ModelConfig
from trainer.errors import UserError
from trainer.models import family
from trainer.models.accessors import move
from trainer.models.source import is_single_file

log = logging.getLogger(__name__)


class ModelLoadError(UserError, RuntimeError):
    """The base model could not be loaded; the message says what to check."""


@dataclass
class Components:
    """The parts of an SD pipeline that training uses.

    ``tokenizer_2`` and ``text_encoder_2`` are SDXL's and SD3's second pair (None for SD
    1.x/2.x); ``tokenizer_3`` and ``text_encoder_3`` SD3's T5 (``trainer/models/sd3.py``: the
    encoder slot always holds a module, the tokenizer is None when T5 is off). ``unet`` is the
    denoiser LoRA adapts: SD3's is its ``SD3Transformer2DModel``. ``vae_note`` says which VAE
    runs and in which dtype, for the run's log line; ``variant`` is SD3's (``5-medium``...).
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    architecture: str = "sd1"
    vae_note: str = ""
    tokenizer_3: Any = None
    text_encoder_3: torch.nn.Module | None = None
    variant: str = ""
    t5_max_length: int = 0

    @property
    def tokenizers(self) -> list[Any]:
        """Every tokenizer, in pipeline order."""
        return [t for t in (self.tokenizer, self.tokenizer_2, self.tokenizer_3) if t is not None]

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """Every text encoder, in pipeline order (the frozen modules as loaded)."""
        encoders = (self.text_encoder, self.text_encoder_2, self.text_encoder_3)
        return [t for t in encoders if t is not None]


def load_components(
    config: ModelConfig, dtype: torch.dtype = torch.float32, architecture: str = "sd1"
) -> Components:
    """Load tokenizers, text encoders, VAE, UNet and the training noise scheduler, frozen.

    Args:
        config: The ``[model]`` table.
        dtype: dtype of the frozen weights (the mixed-precision compute dtype saves memory);
            the VAE may run in fp32 instead (:func:`vae_dtype`).
        architecture: ``sd1``, ``sd2``, ``sdxl`` or ``sd3``, as preflight resolved
            ``model.arch``.

    Raises:
        ModelLoadError: naming the source and what to check, also when the loaded model is
            not of ``architecture`` (a single file preflight could not tell).
    """
    source = config.pretrained
    sdxl = architecture == "sdxl"
    try:
        if architecture == "sd3":
            from trainer.models import sd3

            parts = sd3.load(config, dtype)
        elif is_single_file(source):
            parts = _load_single_file(config, dtype, sdxl)
        else:
            parts = _load_folder(config, dtype, sdxl)
        if config.vae:
            parts.vae = _load_vae(config.vae)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as err:
        where = "folder" if Path(source).exists() else "hub id"
        raise ModelLoadError(
            f"model.pretrained = {source!r}: could not load it as a diffusers {where}: {err}"
        ) from err
    # The UNet alone decides: a single file's pipeline class was chosen from `architecture`.
    loaded_sdxl = architecture != "sd3" and family.from_unet(parts.unet.config, ()).name == "sdxl"
    if loaded_sdxl != sdxl:
        raise ModelLoadError(
            f"model.pretrained = {source!r}: loaded as {architecture}, but its UNet "
            f"{'is' if loaded_sdxl else 'is not'} an SDXL UNet; set model.arch to match"
        )
    parts.architecture = architecture
    if config.prediction_type:
        parts.noise_scheduler.register_to_config(prediction_type=config.prediction_type)
    vae_type, why = vae_dtype(parts.vae, dtype, architecture)
    if parts.vae.dtype != vae_type:
        move(parts.vae, dtype=vae_type)
    name = "the model's own" if not config.vae else _source_name(config.vae)
    parts.vae_note = f"{name}, {str(vae_type).removeprefix('torch.')}" + (
        f" ({why})" if why else ""
    )
    for module in (*parts.text_encoders, parts.vae, parts.unet):
        module.requires_grad_(False)
        module.eval()
    return parts


def vae_dtype(vae: AutoencoderKL, dtype: torch.dtype, architecture: str) -> tuple[torch.dtype, str]:
    """The dtype the VAE runs in, and why when it is not the weights' dtype.

    SDXL's VAE overflows in fp16 (its activations exceed fp16's 65504, so latents turn NaN);
    its config says so with ``force_upcast``, which diffusers' SDXL pipeline honours, and so
    do we: that VAE runs in fp32 under fp16 mixed precision. A VAE fixed for fp16 (the
    fp16-fix VAE, named by ``model.vae``) sets ``force_upcast`` false and runs in fp16. SD 1.x
    and 2.x pipelines never read the flag (AutoencoderKL's default sets it on every VAE), and
    their VAEs run in fp16. Any fp16 VAE that still overflows on a batch is caught by
    ``trainer.models.vae.posterior``, which encodes that batch in fp32.
    """
    if dtype == torch.float16 and architecture == "sdxl" and vae.config.get("force_upcast"):
        return torch.float32, "force_upcast: fp16 overflows in this VAE"
    return dtype, ""


def _source_name(source: str) -> str:
    """A source as the log shows it: a hub id as written, a local path by its last part."""
    path = Path(source).expanduser()
    return path.name if path.exists() else source


def _load_vae(source: str) -> AutoencoderKL:
    """A VAE from ``model.vae``: a diffusers AutoencoderKL folder (or a model folder with
    ``vae/``), or a hub id."""
    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        return AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True)
    return AutoencoderKL.from_pretrained(source, use_safetensors=True)


def _load_folder(config: ModelConfig, dtype: torch.dtype, sdxl: bool) -> Components:
    kwargs: dict[str, Any] = {"revision": config.revision or None}
    weights: dict[str, Any] = {**kwargs, "variant": config.variant or None, "use_safetensors": True}
    weights["torch_dtype"] = dtype
    source = config.pretrained
    parts = Components(
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs),
        text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights),
        # fp32 here, cast once it is known which dtype the VAE runs in (vae_dtype).
        vae=AutoencoderKL.from_pretrained(
            source, subfolder="vae", **{k: v for k, v in weights.items() if k != "torch_dtype"}
        ),
        unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights),
        # The training noise schedule is DDPM's forward process, whatever sampler the
        # checkpoint ships for inference (SD-1.5 ships PNDM, SDXL Euler); the betas are
        # the same.
        noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs),
    )
    if sdxl:
        parts.tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kwargs)
        parts.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            source, subfolder="text_encoder_2", **weights
        )
    return parts


def _load_single_file(config: ModelConfig, dtype: torch.dtype, sdxl: bool) -> Components:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(config.pretrained)
    if path.suffix != ".safetensors":
        raise ModelLoadError(
            f"model.pretrained = {config.pretrained!r}: only .safetensors checkpoints are "
            "loaded (a .ckpt/.pt/.bin file can run pickled code); convert it first"
        )
    if not path.is_file():
        raise ModelLoadError(f"model.pretrained = {config.pretrained!r}: no such file")
    extra = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    pipeline = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = pipeline.from_single_file(
        str(path), config=config.single_file_config or None, torch_dtype=dtype, **extra
    )
    return Components(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        unet=pipe.unet,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
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
