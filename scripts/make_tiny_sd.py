"""Write a random, offline Stable Diffusion model (SD 1.x, SDXL or SD 3.5) in the diffusers layout.

The folder loads with ``StableDiffusionPipeline.from_pretrained(OUT_DIR)`` (SDXL:
``StableDiffusionXLPipeline``) under ``HF_HUB_OFFLINE=1``, so the trainer's real loading path
is the one the tests exercise. Every preset uses the same locally built CLIP tokenizer (77
tokens); SDXL's second tokenizer differs from the first only by its padding token, as in the
published model.

Presets (``--preset``), per architecture (``--arch``):
- ``sd15`` ``tiny`` (default): SD-1.x proportions where they change code paths or cost shape:
  the VAE downsamples by 8 (four blocks) into 4 latent channels with SD's scaling factor, and
  the UNet has cross-attention blocks. Channel widths and layer counts are tiny (about 6 MB).
- ``sd15`` ``sd15-shape``: the published SD-1.5 shapes (UNet 860 M parameters, VAE 84 M, CLIP
  ViT-L/14 text encoder 123 M), randomly initialised and written in fp16 (about 2.1 GB), so
  throughput and memory can be measured at real scale without a download.
- ``sdxl`` ``tiny``: SDXL's layout where it changes code paths: two text encoders (a
  ``CLIPTextModel`` and a ``CLIPTextModelWithProjection``) whose penultimate states together
  are the cross-attention width, the pooled projection and six size/crop ids as added
  conditioning (``addition_embed_type = "text_time"``), SDXL's block layout (three levels, two
  resnets each, no attention at the first, deeper transformers at the last) so kohya's
  original-layout key names apply, a VAE of factor 8 with SDXL's scaling factor and
  ``force_upcast``, and an Euler noise scheduler config. Widths are tiny (about 5 MB).
- ``sdxl`` ``sdxl-shape``: the published SDXL base 1.0 shapes (UNet 2.57 G parameters, VAE
  84 M, CLIP ViT-L 123 M, OpenCLIP ViT-bigG 695 M), in fp16 (about 6.9 GB).
- ``sd3`` ``tiny`` and ``sd35-medium-shape``: SD 3.5 (an MMDiT, CLIP-L, CLIP-G and T5, a
  16-channel VAE, flow matching); see ``scripts/make_tiny_sd3.py``.

The ``*-shape`` presets are random: their outputs mean nothing.

Usage:
    python scripts/make_tiny_sd.py OUT_DIR [--arch sd15|sdxl|sd3]
        [--preset tiny|sd15-shape|sdxl-shape|sd35-medium-shape]
        [--dtype fp32|fp16|bf16] [--prediction-type v_prediction] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from make_tiny_sd3 import SD3_PRESETS, write_sd3

SD_SCALING_FACTOR = 0.18215
SDXL_SCALING_FACTOR = 0.13025
MAX_TOKENS = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Merges for the letters our synthetic captions use most, so tokens are not all single bytes.
_MERGES = [
    ("r", "e"), ("e", "d</w>"), ("r", "ed</w>"), ("l", "u"), ("b", "lu"), ("e", "</w>"),
    ("blu", "e</w>"), ("c", "i"), ("r", "c"), ("ci", "rc"), ("q", "u"), ("s", "qu"),
    ("a", "r"), ("e", "</w>"), ("o", "n"), ("a", "n"), ("t", "h"), ("th", "e</w>"),
]  # fmt: skip


def _bytes_to_unicode() -> dict[int, str]:
    """Byte → printable unicode map of byte-level BPE (GPT-2/CLIP); avoids whitespace/control."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def write_tokenizer(out: Path, pad_token: str = EOS) -> int:
    """Write a CLIP byte-level BPE tokenizer built from scratch; return its vocab size.

    Args:
        out: The tokenizer folder.
        pad_token: SD's tokenizers pad with the end token; SDXL's second pads with ``!``.
    """
    out.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for pair in _MERGES:
        merged = pair[0] + pair[1]
        if pair not in merges and merged not in tokens:
            merges.append(pair)
            tokens.append(merged)
    tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # Loaders other than transformers 5 (kohya, transformers 4) also read these two files.
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "do_lower_case": True,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab)


@dataclass(frozen=True)
class Preset:
    """Constructor arguments of one model size.

    Attributes:
        unet: ``UNet2DConditionModel`` keyword arguments.
        vae: ``AutoencoderKL`` keyword arguments.
        text_encoder: ``CLIPTextConfig`` keyword arguments; ``vocab_size`` None means the
            local tokenizer's size, and the special-token ids always come from the tokenizer.
        dtype: dtype of the written weights unless the caller asks for another.
        text_encoder_2: SDXL's second text encoder (``CLIPTextModelWithProjection``), in the
            same form; None for one text encoder.
    """

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    dtype: str = "fp32"
    text_encoder_2: dict[str, Any] | None = None


@dataclass(frozen=True)
class Arch:
    """One model family: how to write its folder, and its presets by name."""

    write: Callable[..., Path]
    presets: dict[str, Preset] = field(default_factory=dict)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

TINY_SD15 = Preset(
    unet=dict(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    vae=dict(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        scaling_factor=SD_SCALING_FACTOR,
    ),
    text_encoder=dict(
        vocab_size=None,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=32,
    ),
)

# SD 1.5's vae/config.json, and CLIP ViT-L/14's text config: the published values, which
# SD 1.5 and SDXL base both use (SDXL with its own VAE scaling), written out in full.
SD_VAE = dict(
    sample_size=512,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=SD_SCALING_FACTOR,
)
CLIP_VIT_L = dict(
    # The real vocabulary size keeps the embedding's real shape; the local tokenizer's ids
    # are all below it.
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=MAX_TOKENS,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
)

# The values of stable-diffusion-v1-5's unet/, vae/ and text_encoder/ config.json (the text
# encoder is CLIP ViT-L/14's). Written out in full, not left to library defaults, so a change
# of a default in diffusers or transformers cannot change the shapes.
SD15_SHAPE = Preset(
    unet=dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    vae=SD_VAE,
    text_encoder=CLIP_VIT_L,
    dtype="fp16",  # 2.1 GB instead of 4.3; training loads it in its own compute dtype
)

# SDXL's component layout at tiny widths. The UNet keeps SDXL base's block structure (kohya's
# original-layout key names depend on it: two resnets per level, attention only at levels 1
# and 2, up blocks mirrored) and its added conditioning: 6 time ids of `addition_time_embed_dim`
# each, concatenated with text_encoder_2's projection (6 × 8 + 32 = 80; SDXL: 6 × 256 + 1280).
# The cross-attention width is the two encoders' hidden widths together (32 + 64; SDXL: 768 +
# 1280).
TINY_SDXL = Preset(
    unet=dict(
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=96,
        norm_num_groups=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
    ),
    vae=dict(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        scaling_factor=SDXL_SCALING_FACTOR,
        force_upcast=True,  # SDXL's own VAE overflows in fp16; its config says so
    ),
    text_encoder=dict(
        vocab_size=None,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu",
        projection_dim=32,
    ),
    text_encoder_2=dict(
        vocab_size=None,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="gelu",
        projection_dim=32,
    ),
)

# The values of stable-diffusion-xl-base-1.0's unet/, vae/, text_encoder/ (CLIP ViT-L/14) and
# text_encoder_2/ (OpenCLIP ViT-bigG/14) config.json, written out in full.
SDXL_SHAPE = Preset(
    unet=dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_embed_type_num_heads=64,
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
    # SDXL's VAE is SD's architecture, retrained: other scaling factor, and it overflows in
    # fp16, which its config says with force_upcast.
    vae={
        **SD_VAE,
        "sample_size": 1024,
        "scaling_factor": SDXL_SCALING_FACTOR,
        "force_upcast": True,
    },
    text_encoder=CLIP_VIT_L,
    text_encoder_2=dict(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=1280,
    ),
    dtype="fp16",  # 6.9 GB instead of 13.9
)


def make_tiny_sd(out_dir: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Create the tiny model folder and return its path.

    Args:
        out_dir: Folder to write (created; existing files are overwritten).
        prediction_type: ``epsilon`` or ``v_prediction`` for the noise scheduler config.
        seed: Seed for the random weights, so two calls give identical models.
    """
    return make_sd(out_dir, "sd15", "tiny", prediction_type=prediction_type, seed=seed)


def make_tiny_sdxl(out_dir: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Create the tiny SDXL folder and return its path (arguments as :func:`make_tiny_sd`)."""
    return make_sd(out_dir, "sdxl", "tiny", prediction_type=prediction_type, seed=seed)


def make_tiny_sd3(out_dir: str | Path, seed: int = 0) -> Path:
    """Create the tiny SD 3.5 (Medium layout) folder and return its path."""
    return make_sd(out_dir, "sd3", "tiny", seed=seed)


def make_sd(
    out_dir: str | Path,
    arch: str = "sd15",
    preset: str = "tiny",
    *,
    prediction_type: str = "epsilon",
    seed: int = 0,
    dtype: str | None = None,
) -> Path:
    """Write a random model of one architecture and preset; return the folder.

    Args:
        out_dir: Folder to write (created; existing files are overwritten).
        arch: Key of :data:`ARCHS`.
        preset: One of that architecture's presets.
        prediction_type: ``epsilon`` or ``v_prediction`` for the noise scheduler config.
        seed: Seed for the random weights, so two calls give identical models.
        dtype: ``fp32``, ``fp16`` or ``bf16`` for the written weights; None: the preset's.

    Raises:
        ValueError: for an unknown architecture, preset or dtype.
    """
    spec = preset_spec(arch, preset)
    dtype = dtype or spec.dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    return ARCHS[arch].write(Path(out_dir), spec, prediction_type, seed, DTYPES[dtype])


def preset_spec(arch: str, preset: str) -> Preset:
    """The constructor arguments of ``preset`` for ``arch``, with an error naming the choices."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    presets = ARCHS[arch].presets
    if preset not in presets:
        raise ValueError(f"arch {arch!r} has no preset {preset!r}; choose one of {sorted(presets)}")
    return presets[preset]


# The pad token of each CLIP tokenizer folder a pipeline has (SDXL's and SD3's second: "!").
CLIP_PADS = {"tokenizer": EOS, "tokenizer_2": "!"}


def save_pipeline(pipe, out: Path, dtype: torch.dtype, tokenizers: list[str]) -> Path:
    """Save ``pipe`` (initialised in fp32, seeded the same whatever ``dtype``) as ``dtype``,
    then write its CLIP tokenizer folders again: save_pretrained (transformers 5) rewrites
    them as tokenizer.json only, and every CLIP loader should read them."""
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    for name in tokenizers:
        write_tokenizer(out / name, pad_token=CLIP_PADS[name])
    return out


def text_encoder_config(spec: Preset, tokenizer, which: str = "text_encoder"):
    """The ``CLIPTextConfig`` of a preset's ``text_encoder`` (or ``text_encoder_2``), with the
    tokenizer's vocabulary and special ids."""
    from transformers import CLIPTextConfig

    kwargs = dict(getattr(spec, which))
    kwargs["vocab_size"] = kwargs["vocab_size"] or len(tokenizer.get_vocab())
    return CLIPTextConfig(
        **kwargs,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _write_sd15(
    out: Path, spec: Preset, prediction_type: str, seed: int, dtype: torch.dtype
) -> Path:
    """Build an SD-1.x pipeline from ``spec`` with seeded random weights and save it."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    write_tokenizer(out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")

    # One seed, then the three models in a fixed order: the same seed gives the same weights.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec.unet)
    vae = AutoencoderKL(**spec.vae)
    text_encoder = CLIPTextModel(text_encoder_config(spec, tokenizer))
    # SD-1.5 ships a PNDM config; training reads the same file through DDPMScheduler.
    noise_scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return save_pipeline(pipe, out, dtype, ["tokenizer"])


def _write_sdxl(
    out: Path, spec: Preset, prediction_type: str, seed: int, dtype: torch.dtype
) -> Path:
    """Build an SDXL pipeline from ``spec`` with seeded random weights and save it."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    write_tokenizer(out / "tokenizer")
    write_tokenizer(out / "tokenizer_2", pad_token="!")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(out / "tokenizer_2")

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec.unet)
    vae = AutoencoderKL(**spec.vae)
    text_encoder = CLIPTextModel(text_encoder_config(spec, tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(
        text_encoder_config(spec, tokenizer_2, "text_encoder_2")
    )
    # SDXL base ships an Euler config; training reads the same betas through DDPMScheduler.
    noise_scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=noise_scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return save_pipeline(pipe, out, dtype, ["tokenizer", "tokenizer_2"])


ARCHS: dict[str, Arch] = {
    "sd15": Arch(write=_write_sd15, presets={"tiny": TINY_SD15, "sd15-shape": SD15_SHAPE}),
    "sdxl": Arch(write=_write_sdxl, presets={"tiny": TINY_SDXL, "sdxl-shape": SDXL_SHAPE}),
    # SD 3.5 (an MMDiT, three text encoders, flow matching): scripts/make_tiny_sd3.py.
    "sd3": Arch(write=write_sd3, presets=SD3_PRESETS),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write the diffusers model into")
    parser.add_argument("--arch", default="sd15", choices=sorted(ARCHS))
    presets = sorted({name for arch in ARCHS.values() for name in arch.presets})
    parser.add_argument("--preset", default="tiny", choices=presets)
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="dtype of the written weights (default: preset's)"
    )
    parser.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:  # the trainer's own quieting of library notices, when it is installed
        from trainer import quiet

        quiet.import_notices()
    except ImportError:
        pass
    try:
        preset_spec(args.arch, args.preset)
    except ValueError as err:
        parser.error(str(err))
    path = make_sd(
        args.out_dir,
        args.arch,
        args.preset,
        prediction_type=args.prediction_type,
        seed=args.seed,
        dtype=args.dtype,
    )
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote {args.arch} {args.preset} model to {path} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
