"""The SD3 family for ``make_tiny_sd.py --arch sd3``: a random SD 3.5 folder, written offline.

SD3 is not a bigger UNet: an MMDiT (``SD3Transformer2DModel``) over 2×2 latent patches with
joint text-image attention, three text encoders (CLIP-L and CLIP-G, both with their
projection, and T5-XXL), a 16-channel VAE with a ``shift_factor``, and a flow-matching
scheduler (``FlowMatchEulerDiscreteScheduler`` with SD 3.5's ``shift = 3``). The folder is
written by ``StableDiffusion3Pipeline.save_pretrained`` and loads with ``from_pretrained``, so
the trainer's real loading path is the one the tests exercise.

The T5 tokenizer is built here from a word list (no download and no ``sentencepiece``): a
Unigram model of single letters, digits and the dataset's words, through transformers' own
``T5Tokenizer`` (backed by the ``tokenizers`` library), saved as ``tokenizer.json``.

Presets:
- ``tiny``: SD 3.5 Medium's layout where it changes code paths: two joint blocks, the first
  with the second self-attention (``attn2``, ``dual_attention_layers``), RMS QK-norm, a
  pooled projection of both CLIPs' widths together, a cross width of T5's, patch size 2,
  the 16-channel VAE of factor 8 with SD3's scaling and shift. Widths are tiny (about 3 MB).
- ``sd35-medium-shape``: the published SD 3.5 Medium shapes (MMDiT-X of 24 blocks, 13 of them
  with ``attn2``; CLIP ViT-L and OpenCLIP bigG with projections; T5-v1.1-XXL's encoder),
  random and in fp16 (about 16 GB): for GPU benchmarks, never in the default tests.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SD3_SCALING_FACTOR = 1.5305
SD3_SHIFT_FACTOR = 0.0609
T5_MAX_LENGTH = 512  # the published tokenizer_3's model_max_length; training picks its own
# Words of the synthetic captions (scripts/make_tiny_dataset.py) and of the tests' prompts.
T5_WORDS = (
    "a", "an", "the", "of", "on", "in", "photo", "red", "green", "blue", "yellow", "purple",
    "white", "black", "grey", "circle", "square", "triangle", "background", "shape", "dog",
    "cat", "sks", "beach",
)  # fmt: skip


def write_t5_tokenizer(out: Path) -> None:
    """Write a T5 tokenizer (``tokenizer.json``) built from :data:`T5_WORDS` and characters.

    T5's layout: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, the pieces, then the sentinels.
    Every lower-case word still tokenizes (letter by letter where it is not a piece).
    """
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -3.0) for w in T5_WORDS]
    chars = string.ascii_lowercase + string.digits + ",.'-"
    pieces += [(c, -6.0) for c in chars]
    pieces += [(f"▁{c}", -6.5) for c in chars if c not in T5_WORDS]  # one id per piece
    extra = 4
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(extra))]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=extra, model_max_length=T5_MAX_LENGTH)
    tokenizer.save_pretrained(out)


@dataclass(frozen=True)
class SD3Preset:
    """Constructor arguments of one SD3 model size.

    Attributes:
        transformer: ``SD3Transformer2DModel`` keyword arguments.
        vae: ``AutoencoderKL`` keyword arguments.
        text_encoder: CLIP-L's ``CLIPTextConfig`` arguments (``vocab_size`` None: the local
            tokenizer's size).
        text_encoder_2: CLIP-G's, in the same form.
        text_encoder_3: ``T5Config`` arguments (``vocab_size`` None: the local tokenizer's).
        dtype: dtype of the written weights unless the caller asks for another.
    """

    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]
    text_encoder_3: dict[str, Any]
    dtype: str = "fp32"


SD3_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=16,
    scaling_factor=SD3_SCALING_FACTOR,
    shift_factor=SD3_SHIFT_FACTOR,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
)

# Hidden width = heads × head dim (4 × 8 = 32); the text width is T5's (64), which the two
# CLIPs' penultimate states together (32 + 32) fill after padding; the pooled projection is
# both CLIPs' projections together (16 + 32).
TINY_SD3 = SD3Preset(
    transformer=dict(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=48,
        out_channels=16,
        pos_embed_max_size=32,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ),
    vae={
        **SD3_VAE,
        "sample_size": 64,
        "block_out_channels": (16, 32, 32, 32),
        "layers_per_block": 1,
        "norm_num_groups": 16,
    },
    text_encoder=dict(
        vocab_size=None,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=16,
    ),
    text_encoder_2=dict(
        vocab_size=None,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=32,
    ),
    text_encoder_3=dict(
        vocab_size=None,
        d_model=64,
        d_kv=16,
        d_ff=96,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
    ),
)

# The values of stabilityai/stable-diffusion-3.5-medium's transformer/, vae/, text_encoder/
# (CLIP ViT-L/14 with projection), text_encoder_2/ (OpenCLIP ViT-bigG/14 with projection) and
# text_encoder_3/ (T5-v1.1-XXL's encoder) config.json, written out in full.
SD35_MEDIUM_SHAPE = SD3Preset(
    transformer=dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    ),
    vae={
        **SD3_VAE,
        "sample_size": 1024,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "norm_num_groups": 32,
    },
    text_encoder=dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=768,
    ),
    text_encoder_2=dict(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=1280,
    ),
    text_encoder_3=dict(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
    ),
    dtype="fp16",
)

SD3_PRESETS = {"tiny": TINY_SD3, "sd35-medium-shape": SD35_MEDIUM_SHAPE}


def t5_config(spec: SD3Preset, tokenizer):
    """The ``T5Config`` of a preset's T5 encoder, with the tokenizer's vocabulary and ids."""
    from transformers import T5Config

    kwargs = dict(spec.text_encoder_3)
    kwargs["vocab_size"] = kwargs["vocab_size"] or len(tokenizer.get_vocab())
    return T5Config(
        **kwargs,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def write_sd3(
    out: Path, spec: SD3Preset, prediction_type: str, seed: int, dtype: torch.dtype
) -> Path:
    """Build an SD 3.5 pipeline from ``spec`` with seeded random weights and save it.

    ``prediction_type`` is accepted for the common writer signature; SD3 has only flow
    matching, so anything but ``epsilon`` (the default) is refused.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from make_tiny_sd import save_pipeline, text_encoder_config, write_tokenizer
    from transformers import (
        AutoTokenizer,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
    )

    if prediction_type != "epsilon":
        raise ValueError("SD3 is trained by flow matching; it has no --prediction-type")
    write_tokenizer(out / "tokenizer")
    write_tokenizer(out / "tokenizer_2", pad_token="!")
    write_t5_tokenizer(out / "tokenizer_3")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(out / "tokenizer_2")
    tokenizer_3 = AutoTokenizer.from_pretrained(out / "tokenizer_3")

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**spec.transformer)
    vae = AutoencoderKL(**spec.vae)
    clip_1 = text_encoder_config(spec, tokenizer, "text_encoder")
    clip_2 = text_encoder_config(spec, tokenizer_2, "text_encoder_2")
    text_encoder = CLIPTextModelWithProjection(clip_1)
    text_encoder_2 = CLIPTextModelWithProjection(clip_2)
    text_encoder_3 = T5EncoderModel(t5_config(spec, tokenizer_3))
    pipe: Any = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return save_pipeline(pipe, out, dtype, ["tokenizer", "tokenizer_2"])
