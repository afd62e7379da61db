"""SDXL LoRA on the tiny SDXL: training, the client files, exact resume, schedules, validation.

Two module-wide runs train the tiny SDXL through the public path (``config.load``,
``loop.run``), each with a checkpoint after every update:

- ``uncached``: no caches, random crops and flips, caption dropout, noise offset, and both text
  encoders trained, each with its own LR (three param groups);
- ``cached``: latent and text caches on (center crops, flips), UNet only, a held-out
  validation set and a sample prompt drawn by the SDXL pipeline.

Each is checked against independent references: diffusers' own SDXL pipeline and LoRA loader
(prompt encoding, pooled embeddings and time ids come from the pipeline), the client key rules
in ``client_rules.py``, the schedule's closed form, and a second run resumed from a
checkpoint, which must end bit for bit where the uninterrupted run ended.
"""

from __future__ import annotations

import json
import math

import client_rules as rules
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from helpers import sample_facts, without_clock
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from trainer.commands import export
from trainer.commands import inspect as inspect_lora
from trainer.lora.files import WEIGHTS_NAME
from trainer.models import conditioning
from trainer.report.tracking import read_metrics
from trainer.run import checkpoint as ckpt
from trainer.run import loop

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
NAME = "xl"
PROMPT = "a red circle"
# Two updates of three micro-batches of two: 16 images make 8 micro-batches an epoch (6 with
# 4 held out), so the checkpoint after update 1 sits mid-epoch, and update 2 crosses nothing
# of the first but continues its epoch exactly where the checkpoint left it.
EXACT = (
    "train.max_steps=2",
    "train.batch_size=2",
    "train.gradient_accumulation_steps=3",
    "checkpoint.every_n_steps=1",
    'output.save_dtype="fp32"',
    f'output.name="{NAME}"',
)
UNCACHED = (
    *EXACT,
    'data.cache_latents="off"',
    'data.cache_text="off"',
    "data.center_crop=false",
    "data.random_flip=true",
    "data.caption_dropout=0.25",
    "train.noise_offset=0.05",
    "lora.train_text_encoder=true",
    "lora.train_text_encoder_2=true",
    # Large enough that the LoRA visibly changes the prediction after two updates.
    "train.learning_rate=2e-2",
    "train.text_encoder_lr=1e-2",
    "train.text_encoder_2_lr=5e-3",
)
CACHED = (
    *EXACT,
    'data.cache_latents="memory"',
    'data.cache_text="on"',
    "data.random_flip=true",
    "validation.fraction=0.25",
    'validation.prompts=["a blue square"]',
    "validation.sample_steps=2",
    "train.learning_rate=2e-2",  # so the samples differ visibly from the base model's
)


@pytest.fixture(scope="module")
def uncached(sdxl_config, tmp_path_factory):
    cfg = sdxl_config(tmp_path_factory.mktemp("sdxl") / "uncached", *UNCACHED)
    return cfg, loop.run(cfg)


@pytest.fixture(scope="module")
def cached(sdxl_config, tmp_path_factory):
    cfg = sdxl_config(tmp_path_factory.mktemp("sdxl") / "cached", *CACHED)
    return cfg, loop.run(cfg)


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS_NAME)


def header(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# ---------------------------------------------------------------- the LoRA in diffusers

ORIGINAL, CROP, TARGET = (96, 80), (3, 7), (64, 64)  # (h, w), (top, left), (h, w)


def pipeline_prediction(pipe: StableDiffusionXLPipeline) -> torch.Tensor:
    """The UNet's prediction for PROMPT with conditioning built by diffusers' SDXL pipeline."""
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(
            PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        time_ids = pipe._get_add_time_ids(
            ORIGINAL,
            CROP,
            TARGET,
            dtype=hidden.dtype,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        )
        return pipe.unet(
            *noisy_input(),
            encoder_hidden_states=hidden,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample


def noisy_input() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([500])


def loaded_pipeline(tiny_sdxl, folder=None, weight_name=None) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    if folder is not None:
        pipe.load_lora_weights(str(folder), weight_name=weight_name)
    return pipe


def test_lora_loads_in_the_sdxl_pipeline_and_reproduces_our_prediction(uncached, tiny_sdxl):
    """Our trained UNet and both text encoders, conditioned by our own code, against the
    pipeline's conditioning and diffusers' loading of the final file."""
    _, result = uncached
    tokenizers = [
        CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder=s) for s in ("tokenizer", "tokenizer_2")
    ]
    ids = conditioning.tokenize(tokenizers, [PROMPT])
    batch = {"input_ids": ids[0], "input_ids_2": ids[1]}
    # SDXL's six ids: original (h, w), crop top-left (top, left), target (h, w).
    batch["time_ids"] = torch.tensor([[*ORIGINAL, *CROP, *TARGET]], dtype=torch.float32)
    with torch.no_grad():
        cond = conditioning.condition(batch, [result.text_encoder, result.text_encoder_2])
        ours = result.unet(*noisy_input(), **cond.unet_kwargs()).sample

    base = pipeline_prediction(loaded_pipeline(tiny_sdxl))
    theirs = pipeline_prediction(loaded_pipeline(tiny_sdxl, result.output_dir))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert (theirs - base).abs().max() > 1e-3, "the LoRA must change the prediction"
    # The kohya file, read by diffusers' converter of kohya's original-layout SDXL names.
    kohya = pipeline_prediction(
        loaded_pipeline(tiny_sdxl, result.output_dir, f"{NAME}.safetensors")
    )
    torch.testing.assert_close(kohya, theirs, rtol=1e-5, atol=1e-6)


def test_every_text_encoder_changes_the_prediction(uncached, tiny_sdxl):
    """Each trained part matters: dropping one part of the LoRA changes the prediction, so
    the comparison above covers the UNet and both text encoders."""
    _, result = uncached
    state = weights(result.output_dir)
    full = pipeline_prediction(loaded_pipeline(tiny_sdxl, result.output_dir))
    for component in ("text_encoder", "text_encoder_2"):
        pipe = loaded_pipeline(tiny_sdxl)
        part = {k: v for k, v in state.items() if not k.startswith(component + ".")}
        pipe.load_lora_weights(part)
        assert (pipeline_prediction(pipe) - full).abs().max() > 1e-4, component


# ---------------------------------------------------------------- key names and metadata


def expected_keys(tiny_sdxl, text: bool) -> tuple[set[str], set[str]]:
    """The diffusers keys and kohya module names for the tiny SDXL, from its module tree and
    the client rules (the first text encoder's last layer is never read by SDXL)."""
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    te1 = CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder")
    te2 = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")
    last = f"layers.{te1.config.num_hidden_layers - 1}."
    models = [("unet", unet, UNET_TARGETS)]
    if text:
        models += [
            ("text_encoder", rules.as_transformers4(te1), TEXT_TARGETS),
            ("text_encoder_2", rules.as_transformers4(te2), TEXT_TARGETS),
        ]
    peft = set()
    for component, model, targets in models:
        for name, _ in model.named_modules():
            if component == "text_encoder" and last in name:
                continue
            if name.endswith(tuple("." + t for t in targets)):
                peft |= {f"{component}.{name}.lora_A.weight", f"{component}.{name}.lora_B.weight"}
    depths = tuple(unet.config.transformer_layers_per_block[1:])
    kohya = rules.sdxl_kohya_attention_names(depths)
    if text:
        names = rules.kohya_names(
            torch.nn.Module(), [rules.as_transformers4(te1), rules.as_transformers4(te2)]
        )
        kohya |= {
            n
            for n in names
            if n.endswith(tuple("_" + t for t in TEXT_TARGETS))
            and not n.startswith(f"lora_te1_text_model_encoder_{last.replace('.', '_')}")
        }
    return peft, kohya


@pytest.mark.parametrize("run", ["uncached", "cached"])
def test_file_keys_are_exactly_the_sdxl_names(run, request, tiny_sdxl):
    cfg, result = request.getfixturevalue(run)
    text = cfg.lora.train_text_encoder
    peft, modules = expected_keys(tiny_sdxl, text)
    assert set(weights(result.output_dir)) == peft
    kohya = set(load_file(result.output_dir / f"{NAME}.safetensors"))
    assert {rules.module_name(k) for k in kohya} == modules
    assert len(kohya) == 3 * len(modules)  # lora_down, lora_up and alpha of each
    prefixes = {k.split("_", 2)[1] for k in kohya}
    assert prefixes == ({"unet", "te1", "te2"} if text else {"unet"})
    meta = header(result.output_dir / f"{NAME}.safetensors")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert header(result.output_dir / WEIGHTS_NAME)["modelspec.architecture"] == (
        "stable-diffusion-xl-v1-base/lora"
    )
    state = json.loads((ckpt.step_dir(result.output_dir, 2) / ckpt.TRAINER_STATE).read_text())
    assert state["architecture"] == "sdxl"
    # `sdlora inspect --against` matches every key to a module of the model, as clients do.
    for name in (WEIGHTS_NAME, f"{NAME}.safetensors"):
        report = inspect_lora.inspect(result.output_dir / name, against=tiny_sdxl)
        assert report.architecture == "sdxl"
        assert (report.unmatched, report.wrong_shape) == ([], []), name


def test_export_of_a_checkpoint_keeps_the_sdxl_names(uncached, tmp_path):
    """Written from the checkpoint alone: its recorded family, not the tensors' widths."""
    _, result = uncached
    step1 = ckpt.step_dir(result.output_dir, 1)
    written = export.export(step1, "kohya", out=tmp_path)
    keys = set(load_file(written[0]))
    assert {k.split("_", 2)[1] for k in keys} == {"unet", "te1", "te2"}
    assert header(written[0])["ss_base_model_version"] == "sdxl_base_v1-0"


# ---------------------------------------------------------------- schedule, resume, validation


def test_every_param_group_follows_the_schedule(uncached):
    cfg, result = uncached
    assert cfg.base_lrs() == [2e-2, 1e-2, 5e-3]  # UNet, text_encoder, text_encoder_2
    records = read_metrics(result.output_dir)
    total = cfg.train.max_steps
    assert [r["lr"] for r in records] == [
        cfg.lr_scheduler.lrs(k - 1, total, cfg.base_lrs()) for k in range(1, total + 1)
    ]
    saved = json.loads((result.output_dir / "lr_scheduler.json").read_text())
    assert saved["base_lrs"] == cfg.base_lrs()


@pytest.mark.parametrize("run", ["uncached", "cached"])
def test_resume_is_bitwise_exact(run, request, sdxl_config, tmp_path):
    _, reference = request.getfixturevalue(run)
    settings = UNCACHED if run == "uncached" else CACHED
    start = ckpt.step_dir(reference.output_dir, 1)
    out = tmp_path / "resumed"
    loop.run(sdxl_config(out, *settings, f'checkpoint.resume="{start}"'))
    ours, theirs = weights(out), weights(reference.output_dir)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert without_clock(read_metrics(out)) == without_clock(read_metrics(reference.output_dir))[1:]


def test_samples_are_the_sdxl_pipelines_images_of_the_trained_lora(cached, tiny_sdxl):
    """A sample equals what diffusers' SDXL pipeline draws from the final LoRA file with the
    settings in the sample's metadata; and the LoRA visibly changes it."""
    from diffusers import DDIMScheduler

    _, result = cached
    path = result.output_dir / "samples" / "step-000002" / "p00-seed0.png"
    facts = sample_facts(path)
    assert (facts["sampler"], facts["generator"]) == ("DDIM", "cpu")

    def draw(folder=None) -> np.ndarray:
        pipe = loaded_pipeline(tiny_sdxl, folder)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        pipe.set_progress_bar_config(disable=True)
        image = pipe(
            facts["prompt"],
            height=facts["height"],
            width=facts["width"],
            num_inference_steps=facts["steps"],
            guidance_scale=facts["guidance_scale"],
            generator=torch.Generator("cpu").manual_seed(facts["seed"]),
        ).images[0]
        return np.asarray(image, dtype=np.int16)

    with Image.open(path) as image:
        ours = np.asarray(image.convert("RGB"), dtype=np.int16)
    theirs = draw(result.output_dir)
    assert np.abs(ours - theirs).max() <= 1  # rounding to 8 bits at most
    assert np.abs(draw() - theirs).max() > 8, "the LoRA must change the sample"


def test_validation_loss_is_recorded_and_resumes(cached):
    _, result = cached
    last = read_metrics(result.output_dir)[-1]
    assert last["step"] == 2 and math.isfinite(last["val_loss"]) and last["val_loss"] > 0


def test_sdlora_sample_draws_an_sdxl_lora_with_the_sdxl_pipeline(uncached, tiny_sdxl, tmp_path):
    """`sdlora sample` on an SDXL model: base, scale 0 and scale 1 side by side; scale 0 is
    the base image, scale 1 is not."""
    from trainer.commands.sample import SampleSettings, sample

    _, result = uncached
    # Two steps: a single Euler step from pure noise leaves the tiny model's image almost all
    # noise, so the LoRA moved it by only a few levels (measured 6 of 255; 93 with two steps).
    settings = SampleSettings(prompts=(PROMPT,), scales=(0.0, 1.0), steps=2, width=64, height=64)
    lora_file = result.output_dir / f"{NAME}.safetensors"
    path = sample(lora_file, str(tiny_sdxl), settings, tmp_path / "grid.png", device="cpu")
    with Image.open(path) as image:
        grid = np.asarray(image.convert("RGB"), dtype=np.int16)
    top = grid.shape[0] - 64  # below the strip of column labels
    base, off, on = (grid[top:, 64 * c : 64 * (c + 1)] for c in range(3))
    assert np.array_equal(base, off)
    assert np.abs(on - base).max() > 8
