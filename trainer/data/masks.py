"""Loss masks (``train.masked_loss``): which part of each image the loss counts.

An image's mask is, in this order:

1. a mask file beside it, ``<stem><data.mask_suffix>.<ext>`` (``cat.png`` → ``cat_mask.png``):
   grey levels, white = trained, black = ignored, the size of the image;
2. its own alpha channel, when its subset sets ``alpha_mask`` (kohya's name): opaque =
   trained, transparent = ignored;
3. none: the whole image trains, as without masked loss.

A mask goes through exactly the resize, crop and flip of its image (the same
``images.Geometry``), then is averaged over each 8×8 pixel cell to the latent's size (the VAE
downsamples by 8; kohya's ``interpolate(mode="area")``). The loss of an example is then its mean
over the latent weighted by the mask (``trainer/run/loss.py``), so an all-white mask gives the
unmasked loss and a half-white one the loss over that half. With a latent cache the mask is
cached beside the latents, in the same entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from trainer.data import images

# SD and SDXL VAEs downsample by 8 (2 ** (number of VAE blocks - 1)): a latent cell covers 8×8
# pixels, and every training size is a multiple of 8.
LATENT_FACTOR = 8
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_EXTENSIONS = (".png", ".webp", ".jpg", ".jpeg", ".bmp")


def mask_file(image: Path, suffix: str) -> Path | None:
    """The mask file beside ``image`` (``<stem><suffix>.<ext>``), or None."""
    for ext in dict.fromkeys((image.suffix, *_EXTENSIONS)):
        path = image.with_name(f"{image.stem}{suffix}{ext}")
        if path.is_file():
            return path
    return None


def is_mask_of_a_sibling(path: Path, suffix: str, stems: set[str]) -> bool:
    """Whether ``path`` is the mask file of another image in its folder (``stems``: the
    folder's image stems), so it is no training image of its own."""
    stem = path.stem
    return bool(suffix) and stem.endswith(suffix) and stem[: -len(suffix)] in stems


def has_alpha(path: Path) -> bool:
    """Whether an image file holds an alpha channel (or palette transparency); header only."""
    with Image.open(path) as image:
        return image.mode in _ALPHA_MODES or "transparency" in image.info


def _open(mask: Path, image: Path) -> Image.Image:
    """The mask as an upright 8-bit grey image: the alpha channel of ``image`` when ``mask``
    is ``image`` itself, else the mask file's grey levels."""
    opened = Image.open(mask)
    upright = ImageOps.exif_transpose(opened)
    if mask == image:
        return upright.convert("RGBA").getchannel("A")
    return upright.convert("L")


def mask_problem(mask: Path, image: Path, size: tuple[int, int], decode: bool = True) -> str:
    """Why a mask file cannot be used with an image of upright ``size`` ("" when it can).

    ``decode=False`` reads only the header (as ``images.inspect`` does for previews), so a
    preview skips the same images as the run, but for a truncated mask file."""
    try:
        if decode:
            found = _open(mask, image).size
        else:
            info = images.inspect(mask, decode=False)
            found = (info.width, info.height)
    except (OSError, ValueError, SyntaxError) as err:
        return f"{mask}: the mask of {image.name} cannot be read ({err})"
    if found != size:
        return (
            f"{mask}: the mask is {found[0]}×{found[1]}, its image {image.name} "
            f"{size[0]}×{size[1]}; a mask must have its image's size"
        )
    return ""


def pixel_mask(mask: Path, image: Path, geometry: images.Geometry) -> torch.Tensor:
    """The mask through its image's resize, crop and flip: a (1, H, W) tensor in [0, 1]."""
    grey = _open(mask, image).resize(geometry.resized, Image.Resampling.BILINEAR)
    grey = grey.crop(geometry.box)
    if geometry.flip:
        grey = grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)[None]


def to_latent(mask: torch.Tensor) -> torch.Tensor:
    """A pixel mask, (1, H, W) or (B, 1, H, W), averaged over each latent cell."""
    return F.avg_pool2d(mask, LATENT_FACTOR)


def unmasked(size: tuple[int, int]) -> torch.Tensor:
    """The mask of an example of (width, height) ``size`` that has none: all ones."""
    width, height = size
    return torch.ones(1, height // LATENT_FACTOR, width // LATENT_FACTOR)


def latent_mask(mask: Path | None, image: Path, geometry: images.Geometry) -> torch.Tensor:
    """The example's mask at the latent's size (all ones without a mask)."""
    if mask is None:
        return unmasked(geometry.target)
    return to_latent(pixel_mask(mask, image, geometry))


def attach(
    examples: Sequence[Any],
    suffix: str,
    alpha_by_subset: Sequence[bool],
    sizes: Mapping[Path, tuple[int, int]],
    decode: bool = True,
) -> tuple[list[Any], list[str]]:
    """The examples with their masks found (``mask``: a mask file, the image itself for its
    alpha channel, or None), and every unusable mask file, whose examples are left out.

    Args:
        examples: The checked examples (``dataset.Example``).
        suffix: ``data.mask_suffix``.
        alpha_by_subset: Each subset's ``alpha_mask``.
        sizes: Each image's upright (width, height).
        decode: False checks mask files by their headers only (previews).
    """
    found: dict[tuple[Path, int], Path | None] = {}
    problems: dict[Path, str] = {}
    kept = []
    for example in examples:
        key = (example.path, example.subset)
        if key not in found:
            mask = mask_file(example.path, suffix)
            if mask is not None and mask not in problems:
                problems[mask] = mask_problem(mask, example.path, sizes[example.path], decode)
            elif mask is None and alpha_by_subset[example.subset] and has_alpha(example.path):
                mask = example.path
            found[key] = mask
        mask = found[key]
        if mask is not None and problems.get(mask):
            continue
        kept.append(dataclasses.replace(example, mask=mask))
    return kept, [p for p in problems.values() if p]
