"""The one place that names and parses the ``step-NNNNNN`` folders of checkpoints and samples,
and names the ``checkpoints/`` folder that holds a run's checkpoints.

NNNNNN is the number of optimizer updates done, zero-padded to six digits and longer past
update 999,999. Text order breaks there (``step-1000000`` sorts before ``step-999999``), so
folders are always ordered by the parsed number, never by name.
"""

from __future__ import annotations

import re
from pathlib import Path

_NAME = re.compile(r"step-(\d{6,})")
# The folder of an output_dir that holds its checkpoints' step folders.
CHECKPOINTS = "checkpoints"


def step_name(step: int) -> str:
    """``step-NNNNNN``: the folder name of update ``step``."""
    return f"step-{step:06d}"


def parse_step(name: str) -> int | None:
    """The update of a ``step-NNNNNN`` folder name, or None for any other name (``.tmp``,
    ``.damaged`` and other suffixed names included)."""
    match = _NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def numbered_folders(root: Path, suffix: str = "") -> list[tuple[int, Path]]:
    """``(update, folder)`` of every ``step-NNNNNN<suffix>`` folder in ``root``, by update.

    Args:
        root: The folder that holds them (``checkpoints/``, ``samples/``).
        suffix: Only folders with this suffix after the number (e.g. ``.tmp``); none by default.
    """
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        if suffix and not folder.name.endswith(suffix):
            continue
        step = parse_step(folder.name.removesuffix(suffix) if suffix else folder.name)
        if step is not None and folder.is_dir():
            found.append((step, folder))
    return sorted(found, key=lambda pair: pair[0])
