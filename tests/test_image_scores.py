"""Per-timestep validation losses and the image scores (CLIP-T, CLIP-I, DINO), on tiny random
models loaded through transformers' and diffusers' real ``from_pretrained`` path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPModel, CLIPProcessor, CLIPTextModel, CLIPTokenizer

from trainer.config import load as config
from trainer.data.dataset import Example
from trainer.report.image_scores import ImageScorer, model_problems
from trainer.report.tracking import read_metrics
from trainer.run import loop
from trainer.run.validation import Validator

REPO = Path(__file__).resolve().parents[1]


def shapes(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)) for _ in range(count)
    ]


# ---------------------------------------------------------------- per-timestep loss


def test_loss_at_each_timestep_is_the_loss_scored_at_that_timestep_alone(tiny_model, tiny_data):
    """Scored at 3 fixed timesteps (166, 500, 833 of 1000), the middle one is the only
    timestep of a validator scoring at 1 (500), on the same images and noise; and the mean of
    the three is the overall loss."""
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler")
    examples = [
        Example(p, p.with_suffix(".txt").read_text().strip(), (64, 64))
        for p in sorted(tiny_data.glob("*.png"))[:4]
    ]
    three = Validator(examples, tokenizer, vae, 3, seed=0, batch_size=2)
    scored = three.evaluate(unet, text_encoder, noise_scheduler, "cpu")
    assert list(scored.by_timestep) == [166, 500, 833] == three.fixed_timesteps(noise_scheduler)
    one = Validator(examples, tokenizer, vae, 1, seed=0, batch_size=2)
    alone = one.loss(unet, text_encoder, noise_scheduler, "cpu")
    assert scored.by_timestep[500] == pytest.approx(alone, rel=1e-6)
    assert np.mean(list(scored.by_timestep.values())) == pytest.approx(scored.loss, rel=1e-9)
    assert three.loss(unet, text_encoder, noise_scheduler, "cpu") == scored.loss
    assert len(set(scored.by_timestep.values())) == 3


# ---------------------------------------------------------------- the scores


@pytest.fixture(scope="module")
def scorer(tiny_scorers):
    clip, dino = tiny_scorers
    return ImageScorer(["clip_t", "clip_i", "dino"], str(clip), str(dino), shapes(2), "cpu")


def test_scores_are_deterministic_across_two_evaluations_and_two_loads(scorer, tiny_scorers):
    images, prompts = shapes(3, seed=1), ["a red circle", "a blue square", "a green ring"]
    first = scorer.score(images, prompts)
    assert set(first) == {"clip_t", "clip_i", "dino"}
    assert all(math.isfinite(v) and -1 <= v <= 1 for v in first.values())
    assert scorer.score(images, prompts) == first
    clip, dino = tiny_scorers
    again = ImageScorer(["clip_t", "clip_i", "dino"], str(clip), str(dino), shapes(2), "cpu")
    assert again.score(images, prompts) == first


def test_clip_i_and_dino_of_an_image_with_itself_are_the_maximum(tiny_scorers):
    clip, dino = tiny_scorers
    reference, *others = shapes(6, seed=2)
    scorer = ImageScorer(["clip_i", "dino"], str(clip), str(dino), [reference], "cpu")
    itself = scorer.score([reference], ["x"])
    assert itself["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert itself["dino"] == pytest.approx(1.0, abs=1e-5)
    for other in others:
        scored = scorer.score([other], ["x"])
        assert scored["clip_i"] < itself["clip_i"] and scored["dino"] < itself["dino"]


def test_clip_t_is_the_cosine_of_transformers_own_embeddings(scorer, tiny_scorers):
    """CLIP-T against the model's embeddings computed here, through transformers alone."""
    clip, _ = tiny_scorers
    model = CLIPModel.from_pretrained(clip).eval()
    processor = CLIPProcessor.from_pretrained(clip)
    images, prompts = shapes(2, seed=3), ["a red circle", "two blue squares on grey"]
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cosines = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    assert scorer.score(images, prompts)["clip_t"] == pytest.approx(float(cosines.mean()), abs=1e-6)


# ---------------------------------------------------------------- config and checks


def test_score_keys_are_checked_before_any_model_loads(tmp_path):
    with pytest.raises(config.ConfigError) as err:
        config.load(REPO / "configs" / "tiny.toml", ['validation.scores=["clip_t", "dino"]',
                                                    "validation.prompts=[]"])  # fmt: skip
    text = str(err.value)
    assert "validation.scores: the scores are computed on the samples" in text
    assert "dino compare the samples with the held-out images" in text
    shipped = config.load(REPO / "configs" / "lora.toml")
    assert shipped.validation.scores == ()  # off unless asked for: no model download
    assert shipped.validation.clip_model == "openai/clip-vit-large-patch14"
    assert shipped.validation.dino_model == "facebook/dinov2-small"
    missing = config.load(REPO / "configs" / "lora.toml", [
        'validation.scores=["clip_t", "dino"]', "validation.fraction=0.1",
        f'validation.clip_model="{tmp_path / "nowhere"}"', f'validation.dino_model="{tmp_path}"',
    ]).validation  # fmt: skip
    found = model_problems(missing)
    assert any("validation.clip_model" in p and "no such folder" in p for p in found)
    assert any("validation.dino_model" in p and "no config.json" in p for p in found)


@pytest.mark.slow
def test_a_run_writes_per_timestep_losses_and_scores_to_metrics_and_tensorboard(
    make_config, tiny_scorers, tmp_path
):
    from test_tensorboard import events

    clip, dino = tiny_scorers
    out = tmp_path / "scored"
    cfg = make_config(
        "train.max_steps=2", "validation.fraction=0.25", "validation.every_n_steps=1",
        "validation.timesteps=2", 'validation.prompts=["a red circle", "a blue square"]',
        "validation.sample_steps=1", 'validation.scores=["clip_t", "clip_i", "dino"]',
        f'validation.clip_model="{clip}"', f'validation.dino_model="{dino}"',
        'logging.tracker="tensorboard"', output=out,
    )  # fmt: skip
    loop.run(cfg)
    records = read_metrics(out)
    assert [r["step"] for r in records if "clip_t" in r] == [1, 2]
    last = records[-1]
    assert set(last["val_loss_by_timestep"]) == {"250", "750"}
    assert np.mean(list(last["val_loss_by_timestep"].values())) == pytest.approx(last["val_loss"])
    board = events(out)
    for key in ("clip_t", "clip_i", "dino"):
        logged = [e.value for e in board.Scalars(f"val/{key}")]
        assert logged == pytest.approx([r[key] for r in records], rel=1e-6)
    assert [e.value for e in board.Scalars("val/loss_t0250")] == pytest.approx(
        [r["val_loss_by_timestep"]["250"] for r in records], rel=1e-6
    )
    # The scores of the last point are those of its sample images scored afresh.
    held_out = [Image.open(e.path).convert("RGB") for e in _held_out(cfg)]
    scorer = ImageScorer(cfg.validation.scores, str(clip), str(dino), held_out, "cpu")
    folder = out / "samples" / "step-000002"
    images = [Image.open(folder / f"p0{k}-seed0.png").convert("RGB") for k in range(2)]
    again = scorer.score(images, list(cfg.validation.prompts))
    assert again == pytest.approx({k: last[k] for k in again}, abs=1e-6)


def _held_out(cfg):
    from trainer.data.feed import checked_examples

    return checked_examples(cfg, show_progress=False)[1]
