"""Imports run one way: commands → sweep → run → report → data/lora → models → config →
optimizers → schedulers → typedtables, with the shared base modules (files, quiet,
step_folders) importable from anywhere. Read from the source (AST), so a function-level import
counts as much as a top-level one; imports under ``if TYPE_CHECKING:`` are annotations only and
are left out. docs/architecture.md draws the same map."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = {"errors", "files", "quiet", "step_folders"}
# What each package may import, besides itself, the base modules and the layers below it.
LAYERS = [
    "commands",
    "sweep",
    "run",
    "report",
    "data",
    "lora",
    "models",
    "config",
    "optimizers",
    "schedulers",
    "typedtables",
]
# data and lora are side by side: neither imports the other.
SIDE_BY_SIDE = {("data", "lora"), ("lora", "data")}


def unit(module: str) -> str | None:
    """The layer a dotted module belongs to (None for third-party modules)."""
    parts = module.split(".")
    if parts[0] in ("schedulers", "typedtables"):
        return parts[0]
    if parts[0] != "trainer" or len(parts) < 2:
        return None
    return parts[1]


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                lines.update(range(inner.lineno, (inner.end_lineno or inner.lineno) + 1))
    return lines


def imports(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted module)`` of every runtime import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "trainer":  # `from trainer import files`
                found += [(node.lineno, f"trainer.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return found


def violations() -> list[str]:
    found = []
    roots = [REPO / "trainer", REPO / "schedulers", REPO / "typedtables"]
    for path in sorted(p for root in roots for p in root.rglob("*.py")):
        here = unit(".".join(path.relative_to(REPO).with_suffix("").parts))
        if here is None or here in BASE:
            continue
        for line, module in imports(path):
            there = unit(module)
            if there is None or there == here or there in BASE:
                continue
            upward = LAYERS.index(there) < LAYERS.index(here)
            if upward or (here, there) in SIDE_BY_SIDE:
                found.append(f"{path.relative_to(REPO)}:{line}: {here} imports {module}")
    return found


def test_imports_run_one_way():
    assert violations() == []


def test_every_package_is_in_a_layer():
    packages = {p.name for p in (REPO / "trainer").iterdir() if (p / "__init__.py").exists()}
    assert packages <= set(LAYERS)
    modules = {p.stem for p in (REPO / "trainer").glob("*.py")} - {"__init__"}
    assert modules == BASE


def test_the_rule_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from trainer.run import loop\nif TYPE_CHECKING:\n    from trainer.run import x\n"
    )
    assert imports(bad) == [(1, "trainer.run")]
    assert LAYERS.index("run") < LAYERS.index("data")  # data → run would be upward
