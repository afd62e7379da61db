"""Fixed-seed sample images at every validation point: drawn, named, tagged and gridded.

Layout under ``output_dir/samples/``::

    step-000200/p00-seed0.png   prompt 0 of validation.prompts at update 200, seed 0
    step-000200/grid.png        every prompt of that point, one row per prompt
    progression.png             rows = prompts, columns = validation points (written at the end)

Every image is drawn by the model family's diffusers pipeline (``StableDiffusionPipeline``, or
``StableDiffusionXLPipeline`` for SDXL: both text encoders, size conditioning) with DDIM, or by
``StableDiffusion3Pipeline`` with the model's flow-matching Euler sampler for SD3, and a
CPU ``torch.Generator`` seeded with
``validation.sample_seed`` (the same seed for every prompt, the one in the file name), so the
settings in its metadata redraw it in diffusers from the same weights, and images of
different steps or runs differ only by the weights. Each PNG carries its settings as text
chunks: ``sdlora`` (JSON: prompt, negative prompt, seed, steps, guidance, size, sampler,
update, run) and ``parameters`` in the A1111 layout that A1111/Forge "PNG Info" and image
sites read.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from trainer import quiet
from trainer.files import write_atomic
from trainer.models.accessors import move
from trainer.report import grids
from trainer.step_folders import numbered_folders, step_name

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler

    from trainer.config.load import RunConfig
    from trainer.models.load import Components
    from trainer.run.state import RunState

SAMPLES_DIR = "samples"
METADATA_KEY = "sdlora"
A1111_KEY = "parameters"
SAMPLER = "DDIM"
SD3_SAMPLER = "Euler (flow matching)"  # FlowMatchEulerDiscreteScheduler, the model's config
GRID_TAG = "samples/grid"


@dataclass(frozen=True)
class SampleSpec:
    """How the samples of a run are drawn: the same at every validation point."""

    prompts: tuple[str, ...]
    seed: int
    steps: int
    guidance_scale: float
    size: int
    run: str
    negative_prompt: str = ""
    sampler: str = SAMPLER

    @classmethod
    def from_config(cls, config: RunConfig) -> SampleSpec:
        """The spec of ``config``'s run; the run is named after its output folder."""
        val = config.validation
        return cls(
            prompts=tuple(val.prompts),
            seed=val.sample_seed,
            steps=val.sample_steps,
            guidance_scale=val.guidance_scale,
            size=config.data.resolution,
            run=Path(config.output_dir).resolve().name,
            negative_prompt=val.negative_prompt,
        )

    def metadata(self, index: int, step: int) -> dict[str, Any]:
        """The facts stored in the PNG of prompt ``index`` at update ``step``."""
        facts: dict[str, Any] = {
            "prompt": self.prompts[index],
            "prompt_index": index,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "width": self.size,
            "height": self.size,
            "sampler": self.sampler,
            "generator": "cpu",
            "step": step,
            "run": self.run,
        }
        if not self.negative_prompt:
            del facts["negative_prompt"]
        return facts


def save_png(image: Image.Image, path: Path, info: PngInfo) -> None:
    """Write a PNG atomically: a kill mid-write leaves the previous file or none."""
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def step_folder(output_dir: str | Path, step: int) -> Path:
    """The folder of the samples drawn at update ``step``."""
    return Path(output_dir) / SAMPLES_DIR / step_name(step)


def image_name(index: int, seed: int) -> str:
    """``p00-seed0.png``: the prompt's index in validation.prompts, and the seed."""
    return f"p{index:02d}-seed{seed}.png"


def a1111_parameters(facts: dict[str, Any]) -> str:
    """The settings in the A1111 ``parameters`` layout: the prompt, an optional
    ``Negative prompt:`` line, then one line of ``Key: value`` pairs."""
    lines = [facts["prompt"]]
    if facts.get("negative_prompt"):
        lines.append(f"Negative prompt: {facts['negative_prompt']}")
    pairs = {
        "Steps": facts["steps"],
        "Sampler": facts["sampler"],
        "CFG scale": facts["guidance_scale"],
        "Seed": facts["seed"],
        "Size": f"{facts['width']}x{facts['height']}",
        "Lora": facts["run"],
        "Training step": facts["step"],
    }
    lines.append(", ".join(f"{key}: {value}" for key, value in pairs.items()))
    return "\n".join(lines)


def png_info(facts: dict[str, Any], a1111: str | None = None) -> PngInfo:
    """PNG text chunks: the facts as JSON, and the A1111 ``parameters`` text when given.

    PIL writes a chunk as tEXt when it is Latin-1 and as iTXt (UTF-8) otherwise, so any
    prompt round-trips.
    """
    info = PngInfo()
    info.add_text(METADATA_KEY, json.dumps(facts, ensure_ascii=False))
    if a1111 is not None:
        info.add_text(A1111_KEY, a1111)
    return info


# ---------------------------------------------------------------- drawing


def _import_pipeline():
    """diffusers' SD pipeline and DDIM, imported without transformers' torchvision notice."""
    quiet.import_notices()
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return DDIMScheduler, StableDiffusionPipeline


def pipeline_for(parts: Components, unet: torch.nn.Module, text_encoder, scheduler: Any):
    """The family's diffusers pipeline around the live (adapted) modules.

    Args:
        parts: The loaded components (VAE, tokenizers, frozen text encoders).
        unet: The UNet with adapters.
        text_encoder: The text encoder, or SDXL's two in order (trained or frozen).
        scheduler: The sampler.
    """
    _, sd_pipeline = _import_pipeline()
    encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    if parts.architecture == "sd3":
        from trainer.models import sd3

        return sd3.pipeline(parts, unet, encoders, scheduler)
    if parts.architecture == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=parts.vae,
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=parts.tokenizer,
            tokenizer_2=parts.tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    return sd_pipeline(
        vae=parts.vae,
        text_encoder=encoders[0],
        tokenizer=parts.tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_sampler(noise_scheduler_config: Any, ddim: type[DDIMScheduler]) -> Any:
    """The DDIM sampler, built from the training noise scheduler's config.

    SD's ``scheduler_config.json`` (a PNDM config) has no ``clip_sample`` key, so the
    training ``DDPMScheduler`` fills in its default, ``True``, and lists the key under
    ``_use_default_values``. ``from_config`` drops such listed keys and lets DDIM's own default
    apply, again ``True``. Clipping SD latents to [-1, 1] is wrong: diffusers' pipeline says
    so in a 20-line FutureWarning at every construction and switches it off. Passing
    ``clip_sample=False`` as an argument (arguments win over the config) gives the same images
    without the warning.
    """
    return ddim.from_config(noise_scheduler_config, clip_sample=False)


@torch.no_grad()
def draw(
    spec: SampleSpec,
    step: int,
    parts: Components,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | list[torch.nn.Module],
    folder: Path,
    progress: Callable[[Iterable], Iterable] = iter,
) -> list[Image.Image]:
    """Draw one image per prompt with the current adapters, save each with its metadata.

    Args:
        spec: The prompts and settings.
        step: The update the weights are at (in the metadata).
        parts: The loaded components (VAE, tokenizer, training noise scheduler).
        unet: The unwrapped UNet with adapters.
        text_encoder: The (unwrapped) text encoder, or SDXL's two in order.
        folder: Where the PNGs go (``samples/step-NNNNNN``).
        progress: Wraps the prompt loop (a progress bar).

    Returns:
        The images, in prompt order.
    """
    ddim, _ = _import_pipeline()
    device = next(unet.parameters()).device
    vae_device = parts.vae.device
    move(parts.vae, device)  # the VAE may sit on the CPU while training from cached latents
    extra: dict[str, Any] = {}
    if parts.architecture == "sd3":
        from trainer.models import sd3

        sampler = sd3.sampler(parts)
        extra["max_sequence_length"] = parts.t5_max_length  # T5 tokens, as trained
    else:
        sampler = make_sampler(parts.noise_scheduler.config, ddim)
    pipe = pipeline_for(parts, unet, text_encoder, sampler)
    pipe.set_progress_bar_config(disable=True)
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    try:
        for k in progress(range(len(spec.prompts))):
            # A CPU generator draws the same noise on any device, as diffusers users seed it.
            generator = torch.Generator("cpu").manual_seed(spec.seed)
            image = pipe(
                spec.prompts[k],
                negative_prompt=spec.negative_prompt or None,
                height=spec.size,
                width=spec.size,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                generator=generator,
                **extra,
            ).images[0]
            facts = spec.metadata(k, step)
            info = png_info(facts, a1111_parameters(facts))
            save_png(image, folder / image_name(k, spec.seed), info)
            images.append(image)
    finally:
        move(parts.vae, vae_device)
    return images


def sample_point(
    state: RunState,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | list[torch.nn.Module],
) -> Path:
    """Draw the samples of the current update (main process): a line saying so, a bar over
    the prompts, the images and their grid, and the grid in tensorboard/wandb.

    Returns:
        The folder of this point's samples.
    """
    spec, step, tracker = SampleSpec.from_config(state.config), state.update, state.tracker
    if state.architecture == "sd3":
        spec = dataclasses.replace(spec, sampler=SD3_SAMPLER)
    folder = step_folder(state.output_dir, step)
    count = len(spec.prompts)
    tracker.message(f"sampling {count} prompt{'s' if count > 1 else ''} at update {step}")
    start = time.monotonic()
    images = draw(
        spec, step, state.parts, unet, text_encoder, folder,
        lambda items: tracker.sub_progress(items, f"sampling @{step}", "prompt"),
    )  # fmt: skip
    rows = [[image] for image in images]
    labels = [f"p{k:02d}" for k in range(count)]
    facts = {"run": spec.run, "updates": [step], "prompts": list(spec.prompts), "seed": spec.seed}
    save_png(grids.grid(rows, labels), folder / grids.GRID_NAME, png_info(facts))
    tracker.log_image(GRID_TAG, grids.grid(rows, labels, tile_max=grids.TILE_MAX), step)
    tracker.message(f"samples at update {step} ({time.monotonic() - start:.1f} s): {folder}")
    return folder


def drop_after(output_dir: str | Path, step: int) -> None:
    """Remove the sample folders of updates after ``step``: a run resumed from an earlier
    checkpoint draws them again, and stale ones would end up in the progression grid."""
    for folder_step, folder in numbered_folders(Path(output_dir) / SAMPLES_DIR):
        if folder_step > step:
            shutil.rmtree(folder)


def write_progression(state: RunState) -> Path | None:
    """``samples/progression.png`` (main process): rows are prompts, columns are validation
    points (at most :data:`grids.MAX_COLUMNS`, evenly spread, first and last kept), from the
    images on disk, so points drawn before a resume are included. None without samples."""
    if not (state.accelerator.is_main_process and state.config.validation.prompts):
        return None
    spec = SampleSpec.from_config(state.config)
    root = state.output_dir / SAMPLES_DIR
    points = numbered_folders(root)
    if not points:
        return None
    points = [points[i] for i in grids.spread(len(points), grids.MAX_COLUMNS)]
    # The prompts may have changed between sessions: a row per index seen, blank where absent.
    found = [grids.images_by_prompt(folder) for _, folder in points]
    indices = sorted({k for images in found for k in images})
    if not indices:
        return None
    rows = [[_load(images[k]) if k in images else None for images in found] for k in indices]
    steps = [s for s, _ in points]
    image = grids.grid(
        rows, [f"p{k:02d}" for k in indices], [f"step {s}" for s in steps], grids.TILE_MAX
    )
    facts = {"run": spec.run, "updates": steps, "prompts": list(spec.prompts), "seed": spec.seed}
    path = root / grids.PROGRESSION_NAME
    save_png(image, path, png_info(facts))
    state.tracker.message(f"progression of the samples: {path}")
    return path


def _load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")
