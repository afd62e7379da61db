"""What is wrong with an ``sdlora sample`` request, found before any model loads.

Each check returns one message per problem, naming the flag and the fix, so the command can
report them all at once: the settings the pipelines would refuse (a side that is not a multiple
of 8, no step) or draw as a black image (a NaN or infinite scale), a device this machine lacks,
a model path that does not exist, and a LoRA made for another family than the model's.

Both families are told by ``trainer/models/family.py``: a LoRA's from its header (our files
write it in ``sdlora_training``, ``modelspec.architecture`` and ``ss_base_model_version``) or
its keys, as ``sdlora inspect`` shows it; the model's from its configs, as for training.
SDXL against SD 1.x/2.x never loads: it would end in a shape error deep in diffusers after the
pipeline loaded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from trainer.commands.sample import LoraSource, SampleSettings

# The pipelines refuse a side that is not a multiple of 8 (``check_inputs``), the VAE's
# downsampling factor of every SD family.
SIDE_MULTIPLE = 8


def settings_problems(settings: SampleSettings) -> list[str]:
    """What the pipeline would refuse, or draw as a black image, in the settings."""
    found = []
    if not settings.prompts:
        found.append("--prompt: give at least one prompt")
    bad = [s for s in settings.scales if not math.isfinite(s)]
    if bad:
        found.append(
            f"--scales: {', '.join(map(str, bad))} is not a finite number (it would draw a "
            "black image); give scales such as -1,0,0.5,1"
        )
    if settings.steps < 1:
        found.append(f"--steps {settings.steps}: give at least 1 denoising step (e.g. 20)")
    if not math.isfinite(settings.guidance_scale):
        found.append(f"--guidance-scale {settings.guidance_scale}: not a finite number")
    for side in dict.fromkeys((settings.width, settings.height)):
        if side <= 0 or side % SIDE_MULTIPLE:
            near = max(SIDE_MULTIPLE, round(side / SIDE_MULTIPLE) * SIDE_MULTIPLE)
            found.append(
                f"--resolution {side}: must be a positive multiple of {SIDE_MULTIPLE} (the "
                f"VAE's downsampling factor), e.g. {near}"
            )
    return found


def device_problems(device: str) -> list[str]:
    """Why ``device`` (empty: CUDA when present, else the CPU) cannot draw here."""
    if not device:
        return []
    try:
        kind = torch.device(device)
    except RuntimeError:
        return [
            f"--device {device!r}: not a torch device; give cpu, cuda or cuda:N, or leave it out"
        ]
    if kind.type == "cuda":
        if not torch.cuda.is_available():
            return [
                f"--device {device}: CUDA is not available here (this torch "
                f"{'has no CUDA build' if torch.version.cuda is None else 'finds no GPU'}); "
                "use --device cpu, or leave --device out to use CUDA only when present"
            ]
        count = torch.cuda.device_count()
        if kind.index is not None and kind.index >= count:
            return [
                f"--device {device}: there are {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            ]
    if kind.type == "mps" and not torch.backends.mps.is_available():
        return [f"--device {device}: MPS is not available here; use --device cpu"]
    return []


def model_problems(model: str) -> list[str]:
    """Why ``model`` cannot be loaded as a pipeline: a missing path, a folder that is not a
    diffusers model, a hub id not in the cache while offline (no weights are read)."""
    from trainer.config.load import ModelConfig
    from trainer.models.source import source_problems

    if Path(model).expanduser().suffix == ".safetensors":
        return [
            f"--model {model}: a single-file checkpoint; sdlora sample draws from a diffusers "
            "folder or hub id (the model folder training used)"
        ]
    # source_problems speaks of the config key; here the user typed --model.
    key = f"model.pretrained = {model!r}"
    return [p.replace(key, f"--model {model}", 1) for p in source_problems(ModelConfig(model))]


def family_problems(lora: LoraSource, model: str) -> list[str]:
    """A LoRA made for another family than the model's: SDXL against SD 1.x/2.x never loads,
    nor does SD 1.x against 2.x (other text-encoder widths), whatever the file's format."""
    from trainer.config.load import ModelConfig
    from trainer.models import family as model_family
    from trainer.models.architectures import ARCHITECTURES

    detected = model_family.detect(ModelConfig(model))
    if detected.problem:
        return [f"--model {model}: {detected.problem}"]
    ours, theirs = lora.family, detected.name
    if ours not in ARCHITECTURES or not theirs or ours == theirs:
        return []
    if not detected.certain and {ours, theirs} <= {"sd1", "sd2"}:
        return []  # a UNet width of neither SD 1.x nor 2.x: the names alone differ
    trained = f"; trained on {lora.base_model}" if lora.base_model else ""
    lora_title, model_title = ARCHITECTURES[ours].title, ARCHITECTURES[theirs].title
    return [
        f"--lora {lora.path}: an {lora_title} LoRA ({lora.family_evidence}{trained}), but "
        f"--model {model} is an {model_title} model ({detected.evidence}); give --model "
        f"the {lora_title} model it was made for"
    ]


def problems(
    lora: LoraSource | None, model: str, settings: SampleSettings, device: str
) -> list[str]:
    """Every problem of a request, found without loading a model (empty: draw it).

    Args:
        lora: The checked LoRA file, or None when reading it failed (reported elsewhere).
    """
    found = settings_problems(settings) + device_problems(device)
    missing_model = model_problems(model)
    found += missing_model
    if lora is not None and not missing_model:
        found += family_problems(lora, model)
    if lora is not None and lora.family == "sd3" and lora.kohya:
        # diffusers' SD3 loader reads the diffusers names only (no kohya/ComfyUI converter).
        found.append(
            f"--lora {lora.path}: an SD3 LoRA in kohya/ComfyUI format, which diffusers does not "
            "read; give the diffusers-format file of the same run (pytorch_lora_weights."
            "safetensors; `sdlora export --format diffusers` writes it from a checkpoint)"
        )
    return found
