"""Write a tiny, random, offline Stable Diffusion 1.x model in the diffusers folder layout.

The folder loads with ``StableDiffusionPipeline.from_pretrained(OUT_DIR)`` under
``HF_HUB_OFFLINE=1``, so the trainer's real loading path is the one the tests exercise.

SD-1.x proportions are kept where they change code paths or cost shape: the VAE downsamples
by 8 (four blocks) into 4 latent channels with SD's scaling factor, the tokenizer pads to 77
tokens, and the UNet has cross-attention blocks. Channel widths and layer counts are tiny.

Usage:
    python scripts/make_tiny_sd.py OUT_DIR [--prediction-type v_prediction] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SD_SCALING_FACTOR = 0.18215
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


def write_tokenizer(out: Path) -> int:
    """Write a CLIP byte-level BPE tokenizer built from scratch; return its vocab size."""
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
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "do_lower_case": True,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab)


def make_tiny_sd(out_dir: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Create the tiny model folder and return its path.

    Args:
        out_dir: Folder to write (created; existing files are overwritten).
        prediction_type: ``epsilon`` or ``v_prediction`` for the noise scheduler config.
        seed: Seed for the random weights, so two calls give identical models.
    """
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out_dir)
    vocab_size = write_tokenizer(out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
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
    )
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=32,
    )
    text_encoder = CLIPTextModel(text_config)
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
    pipe.save_pretrained(out, safe_serialization=True)
    # save_pretrained (transformers 5) rewrites the tokenizer folder as tokenizer.json only;
    # write the classic files again so every CLIP loader can read it.
    write_tokenizer(out / "tokenizer")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write the diffusers model into")
    parser.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = make_tiny_sd(args.out_dir, args.prediction_type, args.seed)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote tiny SD model to {path} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
