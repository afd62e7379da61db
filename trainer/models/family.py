"""Which family a base model is (SD 1.x, SD 2.x, SDXL), told before any weights load.

``model.arch = "auto"`` reads it from the model's own description; an explicit value is
checked against the same facts, so a wrong one is a config error found in seconds rather than
a shape error after a multi-GB load.

- A diffusers folder (or hub id): ``model_index.json`` names the pipeline class and lists the
  components; SDXL has ``text_encoder_2`` and a UNet conditioned on added time ids
  (``addition_embed_type = "text_time"``). SD 2.x cross-attends to width 1024, SD 1.x to 768.
- A single ``.safetensors`` checkpoint (the original layout): SDXL base keeps its two text
  encoders under ``conditioner.embedders.0``/``.1`` and its added embedding under
  ``label_emb``; SD 2.x keeps OpenCLIP under ``cond_stage_model.model``; SD 1.x keeps CLIP
  under ``cond_stage_model.transformer``. Only the header is read.

A UNet of another width (the tests' tiny SD model) is "SD 1.x, not certain": an explicit
``sd1`` or ``sd2`` names it, since the two differ only in the names written into the LoRA's
metadata. SDXL against the others is never a matter of naming: the conditioning differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from trainer.config.load import ModelConfig

SDXL_PIPELINES = ("StableDiffusionXLPipeline",)
# The original-layout key prefixes that tell the families apart in a single checkpoint.
_SDXL_SECOND_ENCODER = "conditioner.embedders.1."
_SDXL_ADDED_EMBEDDING = "model.diffusion_model.label_emb."
_SD2_OPENCLIP = "cond_stage_model.model."
_SD1_CLIP = "cond_stage_model.transformer."


@dataclass(frozen=True)
class Detected:
    """What the model's files say about its family.

    Attributes:
        name: ``sd1``, ``sd2`` or ``sdxl``; empty when the files do not say.
        evidence: Where that was read, for messages.
        certain: False when only a guess: a UNet width that is neither SD 1.x's nor 2.x's.
        problem: A reason the model cannot be trained at all (an SDXL refiner).
    """

    name: str = ""
    evidence: str = ""
    certain: bool = True
    problem: str = ""


def detect(config: ModelConfig) -> Detected:
    """The family of ``model.pretrained`` from its configs or its header (no weights read)."""
    source = config.pretrained
    path = Path(source).expanduser()
    if path.suffix == ".safetensors" and path.is_file():
        return from_checkpoint_keys(_header_keys(path), path.name)
    if path.is_dir():
        return from_folder(path)
    return _from_hub(config)


def from_folder(folder: Path) -> Detected:
    """The family of a diffusers folder, from ``model_index.json`` and ``unet/config.json``."""
    index = _read_json(folder / "model_index.json")
    unet = _read_json(folder / "unet" / "config.json")
    return from_configs(index, unet, folder.name)


def from_configs(index: dict, unet: dict, where: str) -> Detected:
    """The family from a pipeline's ``model_index.json`` and its UNet's config."""
    pipeline = index.get("_class_name", "")
    has = {k for k, v in index.items() if isinstance(v, list) and v[0] is not None}
    text_time = unet.get("addition_embed_type") == "text_time"
    if text_time and "text_encoder_2" in has and "text_encoder" not in has:
        return Detected(
            "sdxl",
            f"{where}: model_index.json",
            problem="an SDXL refiner (one text encoder, aesthetic-score conditioning); "
            "LoRA training here is for SDXL base models and their fine-tunes",
        )
    if pipeline in SDXL_PIPELINES or "text_encoder_2" in has or text_time:
        return Detected("sdxl", f"{where}: {pipeline or 'model_index.json'} with two text encoders")
    width = unet.get("cross_attention_dim")
    if width == 1024:
        return Detected("sd2", f"{where}: UNet cross-attention width 1024 (OpenCLIP-H)")
    if width == 768:
        return Detected("sd1", f"{where}: UNet cross-attention width 768 (CLIP ViT-L)")
    return Detected("sd1", f"{where}: UNet cross-attention width {width}", certain=False)


def from_checkpoint_keys(keys: list[str], where: str) -> Detected:
    """The family of an original-layout checkpoint from its tensor names."""
    if any(k.startswith(_SDXL_SECOND_ENCODER) for k in keys):
        return Detected("sdxl", f"{where}: two text encoders (conditioner.embedders.1)")
    if any(k.startswith(_SDXL_ADDED_EMBEDDING) for k in keys):
        return Detected(
            "sdxl",
            f"{where}: label_emb without a second text encoder",
            problem="an SDXL refiner; LoRA training here is for SDXL base models",
        )
    if any(k.startswith(_SD2_OPENCLIP) for k in keys):
        return Detected("sd2", f"{where}: OpenCLIP text encoder (cond_stage_model.model)")
    if any(k.startswith(_SD1_CLIP) for k in keys):
        return Detected("sd1", f"{where}: CLIP text encoder (cond_stage_model.transformer)")
    return Detected()


def problems(config: ModelConfig, detected: Detected) -> list[str]:
    """``model.arch`` against what the model says; empty when they agree."""
    key = f"model.arch = {config.arch!r}"
    if detected.problem:
        return [f"model.pretrained = {config.pretrained!r}: {detected.problem}"]
    if config.arch == "auto" or not detected.name or config.arch == detected.name:
        return []
    if not detected.certain and "sdxl" not in (config.arch, detected.name):
        return []  # neither SD 1.x's nor 2.x's width: the user names it
    return [
        f"{key}: but model.pretrained is {_NAMES[detected.name]} ({detected.evidence}); set "
        f"model.arch = 'auto' or {detected.name!r}"
    ]


def resolve(config: ModelConfig, detected: Detected) -> str:
    """The family training uses: the explicit ``model.arch``, else the detected one, else
    ``sd1`` (a single file whose header says nothing; the load checks it again)."""
    if config.arch != "auto":
        return config.arch
    return detected.name or "sd1"


_NAMES = {"sd1": "an SD 1.x model", "sd2": "an SD 2.x model", "sdxl": "an SDXL model"}


def _header_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (OSError, ValueError):
        return []  # not a readable safetensors file: the load reports it


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _from_hub(config: ModelConfig) -> Detected:
    """Read the two small config files of a hub model (from the cache when offline)."""
    try:
        from huggingface_hub import hf_hub_download

        revision = config.revision or None
        index = hf_hub_download(config.pretrained, "model_index.json", revision=revision)
        unet = hf_hub_download(config.pretrained, "unet/config.json", revision=revision)
    except Exception:  # offline and not cached, or no such file: the load will say why
        return Detected()
    return from_configs(_read_json(Path(index)), _read_json(Path(unet)), config.pretrained)
