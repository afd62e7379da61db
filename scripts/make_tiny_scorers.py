"""Write tiny random CLIP and DINOv2 models, the offline stand-ins of the image scorers.

``OUT_DIR/clip`` loads with ``CLIPModel.from_pretrained`` and ``CLIPProcessor.from_pretrained``
(the locally built CLIP tokenizer of ``make_tiny_sd.py`` and a 32 px image processor);
``OUT_DIR/dino`` with ``AutoModel`` and ``AutoImageProcessor`` (a ``Dinov2Model`` and the
``BitImageProcessor`` DINOv2 is published with). Set them as ``validation.clip_model`` and
``validation.dino_model``, so the tests run the scorers' real loading path under
``HF_HUB_OFFLINE=1``. The weights are random (seeded): the scores mean nothing but are
deterministic.

Usage:
    python scripts/make_tiny_scorers.py OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

IMAGE_SIZE = 32
TOWER = {  # both encoders: a few hundred kB each
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
}


def make_tiny_clip(out: Path, seed: int = 0) -> Path:
    """A tiny random ``CLIPModel`` with its processor in ``out``."""
    from make_tiny_sd import MAX_TOKENS, write_tokenizer
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    write_tokenizer(out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TOWER,
    )
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=8, **TOWER)
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(out)
    images = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out)
    return out


def make_tiny_dino(out: Path, seed: int = 0) -> Path:
    """A tiny random ``Dinov2Model`` with its image processor in ``out``."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(image_size=IMAGE_SIZE, patch_size=8, mlp_ratio=2, **{
        k: v for k, v in TOWER.items() if k != "intermediate_size"
    })  # fmt: skip
    torch.manual_seed(seed)
    Dinov2Model(config).save_pretrained(out)
    BitImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_convert_rgb=True,
    ).save_pretrained(out)
    return out


def make_tiny_scorers(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Both models, in ``out_dir/clip`` and ``out_dir/dino``; returns the two folders."""
    out = Path(out_dir)
    return make_tiny_clip(out / "clip", seed), make_tiny_dino(out / "dino", seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    clip, dino = make_tiny_scorers(args.out_dir, args.seed)
    print(f"validation.clip_model = {str(clip)!r}\nvalidation.dino_model = {str(dino)!r}")


if __name__ == "__main__":
    main()
