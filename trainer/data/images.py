"""Reading images correctly, whatever the file holds, and turning them into training tensors.

Everything a camera or an editor can produce is normalised to 8-bit RGB here: EXIF orientation
is applied, alpha is composited onto white (not black, which PIL's plain ``convert`` gives),
palettes are expanded, 16-bit and float images are scaled rather than clipped, and CMYK is
converted. Files that cannot be decoded raise :class:`ImageProblem` naming the file.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

WHITE = (255, 255, 255)


class ImageProblem(ValueError):
    """An image file that cannot be used; ``str()`` names the file and the reason."""


@dataclass(frozen=True)
class ImageInfo:
    """What the data pre-pass learns about one image file."""

    width: int
    height: int
    note: str = ""  # a conversion that was applied, e.g. "RGBA: alpha composited onto white"


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str]:
    """Convert any PIL mode to RGB; return the image and a note when it was not plain RGB."""
    mode = image.mode
    if mode == "RGB":
        return image, ""
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        if image.mode == "RGB":
            return image, "palette image expanded to RGB"
        mode = "P+transparency"
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit/32-bit grey: scale the real range to 0..255 (a plain convert clips at 255).
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(array.max()), 1.0)
        grey = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB"), f"{mode} image scaled to 8-bit RGB"
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*WHITE, 255))
        composed = Image.alpha_composite(background, rgba).convert("RGB")
        return composed, f"{mode} image: alpha composited onto white"
    return image.convert("RGB"), f"{mode} image converted to RGB"


def open_rgb(path: Path) -> tuple[Image.Image, str]:
    """Decode an image fully as upright 8-bit RGB; return it and a note on any conversion.

    Raises:
        ImageProblem: for an empty, truncated, corrupt or non-image file.
    """
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageProblem(f"{path}: cannot read ({err.strerror})") from err
    if size == 0:
        raise ImageProblem(f"{path}: empty file (0 bytes)")
    try:
        # No context manager: load() reads the whole file and releases it, and the decoded
        # image stays usable without the full-size copy a `with` block would force.
        opened = Image.open(path)
        try:
            opened.load()  # decode now: a truncated file fails here, not mid-training
        except BaseException:
            opened.close()
            raise
        rotated = _has_orientation(opened)
        image, note = _to_rgb(ImageOps.exif_transpose(opened) if rotated else opened)
    except UnidentifiedImageError as err:
        raise ImageProblem(f"{path}: not an image file, though named like one") from err
    except Image.DecompressionBombError as err:
        raise ImageProblem(too_large(path, err)) from err
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageProblem(f"{path}: corrupt or truncated image ({err})") from err
    if rotated:
        note = "; ".join(filter(None, [note, "EXIF rotation applied"]))
    return image, note


def too_large(path: Path, err: Exception) -> str:
    """The message for an image above PIL's decompression-bomb limit (it is not corrupt)."""
    pixels = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{int(pixels.group(1)) / 1e6:,.0f} megapixels" if pixels else "too many pixels"
    limit = (Image.MAX_IMAGE_PIXELS or 0) * 2 / 1e6
    return (
        f"{path}: {size}, beyond the {limit:,.0f}-megapixel limit up to which images are "
        "decoded (a guard against decompression bombs); downscale it first: training uses "
        "far fewer pixels anyway"
    )


def _has_orientation(image: Image.Image) -> bool:
    try:
        return image.getexif().get(0x0112, 1) != 1
    except Exception:  # a broken EXIF block must not make the image unusable
        return False


def inspect(path: Path, decode: bool = True) -> ImageInfo:
    """Check an image and learn its upright size.

    Args:
        path: Image file.
        decode: Decode every pixel (catches truncation); False reads only the header, for
            previews that need sizes but not a full check.
    """
    if decode:
        image, note = open_rgb(path)
        return ImageInfo(image.width, image.height, note)
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            if _has_orientation(opened) and opened.getexif().get(0x0112) in (5, 6, 7, 8):
                width, height = height, width  # rotated by 90° when displayed
    except Image.DecompressionBombError as err:
        raise ImageProblem(too_large(path, err)) from err
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageProblem(f"{path}: not a readable image ({err})") from err
    return ImageInfo(width, height)


def crop_box(
    size: tuple[int, int], target: tuple[int, int], center: bool, rng: random.Random | None
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Resize-to-cover size and crop box that turn an image of ``size`` into ``target``.

    ``rng`` draws the crop position unless ``center``; a center crop needs none.

    Returns:
        ((resized width, resized height), (left, top, right, bottom)).
    """
    (w, h), (tw, th) = size, target
    scale = max(tw / w, th / h)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    dx, dy = rw - tw, rh - th
    if center:
        left, top = dx // 2, dy // 2
    elif rng is not None:
        left, top = rng.randint(0, dx), rng.randint(0, dy)
    else:
        raise TypeError("crop_box: a random crop (center=False) needs an rng")
    return (rw, rh), (left, top, left + tw, top + th)


@dataclass(frozen=True)
class Geometry:
    """Where a training image came from in its picture: what SDXL's size conditioning reads.

    Attributes:
        original: (width, height) of the upright image as decoded from the file.
        resized: (width, height) it was scaled to, covering the target.
        box: (left, top, right, bottom) of the crop in the resized image, before any flip.
        flip: Whether the crop was mirrored.
    """

    original: tuple[int, int]
    resized: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool

    @property
    def target(self) -> tuple[int, int]:
        """(width, height) of the training image."""
        left, top, right, bottom = self.box
        return right - left, bottom - top

    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) of the crop as the trained image sees its picture.

        A flipped example is the crop ``[W - right, W - left)`` of the mirrored picture, and
        the mirrored picture is as much a picture as the original: so its left coordinate is
        what the crop cut from the picture's right edge, ``W - right``. The top is unchanged.
        This keeps SDXL's meaning of "left = 0": nothing is missing on the left of what the
        model sees (without the rule, a flipped crop flush with the right edge would claim
        an uncut left edge while its left side was cut away).
        """
        left, top, right, _ = self.box
        return top, (self.resized[0] - right if self.flip else left)

    def time_ids(self) -> tuple[int, ...]:
        """SDXL's ``[orig_h, orig_w, top, left, target_h, target_w]``."""
        (width, height), (target_w, target_h) = self.original, self.target
        return (height, width, *self.crop_top_left(), target_h, target_w)


def load_example(
    path: Path, target: tuple[int, int], center_crop: bool, flip: bool, rng: random.Random | None
) -> tuple[torch.Tensor, Geometry]:
    """An image as a (3, H, W) float tensor in [-1, 1] (resized to cover, cropped, flipped),
    and the :class:`Geometry` of that crop.

    Args:
        path: Image file.
        target: (width, height) to produce.
        center_crop: Crop the center; otherwise at a place drawn from ``rng``.
        flip: Mirror horizontally.
        rng: Source of the crop position (None for a center crop).
    """
    image, _ = open_rgb(path)
    original = image.size
    resized, box = crop_box(original, target, center_crop, rng)
    image = image.resize(resized, Image.Resampling.BICUBIC).crop(box)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32)
    pixels = torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0
    return pixels, Geometry(original, resized, box, flip)
