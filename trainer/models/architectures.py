"""The base-model families a LoRA can be made for, and what the clients call each of them.

One row per family. Everything that differs between SD 1.x, SD 2.x, SDXL and SD3 in the files we
write comes from here: which text encoders there are and the kohya prefix of each, how the
kohya file names UNet blocks, and the version strings A1111/Forge and the SAI model spec read.
Adding a family (or SDXL training) means adding or using a row, not editing the writers.

Sources of the strings (read in the clients' code):
- ``ss_base_model_version``: kohya sd-scripts ``library/model_util.py`` (``sd_v1``, ``sd_v2``,
  with ``_v`` appended for v-prediction) and ``library/sdxl_model_util.py``
  (``sdxl_base_v1-0``). A1111 ``extensions-builtin/Lora/network.py`` shows a LoRA as SDXL
  when this starts with ``sdxl_``, as SD2 when ``ss_v2`` is the string ``"True"``.
- ``modelspec.architecture``: kohya ``library/sai_model_spec.py`` and the SAI ModelSpec
  README (``stable-diffusion-v1``, ``stable-diffusion-v2-512``, ``stable-diffusion-v2-768-v``,
  ``stable-diffusion-xl-v1-base``), with ``/lora`` appended for a LoRA.
- SD3: kohya ``sd3_train_network.py`` writes the MMDiT's variant (``library/sd3_utils.py``
  ``model_type``: ``medium``, ``5-large``, ``5-medium``) as ``ss_base_model_version`` and
  ``stable-diffusion-3-<variant>`` as the architecture (``sai_model_spec.py``), with the
  diffusers implementation. The transformer's kohya-style names are ComfyUI's SD3 rule for
  OneTrainer files (``comfy/lora.py``: ``lora_transformer_`` + the diffusers path with ``_``),
  and the two CLIPs are ``lora_te1``/``lora_te2`` as in kohya's ``networks/lora_sd3.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

ArchName = Literal["sd1", "sd2", "sdxl", "sd3"]

# kohya and SAI spell the implementation of an SD1/SD2 LoRA "diffusers" and of an SDXL LoRA as
# Stability's repository (sai_model_spec.py: LoRA + SDXL -> generative-models).
_IMPL_DIFFUSERS = "diffusers"
_IMPL_SGM = "https://github.com/Stability-AI/generative-models"


@dataclass(frozen=True)
class Architecture:
    """How one base-model family is named in LoRA files.

    Attributes:
        name: ``sd1``, ``sd2``, ``sdxl`` or ``sd3``.
        text_encoders: The diffusers pipeline components holding the text encoders a LoRA
            may adapt, in order (SD3's T5 is never adapted).
        kohya_text_prefixes: The kohya key prefix of each of those text encoders: ``lora_te``
            for a model with one, ``lora_te1``/``lora_te2`` for SDXL's two.
        kohya_unet_style: ``diffusers`` when the kohya file names UNet modules by diffusers'
            paths (``down_blocks_1_attentions_0_…``: kohya's SD1/SD2 UNet uses them);
            ``ldm`` when it names them by the original checkpoint's paths
            (``input_blocks_4_1_…``: kohya's SDXL UNet uses those); ``transformer`` for SD3,
            whose denoiser is named ``lora_transformer_`` + its diffusers path.
        base_model_version: kohya's ``ss_base_model_version`` for epsilon prediction.
        v2: kohya's ``ss_v2``.
        resolution: The family's native training resolution (side, pixels).
        implementation: ``modelspec.implementation`` of a LoRA for this family.
        title: The family as messages name it (``SD 1.x``).
        denoiser: The diffusers component of the denoising model: ``unet``, or SD3's
            ``transformer`` (the prefix of its keys in a diffusers LoRA file).
    """

    name: ArchName
    text_encoders: tuple[str, ...]
    kohya_text_prefixes: tuple[str, ...]
    kohya_unet_style: Literal["diffusers", "ldm", "transformer"]
    base_model_version: str
    v2: bool
    resolution: int
    implementation: str
    title: str
    denoiser: str = "unet"

    def version_string(self, prediction_type: str, variant: str = "") -> str:
        """``ss_base_model_version``; kohya appends ``_v`` for v-prediction on SD1/SD2, and
        writes SD3's variant (``5-medium``) where it is known."""
        if self.name == "sd3":
            return variant or self.base_model_version
        if self.name != "sdxl" and prediction_type == "v_prediction":
            return self.base_model_version + "_v"
        return self.base_model_version

    def modelspec_architecture(self, prediction_type: str, variant: str = "") -> str:
        """``modelspec.architecture`` of a LoRA for this family, e.g. ``stable-diffusion-v1/lora``.

        SD 2.x is two architectures in the spec: 512 px epsilon and 768 px v-prediction; SD3
        one per variant (``stable-diffusion-3-5-medium``).
        """
        if self.name == "sd3":
            return f"stable-diffusion-3{'-' + variant if variant else ''}/lora"
        base = {
            "sd1": "stable-diffusion-v1",
            "sd2": "stable-diffusion-v2-768-v"
            if prediction_type == "v_prediction"
            else "stable-diffusion-v2-512",
            "sdxl": "stable-diffusion-xl-v1-base",
        }[self.name]
        return f"{base}/lora"

    def kohya_text_prefix(self, component: str) -> str:
        """The kohya prefix of a text-encoder component (``text_encoder`` → ``lora_te``)."""
        try:
            return self.kohya_text_prefixes[self.text_encoders.index(component)]
        except ValueError:
            raise ValueError(
                f"{self.name} has text encoders {list(self.text_encoders)}, not {component!r}"
            ) from None


ARCHITECTURES: dict[str, Architecture] = {
    "sd1": Architecture(
        "sd1",
        ("text_encoder",),
        ("lora_te",),
        "diffusers",
        "sd_v1",
        False,
        512,
        _IMPL_DIFFUSERS,
        "SD 1.x",
    ),
    "sd2": Architecture(
        "sd2",
        ("text_encoder",),
        ("lora_te",),
        "diffusers",
        "sd_v2",
        True,
        768,
        _IMPL_DIFFUSERS,
        "SD 2.x",
    ),
    "sdxl": Architecture(
        "sdxl",
        ("text_encoder", "text_encoder_2"),
        ("lora_te1", "lora_te2"),
        "ldm",
        "sdxl_base_v1-0",
        False,
        1024,
        _IMPL_SGM,
        "SDXL",
    ),
    "sd3": Architecture(
        "sd3",
        ("text_encoder", "text_encoder_2"),
        ("lora_te1", "lora_te2"),
        "transformer",
        "sd3",
        False,
        1024,
        _IMPL_DIFFUSERS,
        "SD3",
        denoiser="transformer",
    ),
}


def get(name: str) -> Architecture:
    """The architecture called ``name``; a clear error for anything else."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; expected one of {', '.join(ARCHITECTURES)}"
        ) from None


def detect(unet_config: Mapping[str, Any], text_encoder_count: int = 1) -> Architecture:
    """The row of a loaded model: ``trainer.models.family.from_unet``'s decision from its UNet
    config and how many text encoders it has (SD 1.x for a width of neither SD 1.x nor 2.x, as
    kohya does without ``--v2``/``--sdxl``)."""
    from trainer.models import family  # family reads this table's titles

    encoders = ("text_encoder", "text_encoder_2")[:text_encoder_count]
    return get(family.from_unet(unet_config, encoders).name)


def detect_from_width(cross_attention_dim: int | None, text_encoder_count: int) -> Architecture:
    """The row of a LoRA's tensors alone (a file without the facts in its header):
    ``trainer.models.family.from_lora``'s decision from the width its cross-attention keys
    read and how many text encoders it adapts; SD 1.x when they do not tell."""
    from trainer.models import family

    components = ("unet", "text_encoder", "text_encoder_2")[: text_encoder_count + 1]
    widths = {"attn2.to_k": cross_attention_dim} if cross_attention_dim else {}
    found = family.from_lora({}, components, widths)
    return ARCHITECTURES.get(found.name, ARCHITECTURES["sd1"])
