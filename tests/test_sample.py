"""``sdlora sample``: base model and LoRA at several scales, same seed, one PNG with settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import lora, outputs
from trainer.cli import main
from trainer.schema import LoraConfig

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
    code = "import sys; from trainer.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["sample", "--lora", str(path), "--model", str(tiny_model), "--prompt", "a"]
    args += ["--steps", "1", "--scales", "1", "--out", str(tmp_path / "grid.png")]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "No LoRA keys" not in done.stderr and "torchvision" not in done.stderr, done.stderr
