"""The source type-checks: mypy, as pyproject.toml's [tool.mypy] configures it (what `make lint`
runs), reports no error in trainer/, schedulers/, typedtables/ and train.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from mypy import api

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mypy_reports_no_errors(monkeypatch):
    monkeypatch.chdir(REPO)  # mypy reads [tool.mypy] (files, settings) from the working folder
    stdout, stderr, status = api.run([])
    assert status == 0, stdout + stderr
    assert stdout.startswith("Success: no issues found"), stdout
