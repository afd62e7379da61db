"""Which modules LoRA adapts: checking ``lora.target_modules`` before anything is trained.

Names are matched as peft matches a list of targets: a module whose full name is the target,
or ends with ``.`` + the target. A target that matches nothing is reported with a few valid
names, from the model's config alone (built on the meta device, no weights read) when the
model is a local diffusers folder, so a typo costs seconds, not a model load.
"""

from __future__ import annotations

from pathlib import Path

import torch


def lora_target_problems(
    source: str,
    targets: tuple[str, ...],
    text_encoder_targets: tuple[str, ...] | None,
    text_encoder_2_targets: tuple[str, ...] | None = None,
) -> list[str]:
    """Target module names that match nothing, checked on the model's config alone.

    The UNet or SD3's transformer (and the trained text encoders: SDXL's second and both of
    SD3's are ``CLIPTextModelWithProjection``) are built on the meta device from their
    ``config.json``,
    so no weights are read, and names are matched as peft matches a list: a module whose full
    name is the target or ends with ``.target``. Only local diffusers folders are checked
    here; a single-file checkpoint is checked when the adapters are attached.
    """
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return []
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    key = "lora.text_encoder_target_modules"
    # SD3: an MMDiT in transformer/, and both CLIPs with their projection.
    sd3 = (folder / "transformer" / "config.json").is_file()
    denoiser = SD3Transformer2DModel if sd3 else UNet2DConditionModel
    first = CLIPTextModelWithProjection if sd3 else CLIPTextModel
    with init_empty_weights():
        unet = denoiser.from_config(
            denoiser.load_config(folder, subfolder="transformer" if sd3 else "unet")
        )
        models = [("lora.target_modules", targets, unet)]
        for names, subfolder, cls in (
            (text_encoder_targets, "text_encoder", first),
            (text_encoder_2_targets, "text_encoder_2", CLIPTextModelWithProjection),
        ):
            if names is not None:
                encoder = cls(CLIPTextConfig.from_pretrained(folder, subfolder=subfolder))
                models.append((key, names, encoder))
    problems = []
    for key, names, model in models:
        problems += target_problems(key, names, model)
    return list(dict.fromkeys(problems))


# The names users target most, listed first when suggesting valid names.
COMMON_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2",
)  # fmt: skip


def adaptable_names(model: torch.nn.Module) -> list[str]:
    """Short names of the modules LoRA can adapt (Linear and Conv2d layers), e.g. ``to_q``,
    ``to_out.0``: what ``lora.target_modules`` may list; the common targets first."""
    full = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    common = [t for t in COMMON_TARGETS if any(n == t or n.endswith(f".{t}") for n in full)]
    names = set()
    for name in full:
        parts = name.split(".")
        # A numbered child (to_out.0) is named with its parent, as peft users write it.
        names.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
    return common + sorted(names - set(common))


def target_problems(key: str, targets: tuple[str, ...], model: torch.nn.Module) -> list[str]:
    """The targets that match no module of ``model`` (peft's list-matching rule)."""
    names = [name for name, _ in model.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if not unmatched:
        return []
    valid = adaptable_names(model)
    shown = ", ".join(valid[:12]) + (", ..." if len(valid) > 12 else "")
    return [
        f"{key}: {', '.join(repr(t) for t in unmatched)} match no module of the "
        f"{type(model).__name__}; valid names include {shown}"
    ]
