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
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny random SDXL diffusers folder (two text encoders, text_time conditioning)."""
    from make_tiny_sd import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "model")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """A tiny random SD 3.5 diffusers folder in 3.5 Medium's layout (an MMDiT with attn2 in
    its first block, CLIP-L, CLIP-G and T5, a 16-channel VAE, flow matching)."""
    from make_tiny_sd import make_tiny_sd3

    return make_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3") / "model")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """16 captioned 64 px shape images in the kohya layout."""
    from make_tiny_dataset import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "shapes", count=16)


@pytest.fixture(scope="session")
def tiny_config(tiny_model, tiny_data):
    """``tiny_config(output, *overrides)``: configs/tiny.toml pointed at the session's model and
    data, writing to ``output``, with ``--set`` style overrides on top (usable from fixtures of
    any scope)."""
    from trainer.config import load as config

    def build(output: Path, *overrides: str):
        base = [
            f'model.pretrained="{tiny_model}"',
            f'data.path="{tiny_data}"',
            f'output_dir="{output}"',
            'logging.tracker="none"',
        ]
        return config.load(TINY_TOML, [*base, *overrides])

    return build


@pytest.fixture(scope="session")
def sdxl_config(tiny_config, tiny_sdxl):
    """``sdxl_config(output, *overrides)``: like ``tiny_config``, on the tiny SDXL model."""

    def build(output: Path, *overrides: str):
        return tiny_config(output, f'model.pretrained="{tiny_sdxl}"', *overrides)

    return build


@pytest.fixture(scope="session")
def sd3_config(tiny_config, tiny_sd3):
    """``sd3_config(output, *overrides)``: like ``tiny_config``, on the tiny SD3 model."""

    def build(output: Path, *overrides: str):
        return tiny_config(output, f'model.pretrained="{tiny_sd3}"', *overrides)

    return build


@pytest.fixture
def make_config(tiny_config, tmp_path):
    """Like ``tiny_config``, writing to ``tmp_path / "out"`` unless ``output`` is given, e.g.
    ``make_config("train.max_steps=3")``."""

    def build(*overrides: str, output: Path | None = None):
        return tiny_config(output or tmp_path / "out", *overrides)

    return build


@pytest.fixture
def every_update_drawn(monkeypatch):
    """Make the progress bar draw at every update (tqdm skips draws within 0.1 s by default,
    and reads its TQDM_* environment variables only once, at import), so a test can read what
    each update showed."""
    import functools

    from tqdm.auto import tqdm

    from trainer.report import tracking

    monkeypatch.setattr(tracking, "tqdm", functools.partial(tqdm, mininterval=0, miniters=1))


@pytest.fixture(scope="session")
def tiny_scorers(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny random CLIP and DINOv2 folders (validation.clip_model, validation.dino_model)."""
    from make_tiny_scorers import make_tiny_scorers

    return make_tiny_scorers(tmp_path_factory.mktemp("scorers"))
