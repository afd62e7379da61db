"""The repository itself: no merge leftovers in any text file."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP = {".venv", ".git", "output", "tiny", "node_modules", ".pytest_cache", ".ruff_cache"}
TEXT = {".py", ".md", ".toml", ".yaml", ".yml", ".cfg", ".txt", ".html", ".json"}


def test_no_merge_conflict_markers():
    found = []
    for path in REPO.rglob("*"):
        if path.suffix not in TEXT or SKIP & set(path.relative_to(REPO).parts):
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.startswith(("<<<<<<< ", ">>>>>>> ")):
                found.append(f"{path.relative_to(REPO)}:{n}")
    assert not found, found
