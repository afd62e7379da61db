"""The command line answers at once: help, the schedule list, the config reference, LR
previews and config errors need no torch, diffusers, peft, transformers or accelerate (their
imports take seconds). Measured as what each command leaves in ``sys.modules``, not as time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "peft", "transformers", "accelerate", "matplotlib")
PROBE = """
import contextlib, io, json, sys
from trainer.commands.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    try:
        code = main(json.loads(sys.argv[1]))
    except SystemExit as stop:
        code = stop.code
print(json.dumps({"code": code, "loaded": sorted(m for m in sys.modules if "." not in m)}))
"""


def loaded_after(argv: list[str]) -> tuple[int, set[str]]:
    """Exit code and top-level modules loaded after ``sdlora ARGV`` in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["code"], set(result["loaded"])


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["train", "--help"],
        ["schedules"],
        ["schedules", "cosine"],
        ["config-help"],
        ["train", "--config", "configs/tiny.toml", "--set", "train.max_stpes=3"],
    ],
    ids=["help", "train-help", "schedules", "one-schedule", "config-help", "config-error"],
)
def test_answers_without_the_heavy_libraries(argv):
    code, loaded = loaded_after(argv)
    assert code in (0, 2, None)
    assert sorted(loaded & set(HEAVY)) == []


def test_lr_plot_needs_no_heavy_library(tiny_data):
    argv = ["lr-plot", "--config", "configs/tiny.toml", "--set", f'data.path="{tiny_data}"']
    code, loaded = loaded_after(argv)
    assert code == 0
    assert sorted(loaded & set(HEAVY)) == []


def test_a_problem_preflight_finds_comes_before_the_model_libraries(tmp_path):
    """A missing data.path and model are found by preflight, which loads torch (checkpoints)
    but not diffusers, peft, transformers or accelerate. (A model that exists is opened to
    check the LoRA targets in its modules, which needs diffusers: a problem found after that
    check cannot come before it.)"""
    argv = ["train", "--config", "configs/tiny.toml", "--set", f'data.path="{tmp_path / "no"}"']
    argv += ["--set", f'output_dir="{tmp_path / "out"}"']
    argv += ["--set", f'model.pretrained="{tmp_path / "no-model"}"']
    code, loaded = loaded_after(argv)
    assert code == 2
    assert sorted(loaded & set(HEAVY) - {"torch"}) == []


def test_the_probe_sees_a_heavy_import():
    """The measure can fail: `sample --help` builds no model, but a real import is seen."""
    code = "import sys, torch; print(json.dumps({'code': 0, 'loaded': list(sys.modules)}))"
    done = subprocess.run(
        [sys.executable, "-c", "import json; " + code], capture_output=True, text=True
    )
    assert "torch" in json.loads(done.stdout)["loaded"]
