"""The SDXL model side: the tiny SDXL, telling the family before loading, and the fp16 VAE.

Nothing here trains: each test loads configs, headers or one VAE, so the module takes seconds.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from safetensors.torch import save_file

from trainer.config.load import ConfigError, ModelConfig
from trainer.models import family as model_arch
from trainer.models import load as models
from trainer.models import source
from trainer.models.vae import posterior
from trainer.run import preflight, step


def test_tiny_sdxl_is_an_sdxl_folder_with_sdxls_proportions(tiny_sdxl):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    unet, te1, te2 = pipe.unet, pipe.text_encoder, pipe.text_encoder_2
    assert unet.config.addition_embed_type == "text_time"
    assert type(te1).__name__ == "CLIPTextModel"
    assert type(te2).__name__ == "CLIPTextModelWithProjection"
    # Cross-attention reads both encoders' states side by side; the added embedding takes six
    # time ids and the second encoder's projection.
    assert unet.config.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size
    added = 6 * unet.config.addition_time_embed_dim + te2.config.projection_dim
    assert unet.add_embedding.linear_1.in_features == added
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    names = {p.name for p in (tiny_sdxl / "tokenizer_2").iterdir()}
    assert {"vocab.json", "merges.txt", "special_tokens_map.json"} <= names


# ---------------------------------------------------------------- the family, before loading


def test_folders_say_their_family(tiny_sdxl, tiny_model):
    assert model_arch.detect(ModelConfig(pretrained=str(tiny_sdxl))).name == "sdxl"
    sd1 = model_arch.detect(ModelConfig(pretrained=str(tiny_model)))
    # The tiny SD model cross-attends to width 32: SD 1.x by default, and not certain.
    assert (sd1.name, sd1.certain) == ("sd1", False)


def original_layout(path: Path, keys: list[str]) -> Path:
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


# Key names of the original (LDM/SGM) checkpoints of each family.
CHECKPOINTS = {
    "sdxl": [
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.positional_embedding",
        "model.diffusion_model.label_emb.0.0.weight",
    ],
    "sd2": [
        "cond_stage_model.model.token_embedding.weight",
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    ],
    "sd1": [
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    ],
}


@pytest.mark.parametrize("family", sorted(CHECKPOINTS))
def test_single_files_say_their_family_from_their_keys(family, tmp_path):
    path = original_layout(tmp_path / "model.safetensors", CHECKPOINTS[family])
    detected = model_arch.detect(ModelConfig(pretrained=str(path)))
    assert detected.name == family and detected.certain
    for other in ("sd1", "sd2", "sdxl"):
        found = model_arch.problems(ModelConfig(pretrained=str(path), arch=other), detected)
        assert bool(found) == (other != family), other


def test_a_refiner_is_refused(tmp_path):
    keys = [
        "conditioner.embedders.0.model.text_projection",
        "model.diffusion_model.label_emb.0.0.weight",
    ]
    path = original_layout(tmp_path / "refiner.safetensors", keys)
    found = model_arch.problems(
        ModelConfig(pretrained=str(path)), model_arch.detect(ModelConfig(pretrained=str(path)))
    )
    assert "refiner" in found[0]


def test_a_cut_short_checkpoint_is_a_problem_not_a_traceback(tmp_path):
    """safetensors raises its own error type for a header that does not cover the file; it is
    one problem found before loading, not an exception out of preflight."""
    path = original_layout(tmp_path / "model.safetensors", CHECKPOINTS["sd1"])
    path.write_bytes(path.read_bytes()[:-2])
    config = ModelConfig(pretrained=str(path))
    found = model_arch.problems(config, model_arch.detect(config))
    assert len(found) == 1 and "header cannot be read" in found[0], found


# One rule for a LoRA file's family, whoever asks (inspect, sample, export's rebuilt record).
@pytest.mark.parametrize(
    ("metadata", "components", "widths", "expected"),
    [
        ({"sdlora_training": '{"architecture": "sd2"}'}, ["unet"], {}, ("sd2", True)),
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, [], {}, ("sdxl", True)),
        ({"ss_base_model_version": "sd_v1"}, [], {}, ("sd1", True)),
        ({"ss_v2": "True"}, [], {}, ("sd2", True)),
        ({}, ["unet", "text_encoder", "text_encoder_2"], {}, ("sdxl", False)),
        ({}, ["unet"], {"lora_unet_input_blocks_4_1_proj_in": 640}, ("sdxl", False)),
        ({}, ["unet"], {"unet.down_blocks.1.attentions.0.attn2.to_k": 1024}, ("sd2", False)),
        ({}, ["text_encoder"], {"lora_te1_text_model_encoder_layers_0_q": 768}, ("sdxl", False)),
        ({}, ["unet"], {"lora_unet_down_blocks_0_attn2_to_k": 32}, ("unknown", False)),
    ],
)
def test_a_lora_files_family_from_its_header_then_its_keys(metadata, components, widths, expected):
    found = model_arch.from_lora(metadata, components, widths)
    assert (found.name, found.in_header) == expected, found


def test_architecture_rows_follow_the_family_rules():
    from trainer.models import architectures

    assert architectures.detect({"addition_embed_type": "text_time"}, 0).name == "sdxl"
    assert architectures.detect({"cross_attention_dim": 1024}).name == "sd2"
    assert architectures.detect({"cross_attention_dim": 32}, 2).name == "sdxl"
    assert architectures.detect_from_width(2048, 0).name == "sdxl"
    assert architectures.detect_from_width(1024, 1).name == "sd2"
    assert architectures.detect_from_width(None, 2).name == "sdxl"
    assert architectures.detect_from_width(32, 1).name == "sd1"


@pytest.fixture
def no_model_load(monkeypatch):
    """Every check here must happen before a model loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(models, "load_components", refuse)


def test_an_arch_that_contradicts_the_model_is_a_config_error(
    sdxl_config, tiny_config, tmp_path, no_model_load
):
    from trainer.run import loop

    with pytest.raises(ConfigError) as err:
        loop.run(sdxl_config(tmp_path / "a", 'model.arch="sd1"'))
    text = str(err.value)
    assert "model.arch = 'sd1': but model.pretrained is an SDXL model" in text
    assert "set model.arch = 'auto' or 'sdxl'" in text
    with pytest.raises(ConfigError, match=r"model.arch = 'sdxl': but model.pretrained is an SD 1"):
        loop.run(tiny_config(tmp_path / "b", 'model.arch="sdxl"'))
    with pytest.raises(ConfigError, match=r"lora.train_text_encoder_2: the model has one"):
        loop.run(tiny_config(tmp_path / "c", "lora.train_text_encoder_2=true"))
    # Known from the config alone: refused as it loads.
    with pytest.raises(ConfigError, match=r"lora.train_text_encoder_2: model.arch = 'sd1' has"):
        tiny_config(tmp_path / "d", 'model.arch="sd1"', "lora.train_text_encoder_2=true")


def test_auto_and_an_agreeing_arch_resolve_before_loading(sdxl_config, tiny_config, tmp_path):
    for arch in ("auto", "sdxl"):
        cfg = sdxl_config(tmp_path / arch, f'model.arch="{arch}"')
        assert preflight.check(cfg, 1, show_progress=False).architecture == "sdxl"
    # A UNet of neither SD 1.x's nor 2.x's width is what the user says it is.
    cfg = tiny_config(tmp_path / "sd2", 'model.arch="sd2"')
    assert preflight.check(cfg, 1, show_progress=False).architecture == "sd2"


def test_second_encoder_keys_need_the_second_encoder(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match=r"train.text_encoder_2_lr: set, but"):
        tiny_config(tmp_path, "train.text_encoder_2_lr=1e-5")


def test_base_lrs_are_unet_te1_te2(tiny_config, tmp_path):
    both = ("lora.train_text_encoder=true", "lora.train_text_encoder_2=true")
    lrs = tiny_config(tmp_path, *both, "train.learning_rate=3e-4", "train.text_encoder_lr=2e-5")
    assert lrs.base_lrs() == [3e-4, 2e-5, 2e-5]  # the second follows the first by default
    cfg = tiny_config(tmp_path, *both, "train.text_encoder_2_lr=1e-6")
    assert cfg.base_lrs() == [1e-3, 1e-3, 1e-6]
    assert tiny_config(tmp_path, both[1]).base_lrs() == [1e-3, 1e-3]


# ---------------------------------------------------------------- the VAE in fp16


@pytest.fixture(scope="module")
def vae(tiny_sdxl) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")


def test_vae_dtype_honours_force_upcast_for_sdxl(vae):
    half, bf16 = torch.float16, torch.bfloat16
    assert models.vae_dtype(vae, half, "sdxl")[0] == torch.float32
    assert models.vae_dtype(vae, bf16, "sdxl") == (bf16, "")  # bf16 has fp32's range
    assert models.vae_dtype(vae, half, "sd1") == (half, "")  # SD pipelines never upcast
    fixed = AutoencoderKL.from_config({**vae.config, "force_upcast": False})
    assert models.vae_dtype(fixed, half, "sdxl") == (half, "")


def test_an_fp16_overflow_is_encoded_in_fp32_never_nan(vae, caplog):
    """On the CPU: a first layer whose fp16 activations pass 65504 (its weights are fp16
    numbers, its sums of 27 bright pixels are not), as SDXL's VAE overflows deeper on GPU."""
    broken = AutoencoderKL.from_config(vae.config)
    broken.load_state_dict(vae.state_dict())
    with torch.no_grad():
        broken.encoder.conv_in.weight.fill_(2e4)
    broken = broken.half()
    before = {k: v.clone() for k, v in broken.state_dict().items()}
    assert all(v.isfinite().all() for v in before.values())
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # in [0, 1]
    with torch.no_grad():
        raw = broken.encode(pixels.half()).latent_dist.mean
        assert not raw.isfinite().all(), "without the handling the latents are not finite"
        with caplog.at_level(logging.WARNING, logger="sdlora"):
            mean, std = posterior(broken, pixels.half())
        reference = AutoencoderKL.from_config(vae.config)
        reference.load_state_dict({k: v.float() for k, v in before.items()})
        ref_mean, ref_std = posterior(reference, pixels.half().float())
    assert mean.isfinite().all() and std.isfinite().all()
    assert torch.equal(mean, ref_mean) and torch.equal(std, ref_std)
    assert "overflowed in fp16" in caplog.text and "sdxl-vae-fp16-fix" in caplog.text
    after = broken.state_dict()
    assert all(
        after[k].dtype == torch.float16 and torch.equal(after[k], v) for k, v in before.items()
    )


def test_a_named_vae_replaces_the_models_and_the_log_says_which(tiny_sdxl, tmp_path):
    folder = tmp_path / "sdxl-vae-fp16-fix"
    shutil.copytree(tiny_sdxl / "vae", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    cfg = ModelConfig(pretrained=str(tiny_sdxl), vae=str(folder))
    assert source.vae_problems(cfg) == []
    parts = models.load_components(cfg, torch.float32, "sdxl")
    assert parts.vae.config.force_upcast is False
    assert parts.vae_note == "sdxl-vae-fp16-fix, float32"
    own = models.load_components(ModelConfig(pretrained=str(tiny_sdxl)), torch.float32, "sdxl")
    assert own.vae_note == "the model's own, float32" and own.vae.config.force_upcast
    missing = ModelConfig(pretrained=str(tiny_sdxl), vae=str(tmp_path / "nope"))
    assert "model.vae" in source.vae_problems(missing)[0]
    single = ModelConfig(pretrained=str(tiny_sdxl), vae=str(tmp_path / "vae.safetensors"))
    assert "single-file VAE is not supported" in source.vae_problems(single)[0]


# ---------------------------------------------------------------- the validation loss


def test_validation_loss_is_scored_with_the_pipelines_sdxl_conditioning(tiny_sdxl, tiny_data):
    """The fixed-seed loss, recomputed with diffusers' SDXL prompt encoding and time ids (a
    center crop of a square 64 px image: original 64×64, crop at 0, 0); and, as for SD, the
    number does not depend on the batching."""
    from diffusers import DDPMScheduler

    from trainer.data import images
    from trainer.data.dataset import Example
    from trainer.data.order import seed_for
    from trainer.run.validation import Validator

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    noise_scheduler = DDPMScheduler.from_pretrained(tiny_sdxl, subfolder="scheduler")
    paths = sorted(tiny_data.glob("*.png"))[:3]
    examples = [Example(p, p.with_suffix(".txt").read_text().strip(), (64, 64)) for p in paths]
    tokenizers, encoders = (
        [pipe.tokenizer, pipe.tokenizer_2],
        [pipe.text_encoder, pipe.text_encoder_2],
    )
    scores = [
        Validator(examples, tokenizers, pipe.vae, 2, seed=0, batch_size=b).loss(
            pipe.unet, encoders, noise_scheduler, "cpu"
        )
        for b in (1, 3)
    ]
    assert scores[0] == pytest.approx(scores[1], rel=1e-5)

    total = 0.0
    with torch.no_grad():
        for example in examples:
            hidden, _, pooled, _ = pipe.encode_prompt(
                example.caption, device="cpu", num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )  # fmt: skip
            time_ids = pipe._get_add_time_ids(
                (64, 64), (0, 0), (64, 64), hidden.dtype, pipe.text_encoder_2.config.projection_dim
            )
            pixels = images.load_example(example.path, (64, 64), True, False, None)[0][None]
            mean, std = posterior(pipe.vae, pixels)
            rand = step.ExampleRandom([seed_for(0, "val", str(example.path))])
            latents = step.sample_latents(mean, std, rand)
            noise = rand.randn(latents.shape[1:])
            for t in (250, 750):  # two evenly spaced timesteps of 1000
                timesteps = torch.tensor([t])
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                added = {"text_embeds": pooled, "time_ids": time_ids}
                pred = pipe.unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
                total += (pred - noise).pow(2).mean().item()
    assert scores[0] == pytest.approx(total / (2 * len(examples)), rel=1e-5)


def test_an_sdxl_single_file_loads_through_the_sdxl_pipeline(tiny_sdxl, tmp_path, monkeypatch):
    """The single-file path up to diffusers' converter, which needs an original-layout
    checkpoint no offline test can make: the family is read from the header, the SDXL
    pipeline's from_single_file is called, and both text encoders are taken from it."""
    path = original_layout(tmp_path / "xl.safetensors", CHECKPOINTS["sdxl"])
    calls = []

    def from_single_file(cls, source, **kwargs):
        calls.append((cls.__name__, source, kwargs))
        return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)

    monkeypatch.setattr(
        StableDiffusionXLPipeline, "from_single_file", classmethod(from_single_file)
    )
    config = ModelConfig(pretrained=str(path), single_file_config=str(tiny_sdxl))
    architecture = model_arch.resolve(config, model_arch.detect(config))
    parts = models.load_components(config, torch.float32, architecture)
    assert architecture == "sdxl" and parts.architecture == "sdxl"
    assert [c[0] for c in calls] == ["StableDiffusionXLPipeline"]
    assert calls[0][2]["config"] == str(tiny_sdxl)
    assert type(parts.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert parts.tokenizer_2.pad_token == "!"
    assert type(parts.noise_scheduler).__name__ == "DDPMScheduler"
