"""Readers that only tests need: what two runs must share, and the facts files carry."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from trainer.lora.files import TRAINING_METADATA_KEY, read_header
from trainer.report.samples import METADATA_KEY
from trainer.report.tracking import CLOCK_KEYS


def without_clock(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Metrics records without their clock keys: what two runs of the same training share."""
    return [{k: v for k, v in r.items() if k not in CLOCK_KEYS} for r in records]


def training_metadata(path: str | Path) -> dict[str, Any]:
    """The run record stored in a LoRA file's header."""
    return json.loads(read_header(path).metadata.get(TRAINING_METADATA_KEY, "{}"))


def sample_facts(path: str | Path) -> dict[str, Any]:
    """The ``sdlora`` facts of a sample or grid PNG."""
    with Image.open(path) as image:
        return json.loads(image.text[METADATA_KEY])
