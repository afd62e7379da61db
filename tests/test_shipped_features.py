"""The features kohya and OneTrainer users look for first, through the shipped reference config:
at their shipped defaults, all on at once, and as a sweep axis."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import training_metadata
from sweep_helpers import run_sweep, summary, sweep_command, write_sweep

from trainer.config import load as config
from trainer.lora.files import WEIGHTS_NAME
from trainer.report.tracking import read_metrics
from trainer.run import loop

REPO = Path(__file__).resolve().parents[1]
LORA_TOML = REPO / "configs" / "lora.toml"

# What a CPU run of the tiny model needs changed in the real-model reference; every key the
# features added stays as configs/lora.toml ships it.
TINY = (
    "data.resolution=64",
    "data.num_workers=0",
    "train.max_steps=2",
    "train.batch_size=2",
    'train.mixed_precision="no"',
    "lr_scheduler.warmup_steps=0",
    "validation.prompts=[]",
    'logging.tracker="none"',
)
NEW_KEYS = {
    "data": ("subsets", "prior_loss_weight", "alpha_mask", "mask_suffix"),
    "train": (
        "loss", "huber_c", "huber_schedule", "timestep_sampling", "logit_mean", "logit_std",
        "mode_scale", "debiased_estimation", "zero_terminal_snr", "masked_loss",
    ),
    "lora": ("plus_ratio", "down_lr_weight", "mid_lr_weight", "up_lr_weight"),
    "ema": tuple(config.EmaConfig.__dataclass_fields__),
}  # fmt: skip


def shipped(tiny_model, tiny_data, out: Path, *extra: str) -> config.RunConfig:
    where = [f'model.pretrained="{tiny_model}"', f'data.path="{tiny_data}"', f'output_dir="{out}"']
    return config.load(LORA_TOML, [*where, *TINY, *extra])


def test_every_new_option_at_its_shipped_default_trains_the_tiny_model(
    tiny_model, tiny_data, tmp_path
):
    cfg = shipped(tiny_model, tiny_data, tmp_path / "out")
    reference = config.load(LORA_TOML).to_dict()
    for table, keys in NEW_KEYS.items():
        for key in keys:  # as shipped, and documented there (tests/test_config.py)
            assert cfg.to_dict()[table][key] == reference[table][key]
    result = loop.run(cfg)
    assert result.updates == 2 and not result.interrupted
    records = read_metrics(tmp_path / "out")
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[0]["lr_groups"] == ["unet"]
    assert training_metadata(tmp_path / "out" / WEIGHTS_NAME)["weights"] == "trained"


def test_every_new_option_on_at_once_trains_the_tiny_model(tiny_model, tiny_data, tmp_path):
    from make_tiny_dataset import make_tiny_dataset

    reg = make_tiny_dataset(tmp_path / "reg", count=4, seed=9)
    subsets = f'[{{path = "{tiny_data}", repeats = 2}}, {{path = "{reg}", is_reg = true}}]'
    cfg = shipped(
        tiny_model, tiny_data, tmp_path / "out", 'data.path=""', f"data.subsets={subsets}",
        "data.prior_loss_weight=0.5", "data.alpha_mask=true", "train.masked_loss=true",
        'train.loss="huber"', 'train.timestep_sampling="logit_normal"',
        "train.debiased_estimation=true", "lora.plus_ratio=16.0",
        "lora.down_lr_weight=[0, 1, 1, 0.5]", "ema.enabled=true",
    )  # fmt: skip
    loop.run(cfg)
    records = read_metrics(tmp_path / "out")
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[0]["lr_groups"] == ["unet", "unet_plus", "unet_x0.5", "unet_x0.5_plus"]
    record = training_metadata(tmp_path / "out" / WEIGHTS_NAME)
    assert record["weights"] == "ema" and record["num_reg_images"] == 32


@pytest.mark.slow
def test_a_sweep_over_a_new_option_runs(tiny_model, tiny_data, tmp_path):
    """Two LoRA+ settings as a grid axis: both runs finish, each with its own groups."""
    sweep = write_sweep(tmp_path / "sweep", tiny_model, tiny_data, name="plus")
    text = sweep.read_text().split("[grid]")[0]
    sweep.write_text(text + '[grid]\n"lora.plus_ratio" = [0.0, 4.0]\n')
    out = tmp_path / "out"
    run_sweep(sweep_command(sweep, out), tmp_path / "worker.log")
    rows = summary(out)
    assert sorted(trial for trial, _ in rows) == ["plus_ratio=0", "plus_ratio=4"]
    assert all(r["state"] == "complete" for r in rows.values())
    groups = {r["trial"]: read_metrics(Path(r["folder"]))[0]["lr_groups"] for r in rows.values()}
    assert groups == {"plus_ratio=0": ["unet"], "plus_ratio=4": ["unet", "unet_plus"]}
