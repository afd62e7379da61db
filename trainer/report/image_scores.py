"""Image scores of the sample images: CLIP-T, CLIP-I and DINO, as DreamBooth evaluates.

- **CLIP-T**: how well each sample matches its prompt: the cosine similarity of the CLIP image
  embedding of the sample and the CLIP text embedding of its prompt, averaged over the samples.
- **CLIP-I**: how close the samples are to the held-out images: the cosine similarity of
  their CLIP image embeddings, averaged over every (sample, held-out image) pair.
- **DINO**: the same with a self-supervised ViT (DINO, DINOv2), whose embedding (the class
  token of the last layer) tells apart images of different subjects that CLIP, trained on
  captions, puts close together (Ruiz et al., DreamBooth, 2023, section 4.1).

The values are plain cosine similarities in [-1, 1] (higher is better), not CLIPScore's
``100 * max(cos, 0)``. They measure agreement with the prompt and with the held-out images,
not image quality: a LoRA that copies its training images scores high on CLIP-I and DINO.

The models are named by ``validation.clip_model`` and ``validation.dino_model`` (hub ids or
local transformers folders), loaded once per run on the run's device by transformers'
``from_pretrained``, and the held-out images are embedded once. Scoring runs on the main
process, on the PNGs just written for the validation point.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from trainer.config.schema import ValidationConfig

SCORES = ("clip_t", "clip_i", "dino")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def model_problems(val: ValidationConfig, where: str = "validation") -> list[str]:
    """Why a scoring model the config needs cannot be loaded, found without loading it: a
    local folder without ``config.json``, or a hub id missing from the cache while offline."""
    needed = []
    if {"clip_t", "clip_i"} & set(val.scores):
        needed.append(("clip_model", val.clip_model))
    if "dino" in val.scores:
        needed.append(("dino_model", val.dino_model))
    problems = []
    for key, source in needed:
        name = f"{where}.{key} = {source!r}"
        path = Path(source).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                problems.append(f"{name}: the folder has no config.json (a transformers model)")
            continue
        if path.exists() or not _HUB_ID.match(source):
            problems.append(f"{name}: no such folder ({path.resolve()}), nor a hub id")
            continue
        import huggingface_hub

        cached = huggingface_hub.try_to_load_from_cache(source, "config.json")
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        if not isinstance(cached, str) and offline:
            problems.append(
                f"{name}: not a local folder, and as a hub id it is not in the local cache "
                "while offline (HF_HUB_OFFLINE=1); download it once with network access"
            )
    return problems


def _normalized(features: Any) -> torch.Tensor:
    """Unit-length fp32 embeddings from a ``get_*_features`` answer (a tensor in
    transformers 4; an output whose ``pooler_output`` is the projection in 5)."""
    import torch

    tensor = features if isinstance(features, torch.Tensor) else features.pooler_output
    return torch.nn.functional.normalize(tensor.float(), dim=-1)


class ImageScorer:
    """The configured scores of a list of samples, against their prompts and the held-out
    images.

    Args:
        scores: Which of :data:`SCORES` to compute.
        clip_model: The CLIP model (for clip_t, clip_i).
        dino_model: The DINO model (for dino).
        references: The held-out images (for clip_i, dino).
        device: Where the models run.
        dtype: Their dtype (default fp32).
    """

    def __init__(
        self,
        scores: Sequence[str],
        clip_model: str,
        dino_model: str,
        references: Sequence[Image.Image],
        device: torch.device | str,
        dtype: torch.dtype | None = None,
    ) -> None:
        from trainer import quiet

        quiet.import_notices()
        from transformers.utils import logging as hf_logging

        # Its "Loading weights" bar would break the training run's progress line.
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self._load(scores, clip_model, dino_model, device, dtype, references)
        finally:
            if bar:
                hf_logging.enable_progress_bar()

    def _load(self, scores, clip_model, dino_model, device, dtype, references) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

        self.scores = tuple(s for s in SCORES if s in scores)
        self.device, self.dtype = torch.device(device), dtype or torch.float32
        self.clip = self.clip_processor = self.dino = self.dino_processor = None
        if {"clip_t", "clip_i"} & set(self.scores):
            clip: Any = CLIPModel.from_pretrained(clip_model, dtype=self.dtype)
            self.clip = clip.to(self.device).eval()
            self.clip_processor = CLIPProcessor.from_pretrained(clip_model)
        if "dino" in self.scores:
            dino: Any = AutoModel.from_pretrained(dino_model, dtype=self.dtype)
            self.dino = dino.to(self.device).eval()
            self.dino_processor = AutoImageProcessor.from_pretrained(dino_model)
        refs = list(references)
        self.clip_refs = self.dino_refs = None
        with torch.inference_mode():  # no held-out images: clip_i and dino are left out
            if refs and "clip_i" in self.scores:
                self.clip_refs = self.clip_images(refs)
            if refs and "dino" in self.scores:
                self.dino_refs = self.dino_images(refs)

    def clip_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit CLIP image embeddings, one row per image."""
        assert self.clip is not None and self.clip_processor is not None
        pixels = self.clip_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return _normalized(self.clip.get_image_features(pixel_values=self._in(pixels)))

    def clip_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit CLIP text embeddings, one row per text (truncated to CLIP's 77 tokens)."""
        assert self.clip is not None and self.clip_processor is not None
        tokens = self.clip_processor(
            text=list(texts), return_tensors="pt", padding=True, truncation=True
        )
        features = self.clip.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        return _normalized(features)

    def dino_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit DINO embeddings: the class token of the last layer, one row per image."""
        assert self.dino is not None and self.dino_processor is not None
        pixels = self.dino_processor(images=list(images), return_tensors="pt")["pixel_values"]
        hidden = self.dino(pixel_values=self._in(pixels)).last_hidden_state
        return _normalized(hidden[:, 0])

    def uses(self, model: str) -> bool:
        """Whether the ``"clip"`` or ``"dino"`` model was loaded."""
        return (self.clip if model == "clip" else self.dino) is not None

    def _in(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(self.device, self.dtype)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, float]:
        """The configured scores of ``images`` (``images[k]`` drawn from ``prompts[k]``)."""
        import torch

        with torch.inference_mode():
            return self._score(images, prompts)

    def _score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        if not images:
            return out
        if self.clip is not None:
            embedded = self.clip_images(images)
            if "clip_t" in self.scores:
                texts = self.clip_texts(prompts)
                out["clip_t"] = float((embedded * texts).sum(dim=-1).mean())
            if self.clip_refs is not None:
                out["clip_i"] = float((embedded @ self.clip_refs.T).mean())
        if self.dino_refs is not None:
            out["dino"] = float((self.dino_images(images) @ self.dino_refs.T).mean())
        return out


def load_images(paths: Sequence[Path]) -> list[Image.Image]:
    """RGB copies of image files (closed after reading)."""
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images
