"""The SD3 model side: the tiny SD 3.5, telling the family before loading, loading, and the
text conditioning against diffusers' own ``StableDiffusion3Pipeline``.

Nothing here trains: each test reads configs and headers or loads the tiny model once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import save_file

from trainer.config.load import ConfigError, ModelConfig
from trainer.models import conditioning, sd3
from trainer.models import family as model_arch
from trainer.models import load as models
from trainer.models.vae import posterior
from trainer.run import preflight

PROMPT = "a red circle on black"


@pytest.fixture(scope="module")
def pipe(tiny_sd3) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline.from_pretrained(tiny_sd3)


@pytest.fixture(scope="module")
def parts(tiny_sd3) -> models.Components:
    return models.load_components(ModelConfig(pretrained=str(tiny_sd3)), torch.float32, "sd3")


def test_tiny_sd3_has_sd35_mediums_layout(pipe, tiny_sd3):
    transformer, config = pipe.transformer, pipe.transformer.config
    # 3.5 Medium: QK-norm, and a second self-attention in its first blocks only.
    assert config.qk_norm == "rms_norm" and tuple(config.dual_attention_layers) == (0,)
    blocks = transformer.transformer_blocks
    assert blocks[0].attn2 is not None and blocks[1].attn2 is None
    assert config.num_layers == 2 and config.patch_size == 2
    # The text stream: both CLIPs' penultimate states side by side fit T5's width, which is the
    # transformer's; the pooled projection is both CLIPs' projections side by side.
    te1, te2, t5 = pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3
    assert type(te1).__name__ == type(te2).__name__ == "CLIPTextModelWithProjection"
    assert te1.config.hidden_size + te2.config.hidden_size <= t5.config.d_model
    assert config.joint_attention_dim == t5.config.d_model
    assert config.pooled_projection_dim == te1.config.projection_dim + te2.config.projection_dim
    vae = pipe.vae.config
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 1.5305, 0.0609)
    assert 2 ** (len(vae.block_out_channels) - 1) == 8
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.scheduler.config.shift == 3.0
    # The locally built T5 tokenizer: known words are one piece each, ids end with </s>.
    tokens = pipe.tokenizer_3.convert_ids_to_tokens(pipe.tokenizer_3(PROMPT).input_ids)
    assert tokens == ["▁a", "▁red", "▁circle", "▁on", "▁black", "</s>"]
    assert (tiny_sd3 / "tokenizer_3" / "tokenizer.json").is_file()


# ---------------------------------------------------------------- the family, before loading

# The transformer configs of the published SD3 models (their transformer/config.json).
SD3_TRANSFORMERS = {
    "stable-diffusion-3-medium-diffusers": (
        {"num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536},
        "medium",
    ),
    "stable-diffusion-3.5-large": (
        {"num_layers": 38, "num_attention_heads": 38, "qk_norm": "rms_norm"},
        "5-large",
    ),
    "stable-diffusion-3.5-large-turbo": (
        {
            "num_layers": 38,
            "num_attention_heads": 38,
            "qk_norm": "rms_norm",
            "dual_attention_layers": [],
        },
        "5-large",
    ),
    "stable-diffusion-3.5-medium": (
        {"num_layers": 24, "qk_norm": "rms_norm", "dual_attention_layers": list(range(13))},
        "5-medium",
    ),
}


@pytest.mark.parametrize("name", sorted(SD3_TRANSFORMERS))
def test_every_sd3_is_recognised_from_its_configs(name, tmp_path):
    transformer, variant = SD3_TRANSFORMERS[name]
    folder = tmp_path / name
    (folder / "transformer").mkdir(parents=True)
    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "X"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "transformer" / "config.json").write_text(json.dumps(transformer))
    detected = model_arch.detect(ModelConfig(pretrained=str(folder)))
    assert (detected.name, detected.variant, detected.certain) == ("sd3", variant, True)


def test_the_tiny_sd3_folder_says_sd3(tiny_sd3):
    detected = model_arch.detect(ModelConfig(pretrained=str(tiny_sd3)))
    assert (detected.name, detected.variant) == ("sd3", "5-medium")


# SAI's single-file layout: the MMDiT under model.diffusion_model.joint_blocks.
SD3_FILES = {
    "medium": ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"],
    "5-large": [
        "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
        "model.diffusion_model.joint_blocks.0.x_block.attn.ln_k.weight",
    ],
    "5-medium": [
        "model.diffusion_model.joint_blocks.0.x_block.attn.ln_k.weight",
        "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight",
    ],
}


@pytest.mark.parametrize("variant", sorted(SD3_FILES))
def test_single_sd3_files_say_their_variant_from_their_keys(variant, tmp_path):
    path = tmp_path / "sd3.safetensors"
    save_file({k: torch.zeros(1) for k in SD3_FILES[variant]}, str(path))
    detected = model_arch.detect(ModelConfig(pretrained=str(path)))
    assert (detected.name, detected.variant) == ("sd3", variant)


def test_a_wrong_arch_is_a_config_error_before_loading(tiny_sd3, tiny_model):
    wrong = ModelConfig(pretrained=str(tiny_sd3), arch="sdxl")
    (problem,) = model_arch.problems(wrong, model_arch.detect(wrong))
    assert "model.arch = 'sdxl'" in problem and "SD3 model" in problem
    sd1 = ModelConfig(pretrained=str(tiny_model), arch="sd3")
    (problem,) = model_arch.problems(sd1, model_arch.detect(sd1))
    assert "model.arch = 'sd3'" in problem and "'auto' or 'sd1'" in problem


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_components", refuse)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.snr_gamma=5.0"], "train.snr_gamma"),
        (['model.prediction_type="v_prediction"'], "model.prediction_type"),
    ],
)
@pytest.mark.parametrize("arch", ["sd3", "auto"])
def test_eps_and_v_settings_on_sd3_are_config_errors_before_any_load(
    arch, overrides, key, sd3_config, tmp_path, no_model_load
):
    """Found by config.load when model.arch names SD3, by preflight when it is read from the
    model; either way before a model loads."""
    settings = [f'model.arch="{arch}"', *overrides]
    if arch == "sd3":
        with pytest.raises(ConfigError) as err:
            sd3_config(tmp_path / "out", *settings)
    else:
        config = sd3_config(tmp_path / "out", *settings)
        with pytest.raises(ConfigError) as err:
            preflight.check(config, 1)
    assert any(p.startswith(key) and "SD3" in p for p in err.value.problems)


def test_sd3_keys_on_another_family_are_config_errors(tiny_config, tmp_path, no_model_load):
    config = tiny_config(
        tmp_path / "out", "model.t5=false", 'flow_matching.loss_weighting="cosmap"'
    )
    with pytest.raises(ConfigError) as err:
        preflight.check(config, 1)
    assert sorted(p.split(":")[0] for p in err.value.problems) == [
        "flow_matching.loss_weighting",
        "model.t5",
    ]


def test_a_folder_without_t5_needs_model_t5_false(tiny_sd3, sd3_config, tmp_path, no_model_load):
    folder = tmp_path / "no_t5"
    shutil.copytree(tiny_sd3, folder)
    shutil.rmtree(folder / "text_encoder_3")
    config = sd3_config(tmp_path / "out", f'model.pretrained="{folder}"')
    with pytest.raises(ConfigError) as err:
        preflight.check(config, 1)
    assert any("text_encoder_3/" in p and "model.t5 = false" in p for p in err.value.problems)
    fine = sd3_config(tmp_path / "out", f'model.pretrained="{folder}"', "model.t5=false")
    assert preflight.check(fine, 1).architecture == "sd3"


def test_sd3_target_typos_are_found_on_the_config_alone(sd3_config, tmp_path, no_model_load):
    config = sd3_config(tmp_path / "out", 'lora.target_modules=["to_q", "add_qq_proj"]')
    with pytest.raises(ConfigError) as err:
        preflight.check(config, 1)
    (problem,) = err.value.problems
    assert "'add_qq_proj'" in problem and "SD3Transformer2DModel" in problem
    assert "add_q_proj" in problem  # suggested among the valid names


# ---------------------------------------------------------------- loading and conditioning


def test_components_load_through_diffusers(parts, tiny_sd3):
    assert type(parts.unet).__name__ == "SD3Transformer2DModel"
    assert parts.variant == "5-medium" and parts.t5_max_length == 256
    assert [type(e).__name__ for e in parts.text_encoders] == [
        "CLIPTextModelWithProjection",
        "CLIPTextModelWithProjection",
        "T5EncoderModel",
    ]
    assert len(parts.tokenizers) == 3 and parts.tokenizer_3.model_max_length == 256
    assert type(parts.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert not any(p.requires_grad for e in parts.text_encoders for p in e.parameters())


def _ours(parts, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = conditioning.tokenize(parts.tokenizers, [prompt])
    names = ("input_ids", "input_ids_2", "input_ids_3")
    with torch.no_grad():
        cond = conditioning.condition(dict(zip(names, ids, strict=False)), parts.text_encoders)
    return cond.hidden, cond.text_embeds


def test_conditioning_is_the_pipelines_encode_prompt(parts, pipe):
    hidden, pooled = _ours(parts, PROMPT)
    with torch.no_grad():
        theirs, _, theirs_pooled, _ = pipe.encode_prompt(
            PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False, max_sequence_length=256
        )
    assert hidden.shape == (1, 77 + 256, pipe.transformer.config.joint_attention_dim)
    assert torch.equal(hidden, theirs) and torch.equal(pooled, theirs_pooled)


def test_without_t5_the_conditioning_is_the_pipelines_without_t5(tiny_sd3):
    config = ModelConfig(pretrained=str(tiny_sd3), t5=False, t5_max_length=64)
    no_t5 = models.load_components(config, torch.float32, "sd3")
    assert isinstance(no_t5.text_encoder_3, sd3.AbsentT5) and no_t5.tokenizer_3 is None
    assert len(no_t5.tokenizers) == 2
    hidden, pooled = _ours(no_t5, PROMPT)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        theirs, _, theirs_pooled, _ = pipe.encode_prompt(
            PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False, max_sequence_length=64
        )
    assert hidden.shape[1] == 77 + 64
    assert torch.equal(hidden, theirs) and torch.equal(pooled, theirs_pooled)


def test_cached_t5_gives_t5s_outputs_and_frees_t5(tiny_sd3):
    config = ModelConfig(pretrained=str(tiny_sd3))
    fresh = models.load_components(config, torch.float32, "sd3")
    t5 = fresh.text_encoder_3
    captions = ["", PROMPT, "a blue square"]
    assert sd3.cache_t5(fresh, captions) == 3
    assert isinstance(fresh.text_encoder_3, sd3.CachedT5)
    ids = conditioning.tokenize([fresh.tokenizer_3], [PROMPT, ""])[0]
    with torch.no_grad():
        assert torch.equal(fresh.text_encoder_3(ids)[0], t5(ids)[0])
    unknown = conditioning.tokenize([fresh.tokenizer_3], ["a green triangle"])[0]
    with pytest.raises(RuntimeError, match=r"data\.cache_text = 'off'"):
        fresh.text_encoder_3(unknown)


def test_latents_are_shifted_then_scaled_as_sd3s_pipeline_undoes_them(parts):
    """StableDiffusion3Pipeline decodes ``latents / scaling_factor + shift_factor``; our
    posterior mean mapped back that way is the VAE's own posterior mean."""
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean, std = posterior(parts.vae, pixels)
        dist = parts.vae.encode(pixels).latent_dist
    config = parts.vae.config
    torch.testing.assert_close(mean / config.scaling_factor + config.shift_factor, dist.mean)
    torch.testing.assert_close(std, dist.std * config.scaling_factor)
    assert mean.shape == (1, 16, 8, 8)


def test_the_sd35_medium_preset_has_the_published_shapes(tmp_path):
    """Built on the meta device: no memory, no time (writing it is the opt-in heavy test)."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel
    from make_tiny_sd import preset_spec, write_tokenizer
    from make_tiny_sd3 import clip_config, t5_config, write_t5_tokenizer
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    spec = preset_spec("sd3", "sd35-medium-shape")
    write_tokenizer(tmp_path / "tok")
    write_t5_tokenizer(tmp_path / "t5")
    clip, t5_tokenizer = (
        CLIPTokenizer.from_pretrained(tmp_path / "tok"),
        T5Tokenizer.from_pretrained(tmp_path / "t5"),
    )
    with init_empty_weights():
        transformer = SD3Transformer2DModel(**spec.transformer)
        te1 = CLIPTextModelWithProjection(clip_config(spec, clip, "text_encoder"))
        te2 = CLIPTextModelWithProjection(clip_config(spec, clip, "text_encoder_2"))
        t5 = T5EncoderModel(t5_config(spec, t5_tokenizer))
    blocks = transformer.transformer_blocks
    assert len(blocks) == 24 and sum(b.attn2 is not None for b in blocks) == 13
    assert blocks[0].attn.to_q.weight.shape == (1536, 1536)
    assert transformer.context_embedder.weight.shape == (1536, 4096)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 with their projections (SDXL's second is the latter).
    assert (count(te1), count(te2)) == (123_650_304, 694_659_840)
    assert (t5.config.d_model, t5.config.num_layers, t5.config.num_heads) == (4096, 24, 64)
    assert t5.config.vocab_size == 32128 and len(t5_tokenizer.get_vocab()) < 32128
    assert spec.dtype == "fp16"


@pytest.mark.heavy
def test_the_sd35_medium_shape_folder_loads(tmp_path):
    from make_tiny_sd import make_sd

    folder = make_sd(tmp_path / "sd35m", "sd3", "sd35-medium-shape")
    detected = model_arch.detect(ModelConfig(pretrained=str(folder)))
    assert (detected.name, detected.variant) == ("sd3", "5-medium")
    assert Path(folder / "text_encoder_3" / "config.json").is_file()
