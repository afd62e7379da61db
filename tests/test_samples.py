"""Sample images that can be compared: names, PNG metadata, grids, tensorboard, no warnings."""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import sample_facts
from PIL import Image

from trainer.report import grids, samples
from trainer.report.samples import SampleSpec
from trainer.run import loop

PROMPTS = ["a red circle", "ein grüner Kreis ✓"]  # the second is not Latin-1: an iTXt chunk
SETTINGS = (
    'logging.tracker="tensorboard"',  # the shipped default (the fixture turns it off)
    "train.max_steps=4",
    "validation.every_n_steps=2",
    f"validation.prompts={json.dumps(PROMPTS)}",
    "validation.sample_steps=2",
    "validation.guidance_scale=3.5",
    "validation.sample_seed=7",
)


@pytest.fixture(scope="module")
def sampled(tiny_config, tmp_path_factory) -> Path:
    cfg = tiny_config(tmp_path_factory.mktemp("sampled") / "my-lora", *SETTINGS)
    loop.run(cfg)
    return Path(cfg.output_dir)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return pixels(image)


def test_images_are_named_by_step_prompt_and_seed(sampled):
    root = sampled / "samples"
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png")) == [
        "progression.png",
        "step-000002/grid.png",
        "step-000002/p00-seed7.png",
        "step-000002/p01-seed7.png",
        "step-000004/grid.png",
        "step-000004/p00-seed7.png",
        "step-000004/p01-seed7.png",
    ]


def test_png_metadata_round_trips(sampled):
    for step in (2, 4):
        for k, prompt in enumerate(PROMPTS):
            path = sampled / "samples" / f"step-{step:06d}" / f"p{k:02d}-seed7.png"
            with Image.open(path) as image:
                text = dict(image.text)
            assert json.loads(text["sdlora"]) == {
                "prompt": prompt,
                "prompt_index": k,
                "seed": 7,
                "steps": 2,
                "guidance_scale": 3.5,
                "width": 64,
                "height": 64,
                "sampler": "DDIM",
                "generator": "cpu",
                "step": step,
                "run": "my-lora",
            }
            # A1111's layout: the prompt, then one line of "Key: value" pairs.
            first, last = text["parameters"].split("\n")
            pairs = dict(item.split(": ", 1) for item in last.split(", "))
            assert first == prompt
            assert pairs["Seed"] == "7" and pairs["Steps"] == "2" and pairs["CFG scale"] == "3.5"
            assert pairs["Sampler"] == "DDIM" and pairs["Size"] == "64x64"


def test_negative_prompt_goes_in_both_chunks(tmp_path):
    spec = SampleSpec(("a cat",), 0, 20, 7.0, 512, "run", negative_prompt="blurry, dark")
    facts = spec.metadata(0, 100)
    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(
        path, pnginfo=samples.png_info(facts, samples.a1111_parameters(facts))
    )
    assert sample_facts(path)["negative_prompt"] == "blurry, dark"
    with Image.open(path) as image:
        assert image.text["parameters"].split("\n")[1] == "Negative prompt: blurry, dark"
    assert "negative_prompt" not in SampleSpec(("a",), 0, 1, 1.0, 8, "r").metadata(0, 1)


def tile(grid: np.ndarray, row: int, col: int, rows: int, cols: int, size: int = 64) -> np.ndarray:
    """The tile at (row, col) of a grid whose labels sit left and above."""
    left, top = grid.shape[1] - cols * size, grid.shape[0] - rows * size
    return grid[
        top + row * size : top + (row + 1) * size, left + col * size : left + (col + 1) * size
    ]


def test_each_point_has_a_grid_with_a_row_per_prompt_and_tensorboard_holds_it(sampled):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    events = EventAccumulator(str(sampled / "logs" / "sdlora"), size_guidance={IMAGES: 0}).Reload()
    logged = {e.step: e for e in events.Images(samples.GRID_TAG)}
    assert sorted(logged) == [2, 4]
    for step in (2, 4):
        folder = sampled / "samples" / f"step-{step:06d}"
        grid = read(folder / "grid.png")
        for k in range(len(PROMPTS)):
            assert np.array_equal(tile(grid, k, 0, 2, 1), read(folder / f"p{k:02d}-seed7.png"))
        shown = pixels(Image.open(io.BytesIO(logged[step].encoded_image_string)))
        assert np.array_equal(shown, grid), "tensorboard shows the grid file's pixels"
        assert sample_facts(folder / "grid.png")["prompts"] == PROMPTS


def test_progression_grid_has_prompts_as_rows_and_points_as_columns(sampled):
    root = sampled / "samples"
    grid = read(root / "progression.png")
    for col, step in enumerate((2, 4)):
        for k in range(len(PROMPTS)):
            expected = read(root / f"step-{step:06d}" / f"p{k:02d}-seed7.png")
            assert np.array_equal(tile(grid, k, col, 2, 2), expected)
    assert sample_facts(root / "progression.png")["updates"] == [2, 4]


def test_progression_keeps_first_and_last_of_many_points():
    assert grids.spread(5, 16) == [0, 1, 2, 3, 4]
    picked = grids.spread(100, 16)
    assert len(picked) == 16 and picked[0] == 0 and picked[-1] == 99
    assert picked == sorted(set(picked))


# ---------------------------------------------------------------- warnings


@pytest.fixture(scope="module")
def components(tiny_model):
    import torch

    from trainer.config.load import ModelConfig
    from trainer.models.load import load_components

    return load_components(ModelConfig(pretrained=str(tiny_model)), torch.float32)


def test_sampling_lets_no_library_warning_through(components, tmp_path):
    spec = SampleSpec(("a red circle",), 0, 2, 7.5, 64, "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # pyproject ignores FutureWarning; see them all here
        samples.draw(spec, 1, components, components.unet, components.text_encoder, tmp_path)
    escaped = [w for w in caught if issubclass(w.category, (FutureWarning, UserWarning))]
    assert escaped == [], [str(w.message)[:200] for w in escaped]
    assert (tmp_path / "p00-seed0.png").is_file()


def test_the_clip_sample_warning_is_fixed_at_its_cause(components):
    from diffusers import DDIMScheduler

    config = components.noise_scheduler.config
    # SD's scheduler config has no clip_sample: the training DDPM filled in True as a default,
    # and from_config lets DDIM's own default (True) apply even when the dict says False.
    assert "clip_sample" in config["_use_default_values"]
    assert DDIMScheduler.from_config({**config, "clip_sample": False}).config.clip_sample
    assert not samples.make_sampler(config, DDIMScheduler).config.clip_sample


def test_only_the_torchvision_fallback_message_is_dropped():
    samples._import_pipeline()
    logger = logging.getLogger("transformers.utils.import_utils")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
            "`CLIPImageProcessorPil` for backward compatibility."
        )
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert seen == ["something else"]


def test_the_negative_prompt_reaches_the_png_metadata(make_config, tmp_path):
    from PIL import Image

    from trainer.run import loop

    out = tmp_path / "neg"
    cfg = make_config(
        "train.max_steps=1",
        'validation.prompts=["a red circle"]',
        'validation.negative_prompt="blurry"',
        "validation.sample_steps=1",
        output=out,
    )
    loop.run(cfg)
    (png,) = (out / "samples" / "step-000001").glob("p00-*.png")
    assert "Negative prompt: blurry" in Image.open(png).text["parameters"]


def test_the_sweep_report_takes_each_prompts_image_of_the_last_point_in_order(sampled):
    """samples.png of a sweep is one column per prompt: the point's grid.png is no prompt."""
    from trainer.sweep.figures import last_samples

    images = last_samples(sampled)
    assert [sample_facts(p)["prompt"] for p in images] == PROMPTS
    assert {p.parent.name for p in images} == {"step-000004"}
