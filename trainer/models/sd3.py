"""SD3 (3 and 3.5): its components through diffusers, its text conditioning, and T5's stand-ins.

What differs from SD 1.x/SDXL, and where it lives:

- **Components**: ``StableDiffusion3Pipeline``'s parts, loaded one by one with their own
  ``from_pretrained`` (a single file through the pipeline's ``from_single_file``). The
  MMDiT (``SD3Transformer2DModel``) sits in ``Components.unet``, the slot of the model LoRA
  adapts, so the loop, checkpoints and resume need no second path; LoRA files name it
  ``transformer`` (``trainer/lora/keys.py``).
- **Conditioning** (:func:`encode_ids`), exactly as the pipeline's ``encode_prompt`` with no
  clip skip: the penultimate hidden states of CLIP-L and CLIP-G side by side, padded with zeros
  to T5's width, then T5's last hidden states after them along the sequence; the two CLIPs'
  projected pooled outputs side by side as ``pooled_projections``.
- **T5** is never trained. Its slot always holds a module, so every caller sees three
  encoders: T5 itself; :class:`AbsentT5` when ``model.t5 = false`` (zeros of the pipeline's
  shape, what ``StableDiffusion3Pipeline`` uses without ``text_encoder_3``); or, once its
  outputs for every caption the run will encode are cached, :class:`CachedT5`, and T5's
  weights (about 9.5 GB in fp16) are freed (:func:`settle_t5`).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trainer.config.load import ModelConfig, RunConfig
from trainer.models import family
from trainer.models.load import Components, ModelLoadError

log = logging.getLogger("sdlora")
CHUNK = 8  # captions per T5 call while caching; fixed so values never depend on the run
# The penultimate CLIP layer, as StableDiffusion3Pipeline reads it without clip skip.
CLIP_LAYER = -2


class AbsentT5(torch.nn.Module):
    """T5's place without T5 (``model.t5 = false``): zeros of shape (batch, length, width),
    what ``StableDiffusion3Pipeline`` feeds the transformer when it has no ``text_encoder_3``.

    Args:
        width: The transformer's ``joint_attention_dim`` (T5-XXL's 4096).
        length: Tokens per caption (``model.t5_max_length``, the pipeline's
            ``max_sequence_length``).
    """

    anchor: torch.Tensor

    def __init__(self, width: int, length: int) -> None:
        super().__init__()
        self.width, self.length = width, length
        # No weights; this empty buffer follows .to() so outputs land on the right device.
        self.register_buffer("anchor", torch.zeros(0), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        shape = (input_ids.shape[0], self.length, self.width)
        return (torch.zeros(shape, dtype=self.anchor.dtype, device=self.anchor.device),)


class CachedT5(torch.nn.Module):
    """T5's outputs by token ids, for T5 freed from memory: the same call, the same values.

    Keyed by the ids, not the text, so whoever tokenizes (the dataset, the validation set,
    ``StableDiffusion3Pipeline`` for samples) gets the output T5 gave for exactly those ids.
    """

    anchor: torch.Tensor

    def __init__(self, table: dict[tuple[int, ...], torch.Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        self.table = table
        self.register_buffer("anchor", torch.zeros(0, dtype=dtype), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor]:
        rows = []
        for ids in input_ids.tolist():
            try:
                rows.append(self.table[tuple(ids)])
            except KeyError:
                raise RuntimeError(
                    "T5 was freed after caching the run's captions, and a caption outside them "
                    "reached it; set data.cache_text = 'off' to keep T5 loaded"
                ) from None
        out = torch.stack(rows).to(self.anchor.device, self.anchor.dtype)
        return (out,)


# ---------------------------------------------------------------- loading


def load(config: ModelConfig, dtype: torch.dtype) -> Components:
    """SD3's components, frozen weights in ``dtype`` (the VAE in fp32 until ``vae_dtype``).

    Raises:
        ModelLoadError: for a file that is not ``.safetensors``.
        OSError, ValueError: from diffusers/transformers when the source is not an SD3 model.
    """
    from trainer.models.source import is_single_file

    if is_single_file(config.pretrained):
        return _load_single_file(config, dtype)
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
    )
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer

    source = config.pretrained
    hub: dict[str, Any] = {"revision": config.revision or None}
    weights: dict[str, Any] = {
        **hub,
        "variant": config.variant or None,
        "use_safetensors": True,
        "torch_dtype": dtype,
    }
    fp32 = {k: v for k, v in weights.items() if k != "torch_dtype"}
    loaded: dict[str, Any] = {
        "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub),
        "text_encoder": CLIPTextModelWithProjection.from_pretrained(
            source, subfolder="text_encoder", **weights
        ),
        "tokenizer_2": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **hub),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
            source, subfolder="text_encoder_2", **weights
        ),
        "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", **fp32),
        "unet": SD3Transformer2DModel.from_pretrained(source, subfolder="transformer", **weights),
        "noise_scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(
            source, subfolder="scheduler", **hub
        ),
    }
    if config.t5:
        from transformers import T5EncoderModel

        # AutoTokenizer: T5's fast tokenizer under transformers 4 and 5 alike.
        loaded["tokenizer_3"] = AutoTokenizer.from_pretrained(
            source, subfolder="tokenizer_3", **hub
        )
        loaded["text_encoder_3"] = T5EncoderModel.from_pretrained(
            source, subfolder="text_encoder_3", **weights
        )
    parts = Components(**loaded)
    return _finish(parts, config)


def _load_single_file(config: ModelConfig, dtype: torch.dtype) -> Components:
    from diffusers import StableDiffusion3Pipeline

    path = Path(config.pretrained)
    if path.suffix != ".safetensors":
        raise ModelLoadError(
            f"model.pretrained = {config.pretrained!r}: only .safetensors checkpoints are "
            "loaded (a .ckpt/.pt/.bin file can run pickled code); convert it first"
        )
    extra = {} if config.t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_single_file(
        str(path), config=config.single_file_config or None, torch_dtype=dtype, **extra
    )
    pipe_: Any = pipe
    if config.t5 and pipe_.text_encoder_3 is None:
        raise ModelLoadError(
            f"model.pretrained = {config.pretrained!r}: the file holds no T5 text encoder; "
            "set model.t5 = false, or model.single_file_config to a folder that has one"
        )
    parts = Components(
        tokenizer=pipe_.tokenizer,
        text_encoder=pipe_.text_encoder,
        vae=pipe_.vae,
        unet=pipe_.transformer,
        noise_scheduler=pipe_.scheduler,
        tokenizer_2=pipe_.tokenizer_2,
        text_encoder_2=pipe_.text_encoder_2,
        tokenizer_3=pipe_.tokenizer_3 if config.t5 else None,
        text_encoder_3=pipe_.text_encoder_3 if config.t5 else None,
    )
    return _finish(parts, config)


def _finish(parts: Components, config: ModelConfig) -> Components:
    """T5's stand-in when it is off, its token length, and the variant."""
    transformer: Any = parts.unet
    if parts.text_encoder_3 is None:
        parts.text_encoder_3 = AbsentT5(
            transformer.config.joint_attention_dim, config.t5_max_length
        )
    else:
        # tokenize() pads and cuts each tokenizer to its model_max_length: T5 to ours.
        parts.tokenizer_3.model_max_length = config.t5_max_length
    parts.t5_max_length = config.t5_max_length
    parts.variant = family.sd3_variant(transformer.config)
    return parts


# ---------------------------------------------------------------- conditioning


def encode_ids(
    encoders: Sequence[torch.nn.Module],
    ids: Sequence[torch.Tensor],
    trained: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's ``encoder_hidden_states`` and ``pooled_projections`` from token ids.

    Args:
        encoders: CLIP-L, CLIP-G, and T5 (or its stand-in), trained ones as prepared.
        ids: Token ids of each tokenizer: CLIP-L's, CLIP-G's and T5's (two when T5 is off:
            its stand-in reads only the batch size).
        trained: Whether each encoder is trained (T5 never is).
    """
    states, pooled = [], []
    for encoder, token_ids, grad in zip(encoders[:2], ids[:2], trained[:2], strict=True):
        with torch.set_grad_enabled(grad):
            out = encoder(token_ids, output_hidden_states=True, return_dict=True)
        states.append(out.hidden_states[CLIP_LAYER])
        pooled.append(out.text_embeds)
    with torch.no_grad():
        t5 = encoders[2](ids[2] if len(ids) > 2 else ids[0])[0]
    clip = torch.cat(states, dim=-1)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)


# ---------------------------------------------------------------- T5 cached and freed


def t5_cacheable(config: RunConfig) -> bool:
    """Whether T5's outputs can be cached up front: T5 is loaded, and every caption is known
    before training (no tag shuffling; ``data.cache_text = 'off'`` keeps T5 as asked)."""
    data = config.data
    return config.model.t5 and not data.shuffle_tags and data.cache_text != "off"


def run_captions(config: RunConfig, *examples: Iterable[Any]) -> set[str]:
    """Every text T5 will see in a run: the examples' captions (training and held-out), the
    empty caption (caption dropout, and the unconditional half of guided samples), and the
    sample prompts and negative prompt."""
    captions = {e.caption for group in examples for e in group}
    val = config.validation
    return captions | {"", val.negative_prompt, *val.prompts}


@torch.no_grad()
def cache_t5(parts: Components, captions: Iterable[str]) -> int:
    """Encode ``captions`` with T5 (sorted, in fixed chunks), put :class:`CachedT5` in its
    slot and free T5's weights; return how many captions were encoded."""
    from trainer.models.conditioning import tokenize

    t5: Any = parts.text_encoder_3
    device = next(t5.parameters()).device
    table: dict[tuple[int, ...], torch.Tensor] = {}
    ordered = sorted(set(captions))
    for start in range(0, len(ordered), CHUNK):
        ids = tokenize([parts.tokenizer_3], ordered[start : start + CHUNK])[0]
        out = t5(ids.to(device))[0]
        for row, state in zip(ids.tolist(), out, strict=True):
            table[tuple(row)] = state.cpu()
    cached = CachedT5(table, t5.dtype).to(device)
    parts.text_encoder_3 = cached
    del t5
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return len(ordered)


def settle_t5(parts: Components, config: RunConfig, *examples: Iterable[Any]) -> None:
    """Cache T5's outputs for the run and free it, where the run's captions are all known."""
    if not t5_cacheable(config):
        if config.model.t5:
            log.info("T5 stays loaded: data.shuffle_tags or data.cache_text = 'off'")
        return
    count = cache_t5(parts, run_captions(config, *examples))
    log.info("T5 outputs cached for %d caption(s); T5 freed from memory", count)


# ---------------------------------------------------------------- sampling


def sampler(parts: Components) -> Any:
    """A fresh flow-matching Euler sampler with the model's own scheduler config (sampling
    moves a scheduler's state; the training one stays untouched)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    noise_scheduler: Any = parts.noise_scheduler
    return FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)


def pipeline(
    parts: Components,
    transformer: torch.nn.Module,
    encoders: Sequence[torch.nn.Module],
    noise_sampler: Any,
) -> Any:
    """``StableDiffusion3Pipeline`` around the live (adapted) modules; without T5 when it is
    off, as SD3 runs without it."""
    from diffusers import StableDiffusion3Pipeline

    t5 = encoders[2] if len(encoders) > 2 else None
    absent = isinstance(t5, AbsentT5)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=noise_sampler,
        vae=parts.vae,
        text_encoder=encoders[0],
        tokenizer=parts.tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=parts.tokenizer_2,
        text_encoder_3=None if absent else t5,
        tokenizer_3=None if absent else parts.tokenizer_3,
    )
