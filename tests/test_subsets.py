"""Datasets as subsets: repeats, per-subset settings, regularisation images, resume."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import training_metadata
from safetensors.torch import load_file

from trainer.config import load as config
from trainer.data import feed
from trainer.data import subsets as data_subsets
from trainer.data.order import ResumableBatchSampler
from trainer.lora.files import WEIGHTS_NAME, read_header
from trainer.run import checkpoint as ckpt
from trainer.run import loop, step

MINIMAL = {"model": {"pretrained": "m"}, "output_dir": "out"}


def build(**data) -> config.RunConfig:
    return config.build({**MINIMAL, "data": data})


def problems_of(**data) -> list[str]:
    with pytest.raises(config.ConfigError) as err:
        build(**data)
    return err.value.problems


# ---------------------------------------------------------------- config


def test_a_subset_takes_data_keys_it_leaves_out_and_overrides_the_rest():
    cfg = build(
        path="",
        resolution=256,
        shuffle_tags=True,
        subsets=[{"path": "a", "repeats": 3}, {"path": "b", "resolution": 128, "is_reg": True}],
    )
    a, b = cfg.data.subsets
    assert (a.path, a.repeats, a.resolution, a.shuffle_tags, a.is_reg) == ("a", 3, 256, True, False)
    assert (b.resolution, b.shuffle_tags, b.is_reg, b.loss_weight) == (128, True, True, 1.0)


def test_the_resolved_subsets_round_trip_through_the_saved_config(tmp_path):
    cfg = build(path="", subsets=[{"path": "a", "repeats": 2}, {"path": "b", "is_reg": True}])
    path = tmp_path / "config.toml"
    path.write_text(config.to_toml(cfg.to_dict()))
    assert config.load(path) == cfg


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"path": "x", "subsets": [{"path": "a"}]}, "data.path / [[data.subsets]]: both are set"),
        ({"path": ""}, "data.path: required"),
        ({"path": "", "subsets": [{"path": "a", "is_reg": True}]}, "every subset has is_reg"),
        ({"path": "", "subsets": [{"pth": "a"}]}, "data.subsets[0].pth: unknown key; did you mean"),
        ({"path": "", "subsets": [{"path": "a", "repeats": 0}]}, "data.subsets[0].repeats: 0"),
        ({"path": "", "subsets": [{"path": "a", "resolution": 100}]}, "data.subsets[0].resolution"),
        ({"path": "", "subsets": {"path": "a"}}, "data.subsets: expected an array of tables"),
        ({"path": "x", "prior_loss_weight": -1.0}, "data.prior_loss_weight: -1.0 must be >= 0"),
    ],
)
def test_subset_problems_name_the_key(data, expected):
    assert any(expected in p for p in problems_of(**data)), problems_of(**data)


# ---------------------------------------------------------------- kohya's mixing rule


@pytest.mark.parametrize(
    ("train", "repeats", "expected"),
    [
        (10, [1, 1, 1], [4, 3, 3]),  # passes of one use each until 10
        (6, [5, 5], [5, 5]),  # the first pass takes each image's repeats whole
        (4, [1] * 6, [1, 1, 1, 1, 0, 0]),  # more reg images than needed: the last unused
        (7, [2, 1], [4, 3]),  # 2+1, then +1 +1, +1 +1
        (0, [3], [0]),
    ],
)
def test_reg_counts_follow_kohyas_rule(train, repeats, expected):
    assert data_subsets.reg_counts(train, repeats) == expected


# ---------------------------------------------------------------- what an epoch feeds


def folder(root: Path, name: str, count: int, seed: int) -> Path:
    from make_tiny_dataset import make_tiny_dataset

    return make_tiny_dataset(root / name, count=count, seed=seed)


def epoch_uses(cfg: config.RunConfig) -> Counter:
    """How often each image file is fed in epoch 0, by the loader's own sampler."""
    prepared, _ = feed.checked_examples(cfg, show_progress=False)
    sampler = ResumableBatchSampler(prepared.groups, cfg.train.batch_size, 1, 0, cfg.train.seed)
    batches = list(sampler)
    assert sum(len(g) for g in prepared.groups) == cfg.train.batch_size * len(batches)
    return Counter(prepared.examples[i].path for batch in batches for i, _ in batch)


def test_two_subsets_feed_each_image_as_often_as_their_repeats_say(tmp_path):
    a, b = folder(tmp_path, "a", 4, 1), folder(tmp_path, "b", 4, 2)
    cfg = config.build(
        {
            **MINIMAL,
            "train": {"batch_size": 4},
            "data": {"path": "", "resolution": 64, "subsets": [
                {"path": str(a), "repeats": 1}, {"path": str(b), "repeats": 3},
            ]},
        }
    )  # fmt: skip
    uses = epoch_uses(cfg)
    assert {p: n for p, n in uses.items() if p.parent == a} == {p: 1 for p in a.glob("*.png")}
    assert {p: n for p, n in uses.items() if p.parent == b} == {p: 3 for p in b.glob("*.png")}


def test_reg_images_are_mixed_in_as_many_as_training_images(tmp_path):
    a, reg = folder(tmp_path, "a", 4, 1), folder(tmp_path, "reg", 3, 2)
    cfg = config.build(
        {
            **MINIMAL,
            "train": {"batch_size": 2},
            "data": {"path": "", "resolution": 64, "subsets": [
                {"path": str(a), "repeats": 2}, {"path": str(reg), "is_reg": True},
            ]},
        }
    )  # fmt: skip
    uses = epoch_uses(cfg)
    assert sum(n for p, n in uses.items() if p.parent == a) == 8
    # 8 training examples: one pass of the 3 reg images, then +1 each in order → 3, 3, 2.
    names = sorted(reg.glob("*.png"))
    assert [uses[p] for p in names] == [3, 3, 2]


# ---------------------------------------------------------------- the weighted loss


def test_reg_loss_is_the_weighted_sum_of_instance_and_prior_losses(tiny_model):
    """The batch loss against per-example losses from separate forward passes."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from trainer.models.conditioning import Conditioning

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler")
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(4, 77, 32, generator=torch.Generator().manual_seed(1))
    seeds, prior = [3, 4, 5, 6], 0.25  # examples 2 and 3 are regularisation images

    def loss(rows: slice, weights=None) -> float:
        rand = step.ExampleRandom(seeds[rows])
        with torch.no_grad():
            return step.diffusion_loss(
                unet, noise_scheduler, latents[rows], Conditioning(hidden[rows]), rand,
                weights=weights,
            ).item()  # fmt: skip

    each = [loss(slice(i, i + 1)) for i in range(4)]
    expected = (each[0] + each[1] + prior * (each[2] + each[3])) / 4
    got = loss(slice(0, 4), torch.tensor([1.0, 1.0, prior, prior]))
    assert got == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- a run on subsets

SUBSET_RUN = (
    "train.max_steps=6",
    "train.batch_size=2",
    "train.gradient_accumulation_steps=1",
    "data.random_flip=true",
    "data.center_crop=false",
    'lora.save_dtype="fp32"',
    "checkpoint.every_n_steps=3",
)


@pytest.fixture(scope="module")
def subset_folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("subsets")
    return folder(root, "3_sks", 2, 5), folder(root, "class", 3, 6)


def subset_flags(a: Path, reg: Path) -> tuple[str, ...]:
    subsets = (
        f'[{{path = "{a}", repeats = 2, caption_dropout = 0.3}}, '
        f'{{path = "{reg}", is_reg = true, random_flip = false}}]'
    )
    return ('data.path=""', f"data.subsets={subsets}", "data.prior_loss_weight=0.5")


@pytest.fixture(scope="module")
def subset_run(tiny_config, subset_folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("subset_run")
    loop.run(tiny_config(out, *SUBSET_RUN, *subset_flags(*subset_folders)))
    return out


def test_a_run_on_subsets_resumes_mid_epoch_bitwise(
    subset_run, tiny_config, subset_folders, tmp_path
):
    # 4 training + 4 reg examples, batch 2: 4 updates an epoch; update 3 is mid-epoch.
    state = json.loads((ckpt.step_dir(subset_run, 3) / ckpt.TRAINER_STATE).read_text())
    assert (state["epoch"], state["position_in_epoch"]) == (0, 3)
    out = tmp_path / "resumed"
    start = f'checkpoint.resume="{ckpt.step_dir(subset_run, 3)}"'
    loop.run(tiny_config(out, *SUBSET_RUN, *subset_flags(*subset_folders), start))
    ours, theirs = load_file(out / WEIGHTS_NAME), load_file(subset_run / WEIGHTS_NAME)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_kohya_file_records_the_reg_images_as_kohya_does(subset_run):
    (kohya_file,) = [p for p in subset_run.glob("*.safetensors") if p.name != WEIGHTS_NAME]
    header = read_header(kohya_file).metadata
    assert header["ss_num_reg_images"] == "4"  # 4 training examples: 2 images × 2 repeats
    assert header["ss_prior_loss_weight"] == "0.5"
    assert json.loads(header["ss_reg_dataset_dirs"]) == {"class": {"n_repeats": 2, "img_count": 3}}
    assert json.loads(header["ss_dataset_dirs"]) == {"3_sks": {"n_repeats": 2, "img_count": 2}}
    (dataset,) = json.loads(header["ss_datasets"])
    assert [s["image_dir"] for s in dataset["subsets"]] == ["3_sks", "class"]
    assert [s["is_reg"] for s in dataset["subsets"]] == [False, True]
    assert training_metadata(kohya_file)["prior_loss_weight"] == 0.5


@pytest.mark.slow
def test_a_subset_run_killed_mid_epoch_resumes_to_the_same_bits(
    tiny_model, tiny_config, subset_folders, tmp_path
):
    """SIGKILL once the mid-epoch checkpoint of update 3 exists (4 updates an epoch), then
    `--resume latest`: the same LoRA and metrics as the run that was never killed."""
    import signal
    import sys

    from test_interrupt import assert_same_run, run_to_end, start_and_signal

    flags = (*SUBSET_RUN, "train.max_steps=12", *subset_flags(*subset_folders))
    reference = tmp_path / "reference"
    loop.run(tiny_config(reference, *flags))
    out = tmp_path / "killed"
    where = [f'model.pretrained="{tiny_model}"', f'output_dir="{out}"', 'logging.tracker="none"']
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.toml"]
    cmd += [x for s in (*where, *flags) for x in ("--set", s)]
    code, _ = start_and_signal(cmd, out, signal.SIGKILL, after_checkpoint=3)
    if code == 0:
        pytest.skip("the run finished before the kill landed (machine too fast)")
    assert code == -signal.SIGKILL and not (out / WEIGHTS_NAME).exists()
    run_to_end([*cmd, "--resume", "latest"])
    assert_same_run(out, reference)
