"""The held-out split and the fixed-seed validation loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from trainer.data.dataset import Example, Record
from trainer.data.holdout import split
from trainer.report.tracking import read_metrics
from trainer.run import loop
from trainer.run.validation import Validator


def test_split_holds_out_distinct_images_with_all_their_repeats():
    records = [Record(Path(f"{i}.png"), f"c{i}") for i in range(10)]
    records += [Record(Path("0.png"), "c0")] * 3  # image 0 repeated
    train, val = split(records, 0.2, seed=1)
    assert len(val) == 2 and len({r.path for r in val}) == 2
    assert not {r.path for r in train} & {r.path for r in val}
    assert (train, val) == split(records, 0.2, seed=1)
    assert split(records, 0.0, seed=1) == (records, [])
    with pytest.raises(ValueError, match=r"validation\.fraction"):
        split(records, 0.99, seed=1)


@pytest.fixture(scope="module")
def parts(tiny_model):
    return (
        CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer"),
        CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder"),
        AutoencoderKL.from_pretrained(tiny_model, subfolder="vae"),
        UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet"),
        DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler"),
    )


def test_loss_depends_only_on_the_weights_not_on_batching(parts, tiny_data):
    tokenizer, text_encoder, vae, unet, noise_scheduler = parts
    examples = [
        Example(p, p.with_suffix(".txt").read_text().strip(), (64, 64))
        for p in sorted(tiny_data.glob("*.png"))[:5]
    ]
    scores = [
        Validator(examples, tokenizer, vae, 3, seed=0, batch_size=b).loss(
            unet, text_encoder, noise_scheduler, "cpu"
        )
        for b in (1, 2, 5, 5)
    ]
    assert math.isfinite(scores[0]) and scores[0] > 0
    assert scores[2] == scores[3], "same weights, same number"
    assert scores == pytest.approx([scores[0]] * 4, rel=1e-5)
    other = Validator(examples, tokenizer, vae, 3, seed=1, batch_size=5)
    assert other.loss(unet, text_encoder, noise_scheduler, "cpu") != scores[0]
    with torch.no_grad():
        unet.conv_out.bias += 0.1  # different weights, different number
    try:
        changed = Validator(examples, tokenizer, vae, 3, seed=0, batch_size=5)
        assert changed.loss(unet, text_encoder, noise_scheduler, "cpu") != scores[0]
    finally:
        with torch.no_grad():
            unet.conv_out.bias -= 0.1


def test_run_reports_val_loss_on_schedule(make_config, tmp_path):
    cfg = make_config("train.max_steps=5", "validation.fraction=0.25", "validation.every_n_steps=2")
    loop.run(cfg)
    records = read_metrics(cfg.output_dir)
    scored = [r["step"] for r in records if "val_loss" in r]
    assert scored == [2, 4, 5]
    assert all(math.isfinite(r["val_loss"]) for r in records if "val_loss" in r)
    # 16 images, 4 held out: 12 train → 3 micro-batches of 4 per epoch
    assert records[-1]["samples"] == 5 * 2 * 4


def test_samples_are_written_at_validation_points_with_a_fixed_seed(make_config, tmp_path):
    from PIL import Image

    settings = (
        "train.max_steps=4",
        "validation.every_n_steps=2",
        'validation.prompts=["a red circle", "a blue square"]',
        "validation.sample_steps=2",
    )
    for name in ("a", "b"):
        loop.run(make_config(*settings, output=tmp_path / name))
    a, b = tmp_path / "a" / "samples", tmp_path / "b" / "samples"
    assert sorted(p.relative_to(a).as_posix() for p in a.rglob("*.png")) == [
        "progression.png",
        "step-000002/grid.png",
        "step-000002/p00-seed0.png",
        "step-000002/p01-seed0.png",
        "step-000004/grid.png",
        "step-000004/p00-seed0.png",
        "step-000004/p01-seed0.png",
    ]
    for path in a.rglob("p*-seed*.png"):
        image = Image.open(path)
        assert image.size == (64, 64)
        # Same config, same seed: the same image, so differences between runs are the weights.
        assert image.tobytes() == Image.open(b / path.relative_to(a)).tobytes()


def test_the_held_out_set_depends_on_validation_seed_not_train_seed(make_config):
    from trainer.data.feed import checked_examples

    def held_out(*sets):
        _, val = checked_examples(make_config("validation.fraction=0.25", *sets), False)
        return [e.path for e in val]

    assert held_out("train.seed=0") == held_out("train.seed=7")
    assert held_out("validation.seed=0") != held_out("validation.seed=3")
