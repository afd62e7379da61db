"""SD3 LoRA on the tiny SD 3.5: training, the files clients load, exact resume, schedules,
validation and samples.

Two module-wide runs train the tiny SD 3.5 (Medium's layout) through the public path
(``config.load``, ``loop.run``), each with a checkpoint after every update:

- ``uncached``: no caches (T5 stays loaded), random crops and flips, caption dropout, noise
  offset, the ``mode`` density with ``cosmap`` weighting, and both CLIPs trained, each with its
  own LR (three param groups);
- ``cached``: latent and text caches on (T5's outputs cached and T5 freed), transformer only,
  a held-out validation set and a sample prompt drawn by ``StableDiffusion3Pipeline``.

Each is checked against independent references: diffusers' ``StableDiffusion3Pipeline`` and
its ``load_lora_weights`` (the prompt encoding is the pipeline's), ComfyUI's SD3 key rules
restated in ``client_rules.py``, the schedule's closed form, and a second run resumed from a
mid-epoch checkpoint, which must end bit for bit where the uninterrupted run ended.
"""

from __future__ import annotations

import json
import math

import client_rules as rules
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from helpers import sample_facts, without_clock
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5EncoderModel,
)

from trainer.commands import export
from trainer.commands import inspect as inspect_lora
from trainer.config.sd3 import SD3_TARGETS
from trainer.lora.files import WEIGHTS_NAME
from trainer.models import conditioning
from trainer.report.tracking import read_metrics
from trainer.run import checkpoint as ckpt
from trainer.run import loop

TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
NAME = "sd3"
PROMPT = "a red circle"
T5_TOKENS = 32  # model.t5_max_length: short, so the tiny runs stay fast
# Two updates of three micro-batches of two: with 16 images (12 when 4 are held out) the
# checkpoint after update 1 sits mid-epoch, and the resumed run continues that epoch.
EXACT = (
    "train.max_steps=2",
    "train.batch_size=2",
    "train.gradient_accumulation_steps=3",
    "checkpoint.every_n_steps=1",
    'output.save_dtype="fp32"',
    f'output.name="{NAME}"',
    f"model.t5_max_length={T5_TOKENS}",
)
UNCACHED = (
    *EXACT,
    'data.cache_latents="off"',
    'data.cache_text="off"',
    "data.center_crop=false",
    "data.random_flip=true",
    "data.caption_dropout=0.25",
    "train.noise_offset=0.05",
    'flow_matching.timestep_density="mode"',
    'flow_matching.loss_weighting="cosmap"',
    "lora.train_text_encoder=true",
    "lora.train_text_encoder_2=true",
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
    "train.learning_rate=2e-2",
)


@pytest.fixture(scope="module")
def uncached(sd3_config, tmp_path_factory):
    cfg = sd3_config(tmp_path_factory.mktemp("sd3") / "uncached", *UNCACHED)
    return cfg, loop.run(cfg)


@pytest.fixture(scope="module")
def cached(sd3_config, tmp_path_factory):
    cfg = sd3_config(tmp_path_factory.mktemp("sd3") / "cached", *CACHED)
    return cfg, loop.run(cfg)


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS_NAME)


def header(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# ---------------------------------------------------------------- the LoRA in diffusers


def noisy_input() -> tuple[torch.Tensor, torch.Tensor]:
    sample = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    return sample, torch.tensor([700.0])


def pipeline_prediction(pipe: StableDiffusion3Pipeline) -> torch.Tensor:
    """The transformer's prediction for PROMPT, conditioned by diffusers' own pipeline."""
    sample, t = noisy_input()
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(
            PROMPT,
            PROMPT,
            PROMPT,
            do_classifier_free_guidance=False,
            max_sequence_length=T5_TOKENS,
        )
        return pipe.transformer(
            hidden_states=sample,
            timestep=t,
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
        ).sample


def loaded_pipeline(tiny_sd3, folder=None, weight_name=None) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    if folder is not None:
        pipe.load_lora_weights(str(folder), weight_name=weight_name)
    return pipe


def test_lora_loads_in_the_sd3_pipeline_and_reproduces_our_prediction(uncached, tiny_sd3):
    """Our trained transformer and both CLIPs, conditioned by our own code, against the
    pipeline's conditioning and ``StableDiffusion3Pipeline.load_lora_weights``."""
    _, result = uncached
    tokenizers = [
        CLIPTokenizer.from_pretrained(tiny_sd3, subfolder="tokenizer"),
        CLIPTokenizer.from_pretrained(tiny_sd3, subfolder="tokenizer_2"),
        AutoTokenizer.from_pretrained(tiny_sd3, subfolder="tokenizer_3"),
    ]
    tokenizers[2].model_max_length = T5_TOKENS
    t5 = T5EncoderModel.from_pretrained(tiny_sd3, subfolder="text_encoder_3")
    ids = conditioning.tokenize(tokenizers, [PROMPT])
    batch = dict(zip(("input_ids", "input_ids_2", "input_ids_3"), ids, strict=True))
    with torch.no_grad():
        encoders = [result.text_encoder, result.text_encoder_2, t5]
        cond = conditioning.condition(batch, encoders)
        sample, t = noisy_input()
        ours = result.unet(
            hidden_states=sample,
            timestep=t,
            encoder_hidden_states=cond.hidden,
            pooled_projections=cond.text_embeds,
        ).sample

    base = pipeline_prediction(loaded_pipeline(tiny_sd3))
    theirs = pipeline_prediction(loaded_pipeline(tiny_sd3, result.output_dir))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert (theirs - base).abs().max() > 1e-3, "the LoRA must change the prediction"


def test_every_part_of_the_lora_changes_the_prediction(uncached, tiny_sd3):
    """The transformer and both text encoders each matter, so the comparison above covers
    the text-encoder LoRAs too."""
    _, result = uncached
    state = weights(result.output_dir)
    full = pipeline_prediction(loaded_pipeline(tiny_sd3, result.output_dir))
    assert {k.split(".")[0] for k in state} == {"transformer", "text_encoder", "text_encoder_2"}
    for component in ("text_encoder", "text_encoder_2"):
        pipe = loaded_pipeline(tiny_sd3)
        pipe.load_lora_weights({k: v for k, v in state.items() if not k.startswith(component)})
        assert (pipeline_prediction(pipe) - full).abs().max() > 1e-4, component


# ---------------------------------------------------------------- key names and metadata


def expected_keys(tiny_sd3, text: bool) -> tuple[set[str], set[str]]:
    """The diffusers keys and kohya-style module names for the tiny SD3, from its module
    tree: the diffusers script's targets, plus attn2's in 3.5 Medium's first block."""
    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    models = [("transformer", transformer, SD3_TARGETS)]
    if text:
        for component in ("text_encoder", "text_encoder_2"):
            encoder = CLIPTextModelWithProjection.from_pretrained(tiny_sd3, subfolder=component)
            models.append((component, rules.as_transformers4(encoder), TEXT_TARGETS))
    peft, kohya = set(), set()
    for component, model, targets in models:
        for name, _ in model.named_modules():
            if name.endswith(tuple("." + t for t in targets)):
                peft |= {f"{component}.{name}.lora_A.weight", f"{component}.{name}.lora_B.weight"}
                prefix = {
                    "transformer": "lora_transformer",
                    "text_encoder": "lora_te1",
                    "text_encoder_2": "lora_te2",
                }[component]
                kohya.add(f"{prefix}_{name.replace('.', '_')}")
    return peft, kohya


@pytest.mark.parametrize("run", ["uncached", "cached"])
def test_file_keys_are_the_ones_comfyui_maps_for_sd3(run, request, tiny_sd3):
    cfg, result = request.getfixturevalue(run)
    text = cfg.lora.train_text_encoder
    peft, modules = expected_keys(tiny_sd3, text)
    assert set(weights(result.output_dir)) == peft
    assert any(".attn2.to_q." in k for k in peft), "3.5 Medium's attn2 is adapted by default"
    kohya = load_file(result.output_dir / f"{NAME}.safetensors")
    assert {rules.module_name(k) for k in kohya} == modules
    assert len(kohya) == 3 * len(modules)  # lora_down, lora_up and alpha of each
    # Every name is one ComfyUI maps for SD3 (its own rules, restated): the kohya-style file
    # and the diffusers file alike.
    clip_layers = (2, 2)  # the tiny CLIPs' layer counts
    comfy = rules.comfy_sd3_names(2, clip_layers)
    assert sorted(modules - comfy) == []
    diffusers_modules = {k.rsplit(".", 2)[0] for k in peft}
    assert sorted(diffusers_modules - comfy) == []
    # The same tensors under both names, and alpha / rank = the run's scale.
    state = weights(result.output_dir)
    for key, value in state.items():
        component, path = key.split(".", 1)
        module, part = path.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        prefix = {"transformer": "lora_transformer", "text_encoder": "lora_te1"}.get(
            component, "lora_te2"
        )
        name = f"{prefix}_{module.replace('.', '_')}"
        kohya_part = "lora_down.weight" if part == "lora_A" else "lora_up.weight"
        assert torch.equal(kohya[f"{name}.{kohya_part}"], value)
        assert kohya[f"{name}.alpha"].item() == cfg.lora.alpha


@pytest.mark.parametrize("run", ["uncached", "cached"])
def test_headers_carry_sd3s_architecture_strings(run, request, tiny_sd3):
    cfg, result = request.getfixturevalue(run)
    meta = header(result.output_dir / f"{NAME}.safetensors")
    # kohya's sd3_train_network.py: the MMDiT's model_type, and stable-diffusion-3-<it>.
    assert meta["ss_base_model_version"] == "5-medium"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert "modelspec.prediction_type" not in meta  # neither ε nor v
    flow = cfg.flow_matching
    density = flow.timestep_density if flow.loss_weighting == "none" else flow.loss_weighting
    assert meta["ss_weighting_scheme"] == density
    assert (meta["ss_logit_mean"], meta["ss_logit_std"], meta["ss_mode_scale"]) == (
        "0.0",
        "1.0",
        "1.29",
    )
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_v2"] == "False"
    diffusers_meta = header(result.output_dir / WEIGHTS_NAME)
    assert diffusers_meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    adapter = json.loads(diffusers_meta["lora_adapter_metadata"])
    assert sorted(adapter["transformer.target_modules"]) == sorted(SD3_TARGETS)
    record = json.loads(diffusers_meta["sdlora_training"])
    assert (record["architecture"], record["model_variant"]) == ("sd3", "5-medium")
    assert record["flow_matching"]["loss_weighting"] == flow.loss_weighting
    state = json.loads((ckpt.step_dir(result.output_dir, 2) / ckpt.TRAINER_STATE).read_text())
    assert state["architecture"] == "sd3"
    # `sdlora inspect --against` matches every key to a module of the model.
    for name in (WEIGHTS_NAME, f"{NAME}.safetensors"):
        report = inspect_lora.inspect(result.output_dir / name, against=tiny_sd3)
        assert report.architecture == "sd3"
        assert (report.unmatched, report.wrong_shape) == ([], []), name


def test_export_of_a_checkpoint_keeps_the_sd3_names(uncached, tmp_path):
    """Written from the checkpoint alone: its recorded family and variant."""
    _, result = uncached
    step1 = ckpt.step_dir(result.output_dir, 1)
    written = export.export(step1, "kohya", out=tmp_path)
    keys = set(load_file(written[0]))
    assert {k.split("_", 2)[1] for k in keys} == {"transformer", "te1", "te2"}
    meta = header(written[0])
    assert meta["ss_base_model_version"] == "5-medium"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"


# ---------------------------------------------------------------- schedule, resume, validation


def test_every_param_group_follows_the_schedule(uncached):
    cfg, result = uncached
    assert cfg.base_lrs() == [2e-2, 1e-2, 5e-3]  # transformer, CLIP-L, CLIP-G
    records = read_metrics(result.output_dir)
    total = cfg.train.max_steps
    assert [r["lr"] for r in records] == [
        cfg.lr_scheduler.lrs(k - 1, total, cfg.base_lrs()) for k in range(1, total + 1)
    ]


@pytest.mark.parametrize("run", ["uncached", "cached"])
def test_resume_from_mid_epoch_is_bitwise_exact(run, request, sd3_config, tmp_path):
    """The checkpoint after update 1 is what a kill after it leaves (mid-epoch)."""
    _, reference = request.getfixturevalue(run)
    state = json.loads((ckpt.step_dir(reference.output_dir, 1) / ckpt.TRAINER_STATE).read_text())
    assert state["position_in_epoch"] > 0, "the checkpoint must sit mid-epoch"
    settings = UNCACHED if run == "uncached" else CACHED
    start = ckpt.step_dir(reference.output_dir, 1)
    out = tmp_path / "resumed"
    loop.run(sd3_config(out, *settings, f'checkpoint.resume="{start}"'))
    ours, theirs = weights(out), weights(reference.output_dir)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert without_clock(read_metrics(out)) == without_clock(read_metrics(reference.output_dir))[1:]


def test_samples_are_the_sd3_pipelines_images_of_the_trained_lora(cached, tiny_sd3):
    """A sample equals what StableDiffusion3Pipeline draws from the final LoRA file with the
    settings in its metadata (T5 freed in training, loaded here); the LoRA changes it."""
    _, result = cached
    path = result.output_dir / "samples" / "step-000002" / "p00-seed0.png"
    facts = sample_facts(path)
    assert (facts["sampler"], facts["generator"]) == ("Euler (flow matching)", "cpu")

    def draw(folder=None) -> np.ndarray:
        pipe = loaded_pipeline(tiny_sd3, folder)
        pipe.set_progress_bar_config(disable=True)
        image = pipe(
            facts["prompt"],
            height=facts["height"],
            width=facts["width"],
            num_inference_steps=facts["steps"],
            guidance_scale=facts["guidance_scale"],
            generator=torch.Generator("cpu").manual_seed(facts["seed"]),
            max_sequence_length=T5_TOKENS,
        ).images[0]
        return np.asarray(image, dtype=np.int16)

    with Image.open(path) as image:
        ours = np.asarray(image.convert("RGB"), dtype=np.int16)
    theirs = draw(result.output_dir)
    assert np.abs(ours - theirs).max() <= 1  # rounding to 8 bits at most
    assert np.abs(draw() - theirs).max() > 8, "the LoRA must change the sample"


def test_validation_loss_is_recorded(cached):
    _, result = cached
    last = read_metrics(result.output_dir)[-1]
    assert last["step"] == 2 and math.isfinite(last["val_loss"]) and last["val_loss"] > 0


def test_sdlora_sample_asks_for_the_diffusers_file_of_an_sd3_lora(cached, tiny_sd3, tmp_path):
    """diffusers reads no kohya-style SD3 file: refused before any model loads, naming the
    file that works (the diffusers file is drawn in tests/test_sd3_train.py)."""
    from trainer.commands.sample import SampleSettings, sample
    from trainer.config.load import ConfigError

    _, result = cached
    settings = SampleSettings(prompts=(PROMPT,), steps=2, width=64, height=64)
    with pytest.raises(ConfigError) as err:
        sample(
            result.output_dir / f"{NAME}.safetensors", str(tiny_sd3), settings, tmp_path / "g.png"
        )
    (problem,) = err.value.problems
    assert "kohya/ComfyUI format" in problem and WEIGHTS_NAME in problem


def test_without_t5_a_run_trains_and_samples_as_the_pipeline_without_t5(
    sd3_config, tiny_sd3, tmp_path
):
    """model.t5 = false: zeros in T5's place in training and samples, as
    StableDiffusion3Pipeline without text_encoder_3 draws the final file."""
    out = tmp_path / "no_t5"
    cfg = sd3_config(
        out,
        "model.t5=false",
        "model.t5_max_length=16",
        "train.max_steps=1",
        "train.learning_rate=2e-2",
        'validation.prompts=["a blue square"]',
        "validation.sample_steps=2",
    )
    result = loop.run(cfg)
    assert result.updates == 1
    facts = sample_facts(out / "samples" / "step-000001" / "p00-seed0.png")
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(out))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        facts["prompt"],
        height=facts["height"],
        width=facts["width"],
        num_inference_steps=facts["steps"],
        guidance_scale=facts["guidance_scale"],
        generator=torch.Generator("cpu").manual_seed(facts["seed"]),
        max_sequence_length=16,
    ).images[0]
    with Image.open(out / "samples" / "step-000001" / "p00-seed0.png") as ours:
        diff = np.asarray(ours.convert("RGB"), np.int16) - np.asarray(image, np.int16)
    assert np.abs(diff).max() <= 1
    record = json.loads(header(out / WEIGHTS_NAME)["sdlora_training"])
    assert (record["t5"], record["t5_max_length"]) == (False, 16)
