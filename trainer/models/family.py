"""Which family a base model is (SD 1.x, SD 2.x, SDXL, SD3), told before any weights load.

``model.arch = "auto"`` reads it from the model's own description; an explicit value is
checked against the same facts, so a wrong one is a config error found in seconds rather than
a shape error after a multi-GB load.

- A diffusers folder (or hub id): ``model_index.json`` names the pipeline class and lists the
  components; SDXL has ``text_encoder_2`` and a UNet conditioned on added time ids
  (``addition_embed_type = "text_time"``). SD 2.x cross-attends to width 1024, SD 1.x to 768.
- SD3 (3, 3.5 Large, Large Turbo, 3.5 Medium): ``model_index.json`` names
  ``StableDiffusion3Pipeline`` (or lists a ``transformer`` and ``text_encoder_3``); its
  ``transformer/config.json`` tells the variant (:func:`sd3_variant`). A single file keeps the
  MMDiT under ``model.diffusion_model.joint_blocks``.
- A single ``.safetensors`` checkpoint (the original layout): SDXL base keeps its two text
  encoders under ``conditioner.embedders.0``/``.1`` and its added embedding under
  ``label_emb``; SD 2.x keeps OpenCLIP under ``cond_stage_model.model``; SD 1.x keeps CLIP
  under ``cond_stage_model.transformer``. Only the header is read.

A UNet of another width (the tests' tiny SD model) is "SD 1.x, not certain": an explicit
``sd1`` or ``sd2`` names it, since the two differ only in the names written into the LoRA's
metadata. SDXL or SD3 against the others is never a matter of naming: the models differ.

A LoRA file's family (:func:`from_lora`, what ``sdlora inspect`` shows and ``sdlora sample``
checks against the model) is read from its header first (our ``sdlora_training`` record, SAI's
``modelspec.architecture``, kohya's ``ss_base_model_version``/``ss_v2``), then from its keys
and tensor widths.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from trainer.config.load import ModelConfig
from trainer.models.architectures import ARCHITECTURES

SDXL_PIPELINES = ("StableDiffusionXLPipeline",)
SD3_PIPELINES = ("StableDiffusion3Pipeline",)
# The SD3 MMDiT in a single file (SAI's layout): its joint blocks, QK-norm, and 3.5 Medium's
# second attention.
_SD3_JOINT_BLOCKS = "model.diffusion_model.joint_blocks."
_SD3_QK_NORM = ".x_block.attn.ln_k."
_SD3_ATTN2 = ".x_block.attn2."
# kohya's names for the SD3 variants (library/sd3_utils.py ``model_type``), which it writes as
# ss_base_model_version and after "stable-diffusion-3-" in modelspec.architecture.
SD3_VARIANTS = {
    "medium": "SD 3 Medium",
    "5-large": "SD 3.5 Large or Large Turbo",
    "5-medium": "SD 3.5 Medium",
}
# The original-layout key prefixes that tell the families apart in a single checkpoint.
_SDXL_SECOND_ENCODER = "conditioner.embedders.1."
_SDXL_ADDED_EMBEDDING = "model.diffusion_model.label_emb."
_SD2_OPENCLIP = "cond_stage_model.model."
_SD1_CLIP = "cond_stage_model.transformer."


@dataclass(frozen=True)
class Detected:
    """What the model's files say about its family.

    Attributes:
        name: ``sd1``, ``sd2``, ``sdxl`` or ``sd3``; empty when the files do not say.
        evidence: Where that was read, for messages.
        certain: False when only a guess: a UNet width that is neither SD 1.x's nor 2.x's.
        problem: A reason the model cannot be trained at all (an SDXL refiner).
        variant: SD3's variant (:data:`SD3_VARIANTS`), when known.
    """

    name: str = ""
    evidence: str = ""
    certain: bool = True
    problem: str = ""
    variant: str = ""


def detect(config: ModelConfig) -> Detected:
    """The family of ``model.pretrained`` from its configs or its header (no weights read)."""
    source = config.pretrained
    path = Path(source).expanduser()
    if path.suffix == ".safetensors" and path.is_file():
        try:
            keys = _header_keys(path)
        except (OSError, ValueError, SafetensorError) as err:
            # Found here, in seconds, rather than as a traceback from the pipeline's loader.
            return Detected(
                problem=f"its safetensors header cannot be read ({err}); a download or copy "
                "cut short? get the file again"
            )
        return from_checkpoint_keys(keys, path.name)
    if path.is_dir():
        return from_folder(path)
    return _from_hub(config)


def from_folder(folder: Path) -> Detected:
    """The family of a diffusers folder, from ``model_index.json`` and the denoiser's config
    (``unet/config.json``, or SD3's ``transformer/config.json``)."""
    index = _read_json(folder / "model_index.json")
    denoiser = "transformer" if is_sd3_index(index) else "unet"
    return from_configs(index, _read_json(folder / denoiser / "config.json"), folder.name)


def is_sd3_index(index: Mapping[str, Any]) -> bool:
    """Whether a ``model_index.json`` describes an SD3 pipeline."""
    has = {k for k, v in index.items() if isinstance(v, list) and v and v[0] is not None}
    return index.get("_class_name") in SD3_PIPELINES or {"transformer", "text_encoder_3"} <= has


def sd3_variant(transformer: Mapping[str, Any]) -> str:
    """SD3's variant from its transformer config: 3.5 added QK-norm, and 3.5 Medium a second
    self-attention in its first blocks (``dual_attention_layers``); Large Turbo has Large's."""
    if not transformer.get("qk_norm"):
        return "medium"
    return "5-medium" if transformer.get("dual_attention_layers") else "5-large"


def from_configs(index: dict, unet: dict, where: str) -> Detected:
    """The family from a pipeline's ``model_index.json`` and its denoiser's config."""
    if is_sd3_index(index):
        variant = sd3_variant(unet)
        return Detected(
            "sd3",
            f"{where}: {index.get('_class_name') or 'model_index.json'}, {SD3_VARIANTS[variant]}",
            variant=variant,
        )
    has = {k for k, v in index.items() if isinstance(v, list) and v[0] is not None}
    return from_unet(unet, has, where, index.get("_class_name", ""))


def from_unet(
    unet: Mapping[str, Any], components: Collection[str], where: str = "", pipeline: str = ""
) -> Detected:
    """The family from a UNet's config and the pipeline components beside it.

    Args:
        unet: The UNet's config (``unet/config.json``, or a loaded UNet's ``config``).
        components: The pipeline's components that are present (``text_encoder_2`` says
            SDXL); empty to judge the UNet alone.
        where: The model, for the evidence.
        pipeline: ``model_index.json``'s ``_class_name``, when known.
    """
    has = set(components)
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
    if any(k.startswith(_SD3_JOINT_BLOCKS) for k in keys):
        qk_norm = any(k.startswith(_SD3_JOINT_BLOCKS) and _SD3_QK_NORM in k for k in keys)
        attn2 = any(k.startswith(_SD3_JOINT_BLOCKS) and _SD3_ATTN2 in k for k in keys)
        variant = sd3_variant({"qk_norm": qk_norm, "dual_attention_layers": attn2})
        return Detected(
            "sd3", f"{where}: MMDiT joint blocks, {SD3_VARIANTS[variant]}", variant=variant
        )
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
    if not detected.certain and {config.arch, detected.name} <= {"sd1", "sd2"}:
        return []  # neither SD 1.x's nor 2.x's width: the user names it
    return [
        f"{key}: but model.pretrained is an {ARCHITECTURES[detected.name].title} model "
        f"({detected.evidence}); set "
        f"model.arch = 'auto' or {detected.name!r}"
    ]


def resolve(config: ModelConfig, detected: Detected) -> str:
    """The family training uses: the explicit ``model.arch``, else the detected one, else
    ``sd1`` (a single file whose header says nothing; the load checks it again)."""
    if config.arch != "auto":
        return config.arch
    return detected.name or "sd1"


def _header_keys(path: Path) -> list[str]:
    """The tensor names of a checkpoint; safetensors checks that the header is whole and
    describes the file on disk (no tensor is read)."""
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


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
        index = _read_json(
            Path(hf_hub_download(config.pretrained, "model_index.json", revision=revision))
        )
        denoiser = "transformer" if is_sd3_index(index) else "unet"
        unet = hf_hub_download(config.pretrained, f"{denoiser}/config.json", revision=revision)
    except Exception:  # offline and not cached, or no such file: the load will say why
        return Detected()
    return from_configs(index, _read_json(Path(unet)), config.pretrained)


# ---------------------------------------------------------------- LoRA files

# The run record every file we write carries (trainer.lora.files.TRAINING_METADATA_KEY;
# the models layer sits below lora, so it cannot import the name).
_TRAINING_RECORD = "sdlora_training"
# ``modelspec.architecture`` prefixes (SAI model spec), most specific first.
_MODELSPEC = (
    ("stable-diffusion-xl", "sdxl"),
    ("stable-diffusion-v2", "sd2"),
    ("stable-diffusion-3", "sd3"),
)
_MODELSPEC_V1 = "stable-diffusion-v1"
# Cross-attention key widths: CLIP ViT-L (SD 1.x), OpenCLIP-H (SD 2.x), both of SDXL's.
_LORA_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


@dataclass(frozen=True)
class LoraFamily:
    """What a LoRA file says about the family it was made for.

    Attributes:
        name: ``sd1``, ``sd2``, ``sdxl``, or ``unknown`` when neither header nor keys tell.
        evidence: The header key it was read from, or what in the keys told it.
        in_header: Read from a header key (else from the keys and widths).
    """

    name: str
    evidence: str
    in_header: bool = False


def from_lora(
    metadata: Mapping[str, str],
    components: Collection[str],
    in_features: Mapping[str, int | None],
) -> LoraFamily:
    """A LoRA file's family: from its header, else from its keys and tensor widths.

    Args:
        metadata: The safetensors header's metadata.
        components: The model components it adapts (``unet``, ``text_encoder``...).
        in_features: Each adapted module's name (as the file writes it) and its input width.
    """
    found = _lora_header_family(metadata)
    return found if found is not None else _lora_key_family(components, in_features)


def _lora_header_family(metadata: Mapping[str, str]) -> LoraFamily | None:
    try:
        recorded = json.loads(metadata.get(_TRAINING_RECORD, "{}")).get("architecture")
    except (json.JSONDecodeError, AttributeError):
        recorded = None
    if recorded in ARCHITECTURES:
        return LoraFamily(recorded, _TRAINING_RECORD, True)
    spec = metadata.get("modelspec.architecture", "")
    for prefix, name in (*_MODELSPEC, (_MODELSPEC_V1, "sd1")):
        if spec.startswith(prefix):
            return LoraFamily(name, "modelspec.architecture", True)
    version = metadata.get("ss_base_model_version", "")
    if version in SD3_VARIANTS or version.startswith("sd3"):
        return LoraFamily("sd3", "ss_base_model_version", True)
    if version.startswith("sdxl"):
        return LoraFamily("sdxl", "ss_base_model_version", True)
    if version.startswith("sd_v2") or metadata.get("ss_v2") == "True":
        return LoraFamily("sd2", "ss_base_model_version / ss_v2", True)
    if version.startswith("sd_v1"):
        return LoraFamily("sd1", "ss_base_model_version", True)
    return None


def _lora_key_family(
    components: Collection[str], in_features: Mapping[str, int | None]
) -> LoraFamily:
    names = list(in_features)
    if "transformer" in components or any(
        n.startswith(("lora_transformer_", "lora_unet_joint_blocks_")) for n in names
    ):
        return LoraFamily("sd3", "an SD3 transformer's module names")
    if "text_encoder_2" in components:
        return LoraFamily("sdxl", "two text encoders")
    if any(n.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks")) for n in names):
        return LoraFamily("sdxl", "original-layout UNet names (SDXL trainers use them)")
    widths = {w for n, w in in_features.items() if "attn2" in n and "to_k" in n}
    for width in widths:
        if width in _LORA_WIDTHS:
            return LoraFamily(_LORA_WIDTHS[width], f"cross-attention width {width}")
    if any(n.startswith("lora_te1_") for n in names):
        # kohya numbers the text encoders only when there are two.
        return LoraFamily("sdxl", "lora_te1_, the first of two text encoders")
    return LoraFamily("unknown", "no metadata and no recognisable shapes")
