"""Shared fixtures: one tiny SD model and one tiny dataset, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Everything runs offline: a test that reaches for the hub must fail, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TINY_TOML = REPO / "configs" / "tiny.toml"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random SD-1.x diffusers folder (epsilon prediction)."""
    from make_tiny_sd import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """16 captioned 64 px shape images in the kohya layout."""
    from make_tiny_dataset import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "shapes", count=16)


@pytest.fixture
def make_config(tiny_model, tiny_data, tmp_path):
    """Build a RunConfig from configs/tiny.toml pointed at the session's model and data.

    Extra ``--set`` style overrides are applied on top, e.g. ``make_config("train.max_steps=3")``.
    """
    from trainer import config

    def build(*overrides: str, output: Path | None = None):
        base = [
            f'model.pretrained="{tiny_model}"',
            f'data.path="{tiny_data}"',
            f'output_dir="{output or tmp_path / "out"}"',
            'logging.tracker="none"',
        ]
        return config.load(TINY_TOML, [*base, *overrides])

    return build
