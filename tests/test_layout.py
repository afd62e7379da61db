"""The package layout: a checkpoint written before the renovation resumes exactly after it."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer.lora.files import WEIGHTS_NAME
from trainer.run import loop

BEFORE = Path(__file__).parent / "data" / "run-before-renovation"
SETTINGS = (
    "checkpoint.every_n_steps=2",
    'lr_scheduler={name="constant"}',
)


def test_a_checkpoint_from_the_flat_layout_resumes_bitwise(tiny_config, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(BEFORE, old, ignore=shutil.ignore_patterns("README.md"))
    # The run was made with model "model" and data "data" beside it; here they are the test
    # session's copies of the same tiny model and images, so those two keys are allowed.
    allowed = '["max_steps", "model.pretrained", "data.path"]'
    resume = ['checkpoint.resume="latest"', f"checkpoint.allow_change={allowed}"]
    resumed = loop.run(tiny_config(old, "train.max_steps=4", *SETTINGS, *resume))
    straight = loop.run(tiny_config(tmp_path / "new", "train.max_steps=4", *SETTINGS))
    assert resumed.updates == straight.updates == 4
    before = load_file(BEFORE / "checkpoints" / "step-000002" / WEIGHTS_NAME)
    got, want = load_file(old / WEIGHTS_NAME), load_file(tmp_path / "new" / WEIGHTS_NAME)
    assert got.keys() == want.keys() == before.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert any(not torch.equal(before[k], want[k]) for k in want)  # it trained on from there
    # Updates 1 and 2 were not trained again: their records, clock included, are the old run's.
    old_lines = (BEFORE / "metrics.jsonl").read_text().splitlines()
    assert (old / "metrics.jsonl").read_text().splitlines()[:2] == old_lines[:2]
