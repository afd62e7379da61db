"""``sdlora sample``: base model and LoRA at several scales, same seed, one PNG with settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.commands.cli import main
from trainer.config.schema import LoraConfig
from trainer.lora import adapters as lora
from trainer.lora import outputs

SIDE = 64
LABEL = 16  # the strip of column labels above the images


@pytest.fixture(scope="module")
def lora_file(tiny_model, tmp_path_factory):
    """A kohya-format LoRA with random up matrices, strong enough to change 8-bit pixels."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    lora.attach(pipe.unet, pipe.text_encoder, LoraConfig(rank=4, alpha=4.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    state, packed = lora.collect({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    record = {"architecture": "sd1", "resolution": SIDE, "steps": 0}
    folder = tmp_path_factory.mktemp("sample")
    (path,) = outputs.write_lora_files(folder, state, packed, record, "kohya", "shapes", "fp32")
    return path


def cell(pixels: np.ndarray, row: int, column: int) -> np.ndarray:
    top = LABEL + row * SIDE
    return pixels[top : top + SIDE, column * SIDE : (column + 1) * SIDE]


def test_grid_of_base_and_scales_with_its_settings(lora_file, tiny_model, tmp_path):
    out = tmp_path / "grid.png"
    prompts = ["a red circle", "a blue square"]
    args = ["sample", "--lora", str(lora_file), "--model", str(tiny_model), "--out", str(out)]
    args += ["--prompt", prompts[0], "--prompt", prompts[1], "--scales", "0,1", "--steps", "2"]
    assert main([*args, "--seed", "3"]) == 0
    image = Image.open(out)
    # Columns: base, x0, x1; the side is the LoRA's own modelspec.resolution.
    assert image.size == (3 * SIDE, LABEL + 2 * SIDE)
    assert image.text["prompt"] == "\n".join(prompts)
    settings = json.loads(image.text["sdlora_sample"])
    assert settings["seed"] == 3 and settings["steps"] == 2 and settings["scales"] == [0.0, 1.0]
    assert settings["columns"] == ["base", "lora x0", "lora x1"]
    assert settings["lora"] == lora_file.name and settings["model"] == tiny_model.name
    pixels = np.asarray(image.convert("RGB")).astype(int)
    for row in range(2):
        # Scale 0 is the base model, to the bit: same seed, same noise, no LoRA contribution.
        assert np.array_equal(cell(pixels, row, 1), cell(pixels, row, 0))
        assert np.abs(cell(pixels, row, 2) - cell(pixels, row, 0)).max() > 8
    assert not np.array_equal(cell(pixels, 0, 0), cell(pixels, 1, 0))


def test_bad_inputs_are_one_clear_error(lora_file, tiny_model, tmp_path, capsys):
    common = ["--model", str(tiny_model), "--prompt", "x", "--out", str(tmp_path / "g.png")]
    assert main(["sample", "--lora", str(lora_file), "--scales", "1,half", *common]) == 2
    assert "--scales" in capsys.readouterr().err
    not_lora = tiny_model / "unet" / "diffusion_pytorch_model.safetensors"
    assert main(["sample", "--lora", str(not_lora), *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no LoRA tensors" in err and "Traceback" not in err


def test_a_unet_only_lora_samples_without_library_notices(tiny_model, tmp_path):
    """The command the end-of-run summary suggests, on the usual UNet-only LoRA, prints no
    diffusers 'No LoRA keys associated to CLIPTextModel' or transformers torchvision notice
    (a fresh process: the torchvision one is printed once per process)."""
    import subprocess
    import sys

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    lora.attach(pipe.unet, None, LoraConfig(rank=4, alpha=4.0))
    state, packed = lora.collect({"unet": pipe.unet})
    record = {"architecture": "sd1", "resolution": SIDE, "steps": 0}
    (path,) = outputs.write_lora_files(tmp_path, state, packed, record, "diffusers", "u", "fp32")
    code = "import sys; from trainer.commands.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["sample", "--lora", str(path), "--model", str(tiny_model), "--prompt", "a"]
    args += ["--steps", "1", "--scales", "1", "--out", str(tmp_path / "grid.png")]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "No LoRA keys" not in done.stderr and "torchvision" not in done.stderr, done.stderr


# ---------------------------------------------------------------- requests refused before loading


def write_lora(folder, model_dir, arch: str, fmt: str, text: bool) -> list:
    """Our files of a random LoRA (metadata as training writes it) for an ``arch`` model."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
        encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    else:
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
        encoders = {"text_encoder": pipe.text_encoder}
    encoders = encoders if text else {}
    lora.attach(pipe.unet, encoders, LoraConfig(rank=4, alpha=4.0))
    state, packed = lora.collect({"unet": pipe.unet, **encoders})
    record = {"architecture": arch, "resolution": SIDE, "steps": 0, "base_model": model_dir.name}
    return outputs.write_lora_files(folder, state, packed, record, fmt, "l", "fp32")


@pytest.fixture(scope="module")
def sdxl_files(tiny_sdxl, tmp_path_factory) -> dict:
    """Our SDXL LoRA in both formats, text encoders included: ``{"diffusers": …, "kohya": …}``."""
    diffusers_file, kohya_file = write_lora(
        tmp_path_factory.mktemp("sdxl_lora"), tiny_sdxl, "sdxl", "both", text=True
    )
    return {"diffusers": diffusers_file, "kohya": kohya_file}


@pytest.fixture
def never_loads(monkeypatch):
    """Fail the test if `sdlora sample` gets as far as loading a pipeline."""
    from trainer.commands import sample

    def fail(*args, **kwargs):
        raise AssertionError("the pipeline was loaded; the request should have been refused")

    monkeypatch.setattr(sample, "render", fail)


def refused(args: list[str], capsys) -> str:
    """Run `sdlora sample ARGS`; assert exit 2, one `error:` report and no traceback; return
    the report (what precedes it is a loading progress bar, if anything)."""
    assert main(["sample", *args]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err, err
    return err[err.index("error: ") :]


def sample_args(lora_path, model, tmp_path, *more: str) -> list[str]:
    out = str(tmp_path / "g.png")
    return ["--lora", str(lora_path), "--model", str(model), "--prompt", "x", "--out", out, *more]


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_an_sdxl_lora_on_an_sd1_model_is_refused_before_loading(
    fmt, sdxl_files, tiny_model, tmp_path, never_loads, capsys
):
    err = refused(sample_args(sdxl_files[fmt], tiny_model, tmp_path), capsys)
    assert err.startswith("error: 1 problem(s)"), err  # printed before anything loaded
    assert "an SDXL LoRA" in err and "an SD 1.x model" in err, err
    assert str(sdxl_files[fmt]) in err and str(tiny_model) in err
    assert not (tmp_path / "g.png").exists()


def test_an_sd1_lora_on_an_sdxl_model_is_refused_before_loading(
    lora_file, tiny_sdxl, tmp_path, never_loads, capsys
):
    err = refused(sample_args(lora_file, tiny_sdxl, tmp_path), capsys)
    assert "an SD 1.x LoRA" in err and "an SDXL model" in err, err
    assert str(lora_file) in err and str(tiny_sdxl) in err


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_a_lora_without_metadata_is_told_sdxl_by_its_keys(
    fmt, sdxl_files, tiny_model, tmp_path, never_loads, capsys
):
    """Another trainer's file without the header facts: its keys still say SDXL (a second
    text encoder, original-layout UNet names)."""
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(sdxl_files[fmt]), bare)
    err = refused(sample_args(bare, tiny_model, tmp_path), capsys)
    assert "an SDXL LoRA" in err and "an SD 1.x model" in err, err


def test_a_lora_of_other_shapes_that_says_nothing_is_one_error(
    lora_file, tiny_sdxl, tmp_path, capsys
):
    """A bare SD 1.x file (no header facts, no key that names a family) on an SDXL model: the
    checks cannot tell, so diffusers' page of size mismatches becomes one line."""
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare.safetensors"
    save_file({k: v for k, v in load_file(lora_file).items() if k.startswith("lora_unet")}, bare)
    err = refused(sample_args(bare, tiny_sdxl, tmp_path, "--steps", "1"), capsys)
    assert f"{bare}: does not fit --model" in err and "size mismatch" in err, err
    assert "sdlora inspect" in err and len(err.splitlines()) <= 3, err


def test_cuda_without_cuda_is_refused(
    lora_file, tiny_model, tmp_path, never_loads, monkeypatch, capsys
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = refused(sample_args(lora_file, tiny_model, tmp_path, "--device", "cuda"), capsys)
    assert "--device cuda: CUDA is not available" in err and "--device cpu" in err, err


def test_a_missing_model_is_named(lora_file, tmp_path, never_loads, capsys):
    missing = tmp_path / "nonexistent"
    err = refused(sample_args(lora_file, missing, tmp_path), capsys)
    assert f"--model {missing}: no such folder" in err, err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--resolution", "63"], "--resolution 63: must be a positive multiple of 8"),
        (["--resolution", "0"], "--resolution 0: must be a positive multiple of 8"),
        (["--steps", "0"], "--steps 0: give at least 1"),
        (["--scales", "nan"], "--scales: nan is not a finite number"),
        (["--scales", "0,1e999,-inf"], "--scales: inf, -inf is not a finite number"),
        (["--guidance-scale", "nan"], "--guidance-scale nan: not a finite number"),
    ],
)
def test_bad_settings_are_refused(
    flags, message, lora_file, tiny_model, tmp_path, never_loads, capsys
):
    err = refused(sample_args(lora_file, tiny_model, tmp_path, *flags), capsys)
    assert err.startswith(f"error: 1 problem(s) in sdlora sample:\n  - {message}"), err


def test_every_problem_is_reported_at_once(lora_file, tmp_path, never_loads, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    flags = ["--resolution", "63", "--steps", "0", "--scales", "inf", "--device", "cuda"]
    err = refused(sample_args(lora_file, tmp_path / "nonexistent", tmp_path, *flags), capsys)
    assert err.startswith("error: 5 problem(s) in sdlora sample"), err
    for flag in ("--resolution 63", "--steps 0", "--scales: inf", "--device cuda", "--model"):
        assert flag in err


@pytest.mark.parametrize(
    ("words", "scales"),
    [
        (["--scales", "-1,0.5"], "-1,0.5"),
        (["--scales=-1,0.5"], "-1,0.5"),
        (["--scales", "-.5"], "-.5"),
        (["--scales", "-1"], "-1"),
        (["--scales", "0,1"], "0,1"),
    ],
)
def test_negative_scales_parse(words, scales):
    from trainer.commands.cli import build_parser

    args = ["sample", "--lora", "a", "--model", "b", "--prompt", "p", *words, "--steps", "2"]
    parsed = build_parser().parse_args(args)
    assert parsed.scales == scales and parsed.steps == 2 and parsed.prompts == ["p"]


def test_a_negative_scale_draws_the_lora_subtracted(lora_file, tiny_model, tmp_path):
    """Scale -1 is diffusers' own draw with the adapter weighted -1 (an independent pipeline)."""
    from diffusers import StableDiffusionPipeline

    args = sample_args(lora_file, tiny_model, tmp_path, "--scales", "-1,1", "--steps", "2")
    assert main(["sample", *args]) == 0
    out = tmp_path / "g.png"
    pixels = np.asarray(Image.open(out).convert("RGB")).astype(int)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="ref")
    pipe.set_adapters(["ref"], adapter_weights=[-1.0])
    generator = torch.Generator().manual_seed(0)
    ref = pipe("x", num_inference_steps=2, width=SIDE, height=SIDE, generator=generator).images[0]
    assert np.abs(cell(pixels, 0, 1) - np.asarray(ref).astype(int)).max() <= 1
    assert np.abs(cell(pixels, 0, 1) - cell(pixels, 0, 2)).max() > 8
