"""The shipped example sweep, run as the README says, gives its verdict in the README's form.

Twelve runs of 24 updates (minutes on a CPU), so it is opt-in: ``pytest -m heavy``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from sweep_helpers import REPO, environment

pytestmark = pytest.mark.heavy


def readme_verdict() -> str:
    """The verdict the README quotes (its block quote), as one line."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    quote = re.search(r"On the example the report said:\n\n((?:> .*\n)+)", text)
    assert quote, "README.md: the example's verdict is quoted after 'On the example ...'"
    return " ".join(line[2:].strip() for line in quote.group(1).splitlines())


def test_the_shipped_example_places_every_schedule_as_the_readme_says(tmp_path):
    """``make quickstart``'s model and data, the sweep file as shipped, from a directory laid
    out like the repository (its base config names tiny/model and tiny/data)."""
    from make_tiny_dataset import make_tiny_dataset
    from make_tiny_sd import make_tiny_sd

    make_tiny_sd(tmp_path / "tiny" / "model")
    make_tiny_dataset(tmp_path / "tiny" / "data")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "trainer.commands.cli", "sweep",
           str(REPO / "configs" / "sweeps" / "tiny_schedules.toml"), "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=environment(), capture_output=True, text=True,
                          timeout=3600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "summary.json").read_text())
    (verdict,) = data["verdicts"]
    assert verdict["objective"] == "final" and verdict["pairs"] == 6
    configs = verdict["configurations"]
    assert len(configs) == 4
    for c in configs:
        assert c["place"] in ("best", "tied", "behind", "identical"), c
        if c["place"] != "best":
            assert c["low"] <= c["gap"] <= c["high"] and c["df"] == 2
    assert verdict["text"] == readme_verdict()
