"""``sdlora sample``: the base model and a LoRA at several strengths, side by side, same seed.

One row per prompt; the first column is the base model without the LoRA, then one column per
LoRA scale. Every image of a row starts from the same noise (the same seed), so the columns
differ only by the LoRA and its scale. The grid is one PNG whose text chunks hold the prompts
and every setting, so the picture documents how it was made.

A plain LoRA is loaded by diffusers (``load_lora_weights``, any format it reads, kohya
included) and scaled with ``set_adapters``, which scales the UNet and text-encoder parts
together. diffusers cannot load LoHa or LoKr files, nor the per-input DoRA that is our
default, and it drops a kohya file's DoRA magnitudes with a warning only. So our own
diffusers-format file of those types is loaded the way training built it: the adapters
attached by peft from the ``[lora]`` settings in its header, then its tensors loaded and
checked key by key; the scale multiplies every adapter's own scaling. Our kohya-format file
of those types is refused, naming the diffusers file to use. An SDXL model
(``trainer/models/family.py`` tells) is drawn with the SDXL pipeline, an SD3 model with
``StableDiffusion3Pipeline`` (its own flow-matching sampler; diffusers reads SD3 LoRAs in the
diffusers format only, so an SD3 kohya/ComfyUI file is refused for the diffusers file).

Everything that can be wrong with the request is found before any model loads and reported
together (``trainer/commands/sample_checks.py``): the settings, the device, the model's path, and a
LoRA made for another family than the model's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from trainer import quiet
from trainer.config.load import ConfigError
from trainer.files import write_atomic
from trainer.lora.files import TRAINING_METADATA_KEY, WEIGHTS_NAME, LoraFileError, read_header
from trainer.lora.formats import FORMAT_DIFFUSERS, Parsed, parse
from trainer.lora.metadata import model_name
from trainer.models import family as model_family
from trainer.report import grids

ADAPTER = "lora"


@dataclass(frozen=True)
class SampleSettings:
    """How the grid is drawn; all of it goes into the PNG's metadata."""

    prompts: tuple[str, ...]
    scales: tuple[float, ...] = (0.0, 0.5, 1.0)
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    negative_prompt: str = ""


def parse_scales(text: str) -> tuple[float, ...]:
    """``"0,0.5,1"`` → ``(0.0, 0.5, 1.0)``; negative scales are fine (they invert the LoRA).
    ``nan`` and ``1e999`` parse: ``sample_checks.settings_problems`` refuses them.

    Raises:
        ValueError: for anything that is not a comma-separated list of numbers.
    """
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--scales {text!r}: expected numbers separated by commas") from None
    if not scales:
        raise ValueError("--scales: give at least one LoRA scale, e.g. 0,0.5,1")
    return scales


@dataclass(frozen=True)
class LoraSource:
    """What drawing a LoRA file needs to know, read once from its header."""

    path: Path
    # Its sdlora record when it needs the peft path (a DoRA, LoHa or LoKr in our diffusers
    # format), else None: diffusers loads it.
    record: dict | None
    unet_only: bool  # holds no text-encoder tensors
    family: str = "unknown"  # sd1, sd2, sdxl, sd3 or unknown
    family_evidence: str = ""  # where the family was read, for messages
    base_model: str = ""  # the model it was trained on, when the header names it
    resolution: int = 512  # its training side (modelspec.resolution), else 512
    kohya: bool = False  # in the kohya/LyCORIS format (not diffusers/PEFT)


class _HeaderFacts(TypedDict):
    """The :class:`LoraSource` fields read from a file's header."""

    family: str
    family_evidence: str
    base_model: str
    resolution: int


def _family(parsed: Parsed, metadata: dict[str, str]) -> tuple[str, str]:
    """The LoRA's family as ``sdlora inspect`` tells it, and where it was read, for messages."""
    widths = {name: module.in_features for name, module in parsed.modules.items()}
    found = model_family.from_lora(metadata, parsed.components, widths)
    where = f"its header's {found.evidence}" if found.in_header else f"its keys: {found.evidence}"
    return found.name, where


def check_lora(path: Path) -> LoraSource:
    """Read the file's header; raise for what no path can draw."""
    header = read_header(path)
    parsed = parse(header)
    if parsed is None:
        raise LoraFileError(f"{path}: holds no LoRA tensors; `sdlora inspect` tells what it is")
    unet_only = parsed.components in (["unet"], ["transformer"])
    meta = header.metadata
    record = json.loads(meta.get(TRAINING_METADATA_KEY, "{}") or "{}")
    side = meta.get("modelspec.resolution", "").split("x", 1)[0]
    family, evidence = _family(parsed, meta)
    facts: dict[str, Any] = {
        "family": family,
        "family_evidence": evidence,
        "base_model": record.get("base_model") or meta.get("ss_sd_model_name", ""),
        "resolution": int(side) if side.isdigit() else 512,
        "kohya": parsed.format != FORMAT_DIFFUSERS,
    }
    adapter = record.get("adapter_type", "lora")
    if adapter == "lora":
        return LoraSource(path, None, unet_only, **facts)
    if parsed.format != FORMAT_DIFFUSERS:
        raise LoraFileError(
            f"{path}: a {adapter} in kohya format, which diffusers cannot draw faithfully; "
            f"give the diffusers-format file of the same run ({WEIGHTS_NAME}; `sdlora export "
            "--format diffusers` writes it from a checkpoint) to --lora"
        )
    return LoraSource(path, record, unet_only, **facts)


def _peft_adapters(pipe, lora: Path, record: dict) -> list:
    """Attach the file's adapters to the pipeline's models as training did, load its tensors,
    and return every adapter layer (to scale them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from trainer.config.load import LoraConfig
    from trainer.lora import adapters as lora_module
    from trainer.models import conditioning

    settings = LoraConfig(
        type=record["adapter_type"],
        rank=int(record["rank"]),
        alpha=float(record["alpha"]),
        target_modules=tuple(record["target_modules"]),
        text_encoder_target_modules=tuple(record.get("text_encoder_target_modules") or ())
        or LoraConfig().text_encoder_target_modules,
        **record.get("adapter_args", {}),
    )
    encoders = {
        name: getattr(pipe, name)
        for name in ("text_encoder", "text_encoder_2")
        if record.get(f"{name}_trained") and getattr(pipe, name, None) is not None
    }
    transformer = getattr(pipe, "transformer", None)  # SD3's
    denoiser = pipe.unet if transformer is None else transformer
    sdxl = transformer is None and model_family.from_unet(pipe.unet.config, ()).name == "sdxl"
    lora_module.attach(denoiser, encoders, settings, conditioning.unread_layers(sdxl))
    try:
        lora_module.load_into(lora, denoiser, encoders)
    except ValueError as err:
        raise LoraFileError(f"{err}; is --model the model it was trained on?") from err
    models = [denoiser, *encoders.values()]
    for model in models:
        # The adapters were made fp32 for training; draw them in the pipeline's dtype, as
        # diffusers' own loader does (a model-wide .to(dtype) would warn about fp32 modules).
        for param in model.parameters():
            if param.requires_grad:
                param.requires_grad_(False)
                param.data = param.data.to(pipe.device, denoiser.dtype)
    return [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def _not_fitting(path: Path) -> Iterator[None]:
    """diffusers' error for a LoRA of other shapes (a file whose header does not say its family,
    so the checks could not tell) as one line naming the file, not a page of size mismatches."""
    try:
        with quiet.dropping(quiet.LORA_LOAD_FAILED, quiet.DIFFUSERS_LORA_LOGGERS):
            yield
    except (RuntimeError, ValueError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        if isinstance(err, torch.OutOfMemoryError) or not lines:
            raise
        first = lines[0].rstrip(":") + (f": {lines[1]}" if len(lines) > 1 else "")
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        raise LoraFileError(
            f"{path}: does not fit --model: {first}{more}; a LoRA for another model family? "
            "`sdlora inspect FILE --against MODEL` lists the keys that do not fit"
        ) from err


def apply_lora(pipe, lora: LoraSource) -> Callable[[float], None]:
    """Load the LoRA (from :func:`check_lora`) into the pipeline; return the function that
    sets its strength."""
    if lora.record is None:
        # A UNet-only LoRA is the usual case, not worth diffusers' per-encoder notice.
        drop = quiet.DIFFUSERS_LORA_LOGGERS if lora.unet_only else ()
        with quiet.dropping(quiet.NO_TEXT_KEYS, drop), _not_fitting(lora.path):
            pipe.load_lora_weights(
                str(lora.path.parent), weight_name=lora.path.name, adapter_name=ADAPTER
            )
        return lambda scale: pipe.set_adapters([ADAPTER], adapter_weights=[scale])
    layers = _peft_adapters(pipe, lora.path, lora.record)
    trained = [(layer, dict(layer.scaling)) for layer in layers]  # alpha / rank of each

    def set_scale(scale: float) -> None:
        for layer, scaling in trained:
            for name, value in scaling.items():
                layer.scaling[name] = value * scale

    return set_scale


def _render(pipe, prompt: str, settings: SampleSettings) -> Image.Image:
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    return pipe(
        prompt,
        negative_prompt=settings.negative_prompt or None,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        width=settings.width,
        height=settings.height,
        generator=generator,
    ).images[0]


def render(
    lora: LoraSource, model: str, settings: SampleSettings, device: str
) -> list[list[Image.Image]]:
    """Images per prompt: the base model's, then the LoRA's at each scale."""
    quiet.import_notices()
    from diffusers import (
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    from trainer.config.load import ModelConfig

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    family = model_family.detect(ModelConfig(pretrained=model)).name
    if family == "sd3":
        pipe = StableDiffusion3Pipeline.from_pretrained(model, dtype=dtype)
    elif family == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(model, dtype=dtype)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            model, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    rows = [[_render(pipe, prompt, settings)] for prompt in settings.prompts]
    set_scale = apply_lora(pipe, lora)
    for scale in settings.scales:
        set_scale(scale)
        for row, prompt in zip(rows, settings.prompts, strict=True):
            row.append(_render(pipe, prompt, settings))
    return rows


def png_metadata(lora: Path, model: str, settings: SampleSettings, labels: list[str]) -> PngInfo:
    """tEXt chunks: the prompts, and every setting as JSON (names without local folders)."""
    info = PngInfo()
    info.add_text("prompt", "\n".join(settings.prompts))
    record = {
        **asdict(settings),
        "lora": lora.name,
        "model": model_name(model),
        "columns": labels,
    }
    info.add_text("sdlora_sample", json.dumps(record))
    return info


def sample(
    lora: str | Path, model: str, settings: SampleSettings, out: str | Path, device: str = ""
) -> Path:
    """Render the comparison grid and write it to ``out`` (PNG); return its path.

    Raises:
        LoraFileError: the LoRA file is missing, truncated or not a LoRA.
        ConfigError: every problem ``sample_checks.problems`` finds, before any model loads.
    """
    from trainer.commands.sample_checks import problems

    source = check_lora(Path(lora))
    found = problems(source, model, settings, device)
    if found:
        raise ConfigError(found, "sdlora sample")
    return draw(source, model, settings, out, device)


def draw(
    source: LoraSource, model: str, settings: SampleSettings, out: str | Path, device: str = ""
) -> Path:
    """:func:`sample` once the request is checked."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = render(source, model, settings, device)
    labels = ["base"] + [f"lora x{s:g}" for s in settings.scales]
    # Column labels only: the prompts are in the PNG's text chunks, one row each.
    image = grids.grid(rows, None, labels)
    info = png_metadata(source.path, model, settings, labels)
    return write_atomic(out, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
