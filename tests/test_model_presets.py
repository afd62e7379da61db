"""Model presets of make_tiny_sd.py: the real SD-1.5 shapes, and the fp16 write path.

The SD-1.5 shapes are checked on the meta device (no memory, no time) against the parameter
counts of the published checkpoint's components; building the 2.1 GB folder itself is marked
heavy (opt-in with -m heavy).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from make_tiny_sd import (
    SD15_SHAPE,
    SDXL_SHAPE,
    make_sd,
    make_tiny_sd,
    make_tiny_sdxl,
    preset_spec,
    text_encoder_config,
)
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]

# Parameter counts of stable-diffusion-v1-5's unet/, vae/ and text_encoder/ (CLIP ViT-L/14).
SD15_PARAMS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
# And of stable-diffusion-xl-base-1.0's (text_encoder_2: OpenCLIP ViT-bigG/14 with projection).
SDXL_PARAMS = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}


def _tokenizer(tmp_path: Path):
    from make_tiny_sd import write_tokenizer
    from transformers import CLIPTokenizer

    write_tokenizer(tmp_path / "tokenizer")
    return CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd15_shape_has_the_published_sizes(tmp_path):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _tokenizer(tmp_path)
    with init_empty_weights():  # meta tensors: shapes without memory
        unet = UNet2DConditionModel(**SD15_SHAPE.unet)
        vae = AutoencoderKL(**SD15_SHAPE.vae)
        text_encoder = CLIPTextModel(text_encoder_config(SD15_SHAPE, tokenizer))
    counts = {"unet": _count(unet), "vae": _count(vae), "text_encoder": _count(text_encoder)}
    assert counts == SD15_PARAMS
    assert unet.conv_in.weight.shape == (320, 4, 3, 3)
    assert unet.config.cross_attention_dim == 768
    assert unet.config.block_out_channels == (320, 640, 1280, 1280)
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
    assert vae.encoder.conv_in.weight.shape == (128, 3, 3, 3)
    assert vae.config.scaling_factor == 0.18215
    config = text_encoder.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        768,
        12,
        12,
    )
    assert config.max_position_embeddings == tokenizer.model_max_length == 77
    # Every id the local tokenizer can produce is a row of the real-size embedding.
    assert len(tokenizer.get_vocab()) <= config.vocab_size == 49408
    assert SD15_SHAPE.dtype == "fp16"


def test_sdxl_shape_has_the_published_sizes(tmp_path):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _tokenizer(tmp_path)
    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_SHAPE.unet)
        vae = AutoencoderKL(**SDXL_SHAPE.vae)
        te1 = CLIPTextModel(text_encoder_config(SDXL_SHAPE, tokenizer))
        te2 = CLIPTextModelWithProjection(
            text_encoder_config(SDXL_SHAPE, tokenizer, "text_encoder_2")
        )
    counts = {
        "unet": _count(unet),
        "vae": _count(vae),
        "text_encoder": _count(te1),
        "text_encoder_2": _count(te2),
    }
    assert counts == SDXL_PARAMS
    assert unet.config.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size
    assert unet.add_embedding.linear_1.in_features == 6 * 256 + te2.config.projection_dim
    assert vae.config.scaling_factor == 0.13025 and vae.config.force_upcast
    assert SDXL_SHAPE.dtype == "fp16"


def test_tiny_sdxl_is_seeded_and_written_in_the_dtype_asked(tmp_path):
    a = make_tiny_sdxl(tmp_path / "a", seed=3)
    b = make_sd(tmp_path / "b", "sdxl", "tiny", seed=3, dtype="fp16")
    for part, name in (
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder_2", "model.safetensors"),
    ):
        with safe_open(a / part / name, "pt") as fa, safe_open(b / part / name, "pt") as fb:
            for key in fa.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert torch.equal(fb.get_tensor(key), fa.get_tensor(key).half()), key


def test_fp16_folder_loads_and_equals_the_fp32_weights_rounded(tmp_path):
    from diffusers import StableDiffusionPipeline

    full = make_tiny_sd(tmp_path / "fp32", seed=5)
    half = make_sd(tmp_path / "fp16", "sd15", "tiny", seed=5, dtype="fp16")
    for part, name in (
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ):
        with safe_open(full / part / name, "pt") as a, safe_open(half / part / name, "pt") as b:
            assert set(a.keys()) == set(b.keys())
            for key in a.keys():  # noqa: SIM118 (safe_open is not a mapping)
                written = b.get_tensor(key)
                assert written.dtype == torch.float16, f"{part}/{key}"
                assert torch.equal(written, a.get_tensor(key).half()), f"{part}/{key}"
    # The real loading path, offline, with the same tokenizer files as the fp32 folder.
    pipe = StableDiffusionPipeline.from_pretrained(half, torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16
    for file in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        assert (half / "tokenizer" / file).read_bytes() == (full / "tokenizer" / file).read_bytes()


def test_unknown_presets_and_dtypes_name_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"no preset 'sdxl-shape'.*sd15-shape"):
        preset_spec("sd15", "sdxl-shape")
    with pytest.raises(ValueError, match=r"unknown arch 'flux'.*sd15.*sd3.*sdxl"):
        preset_spec("flux", "tiny")
    with pytest.raises(ValueError, match=r"no preset 'sdxl-shape'.*sd35-medium-shape"):
        preset_spec("sd3", "sdxl-shape")
    with pytest.raises(ValueError, match=r"no preset 'sd15-shape'.*sdxl-shape"):
        preset_spec("sdxl", "sd15-shape")
    with pytest.raises(ValueError, match="dtype"):
        make_sd(tmp_path / "x", dtype="fp8")
    script = REPO / "scripts" / "make_tiny_sd.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "y"), "--preset", "no-such"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "--preset" in done.stderr
    assert not (tmp_path / "y").exists()


@pytest.mark.heavy
def test_sd15_shape_folder_builds_and_loads(tmp_path):
    """Writes the 2.1 GB folder (a minute or two on 2 CPU cores) and loads it offline."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    out = make_sd(tmp_path / "sd15", "sd15", "sd15-shape")
    with safe_open(out / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_slice("conv_in.weight").get_dtype() == "F16"
    size = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    assert 2.0e9 < size < 2.3e9  # 1.066 G parameters × 2 bytes
    dtype = torch.float16
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(out, subfolder="vae", torch_dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(out, subfolder="text_encoder", torch_dtype=dtype)
    assert _count(unet) == SD15_PARAMS["unet"] and _count(vae) == SD15_PARAMS["vae"]
    assert _count(text_encoder) == SD15_PARAMS["text_encoder"]
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["block_out_channels"] == [320, 640, 1280, 1280]
    tokenizer = CLIPTokenizer.from_pretrained(out, subfolder="tokenizer")
    ids = tokenizer("a red circle", padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = text_encoder.float()(ids)[0]
    assert hidden.shape == (1, 77, 768) and torch.isfinite(hidden).all()


@pytest.mark.heavy
def test_sdxl_shape_folder_builds_and_loads(tmp_path):
    """Writes the 6.9 GB folder (minutes on 2 CPU cores) and loads its UNet offline."""
    from diffusers import UNet2DConditionModel

    out = make_sd(tmp_path / "sdxl", "sdxl", "sdxl-shape")
    size = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    assert 6.8e9 < size < 7.1e9  # 3.469 G parameters × 2 bytes
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet", torch_dtype=torch.float16)
    assert _count(unet) == SDXL_PARAMS["unet"]
