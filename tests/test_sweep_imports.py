"""The sweep package's imports: one way inside it (no cycle, function-level imports counted),
and the training command never imports it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sweep_helpers import REPO, environment
from test_imports import imports

SWEEP = REPO / "trainer" / "sweep"


def sweep_graph() -> dict[str, set[str]]:
    """Each module of trainer/sweep → the modules of trainer/sweep it imports at runtime."""
    names = {p.stem for p in SWEEP.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in SWEEP.glob("*.py"):
        found = set()
        for _, module in imports(path):
            parts = module.split(".")
            if parts[:2] == ["trainer", "sweep"] and len(parts) > 2 and parts[2] in names:
                found.add(parts[2])
        graph[path.stem] = found - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle (its modules, the first repeated at the end), or []."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt, [*path, nxt])
                if found:
                    return found
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return []


def test_the_sweep_modules_import_each_other_one_way():
    assert find_cycle(sweep_graph()) == []
    assert "engine" not in sweep_graph()["spec"], "spec is read before Optuna is involved"


def test_the_cycle_finder_finds_a_function_level_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


TRAIN = """
import sys, types
from trainer.commands import cli
from trainer.config import load as config
from trainer.run import loop, preflight

# The command as it runs, without a model: its config, preflight and training loop stubbed.
config.load = lambda path, overrides: types.SimpleNamespace()
preflight.check = lambda cfg, processes, overwrite, is_main: None
loop.run = lambda cfg, overwrite, checked, stop_at: types.SimpleNamespace(
    is_main_process=False, interrupted=False
)
code = cli.main(["train", "--config", "unused.toml"])
sweep = [m for m in sys.modules if m == "trainer.sweep" or m.startswith("trainer.sweep.")]
print(code, sorted(sweep))
"""


@pytest.mark.slow
def test_the_train_command_does_not_import_the_sweep_package():
    """A sweep trial's training process runs ``sdlora train``; what it needs of the sweep
    (the run lock, the pid file) is in trainer/run/trial.py, so a plain training run loads
    nothing of Optuna's side."""
    done = subprocess.run(
        [sys.executable, "-c", TRAIN], cwd=REPO, env=environment(), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["0", "[]"], done.stdout + done.stderr[-3000:]
