"""The frozen base model, loaded once per process: a warm sweep worker's trials share it.

A warm worker (``trainer/sweep/warm.py``) turns this memo on; every run then gets a deep copy
of the pristine parts ``load.load_components`` returned for the same key, so no adapter, dtype
change, device move or scheduler swap of one trial reaches the next. The key is everything
that decides the loaded parts: the ``[model]`` table, the frozen weights' dtype, the
architecture, and the identity (path, size, modification time) of every file under the model
and VAE paths, so a model rewritten in place is loaded again. Hub ids (no local path) are not
kept. Only the newest entry is kept: a sweep's trials share one model.

Outside a warm worker (a training process, tests running ``loop.run`` in-process) the memo is
off and every run loads its model, as before.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from trainer.config.load import ModelConfig
from trainer.models import load as models

_enabled = False
_memo: dict[str, models.Components] = {}


@contextlib.contextmanager
def kept() -> Iterator[None]:
    """Keep the loaded parts for the runs of this process meanwhile."""
    global _enabled
    previous, _enabled = _enabled, True
    try:
        yield
    finally:
        _enabled = previous


def load_components(
    config: ModelConfig, dtype: torch.dtype, architecture: str
) -> models.Components:
    """``load.load_components``, from the memo when it is on: a deep copy of the pristine
    parts loaded for the same key."""
    key = _key(config, dtype, architecture) if _enabled else None
    if key is None:
        return models.load_components(config, dtype, architecture)
    if key not in _memo:
        _memo.clear()  # the previous model's memory first
        _memo[key] = models.load_components(config, dtype, architecture)
    return copy.deepcopy(_memo[key])


def _key(config: ModelConfig, dtype: torch.dtype, architecture: str) -> str | None:
    """What decides the loaded parts, or None when a path is not a local file or folder."""
    files = []
    for source in (config.pretrained, config.vae, config.single_file_config):
        if not source:
            continue
        path = Path(source).expanduser()
        if not path.exists():
            return None  # a hub id: no files to tell a change by
        found = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in found:
            stat = f.stat()
            files.append([str(f.resolve()), stat.st_size, stat.st_mtime_ns])
    table = dataclasses.asdict(config)
    return json.dumps([table, str(dtype), architecture, files], sort_keys=True, default=str)
