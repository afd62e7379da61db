"""The README and docs/ stay true: their links, commands, config keys and file names exist.

The README is the front door (at most 260 lines, the two commands first: CI and the
developers' guide run them as written); the reference lives in docs/. These tests read the
markdown as text and check every claim a reader can act on: each relative link and anchor, each
``sdlora`` subcommand and its flags, each ``make`` target, each config file and ``--set`` key,
each repository path named in backticks, and that docs/architecture.md names every module.
Nothing here loads a model.
"""

from __future__ import annotations

import argparse
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from trainer.commands.cli import build_parser
from trainer.config import load as config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
IDS = [str(p.relative_to(REPO)) for p in PAGES]

FENCE = re.compile(r"^([ \t]*)```(\w*)[^\n]*\n(.*?)^\1```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`([^`]+)`")  # a span may wrap onto the next line
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def code_blocks(text: str, langs: tuple[str, ...] = ()) -> list[str]:
    """The bodies of the fenced code blocks (only those in ``langs``, when given)."""
    return [m.group(3) for m in FENCE.finditer(text) if not langs or m.group(2) in langs]


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def inline_code(text: str) -> list[str]:
    """Every inline code span outside the fenced blocks, its line breaks as spaces."""
    return [" ".join(span.split()) for span in INLINE.findall(prose(text))]


def all_code(text: str) -> list[str]:
    return code_blocks(text) + inline_code(text)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub renders it: markup gone, lower case, punctuation dropped,
    spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in prose(path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)  # GitHub numbers a repeated heading: name, name-1, ...
            found.add(f"{base}-{n}" if n else base)
            seen[base] = n + 1
    return found


def shell_commands(block: str) -> list[list[str]]:
    """The shell commands of a code block as token lists: continuation lines joined, comments
    dropped, split at ``;``, ``&&``, ``||``, ``|`` and ``&``."""
    commands: list[list[str]] = []
    for line in block.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        current: list[str] = []
        for token in tokens:
            if token in (";", "&&", "||", "|", "&"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def sdlora_commands(text: str) -> list[list[str]]:
    """Every ``sdlora ...`` command of a page's bash blocks, from ``sdlora`` on."""
    found = []
    for block in code_blocks(text, ("bash", "sh", "shell")):
        for tokens in shell_commands(block):
            starts = [i for i, t in enumerate(tokens) if t == "sdlora" or t.endswith("/sdlora")]
            if starts:
                found.append(tokens[starts[0] :])
    return found


def subcommands() -> set[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.MULTILINE))


# ---------------------------------------------------------------- the README itself


def test_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines; move reference to docs/"
    first = FENCE.search(text)
    assert first is not None and text[: first.start()].count("\n") <= 3, "no code block on top"
    commands = [line.split("#")[0].strip() for line in first.group(3).splitlines()]
    assert commands == ["make quickstart", "make test"]


def test_readme_links_every_docs_page():
    linked = {
        (README.parent / target.split("#")[0]).resolve()
        for target in LINK.findall(prose(README.read_text(encoding="utf-8")))
    }
    assert [p.name for p in DOCS if p.resolve() not in linked] == []


# ---------------------------------------------------------------- links and paths


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_relative_links_and_anchors_exist(page):
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert broken == []


REPO_PATH = re.compile(
    r"^(?:trainer|schedulers|typedtables|scripts|tests|configs|docker|requirements)/[\w./-]+$"
)


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_repository_paths_named_in_backticks_exist(page):
    """``trainer/run/loop.py``-style names: a module moved or renamed shows up here."""
    named = [c for c in inline_code(page.read_text(encoding="utf-8")) if REPO_PATH.match(c)]
    assert [p for p in named if not (REPO / p).exists()] == []


def test_architecture_names_every_module():
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    roots = [REPO / "trainer", REPO / "schedulers", REPO / "typedtables"]
    modules = [REPO / "train.py", *sorted(p for root in roots for p in root.rglob("*.py"))]
    missing = [
        str(p.relative_to(REPO))
        for p in modules
        if p.read_text(encoding="utf-8").strip()  # an empty __init__.py has no job
        and f"`{p.relative_to(REPO)}`" not in text
    ]
    assert missing == [], "docs/architecture.md: add a line for each"


# ---------------------------------------------------------------- commands


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_sdlora_subcommands_exist(page):
    real = subcommands()
    named = set()
    for code in all_code(page.read_text(encoding="utf-8")):
        named.update(re.findall(r"(?<![\w/.-])sdlora\s+([a-z][a-z0-9-]*)", code))
    assert named - real == set()


def test_readme_sdlora_commands_parse():
    """Each ``sdlora`` command of the README's bash blocks parses with the real parser: its
    subcommand and every flag exist (``sdlora launch``'s training arguments as ``train``)."""
    parser = build_parser()
    commands = sdlora_commands(README.read_text(encoding="utf-8"))
    assert commands, "no sdlora command found in README.md"
    for tokens in commands:
        args = tokens[1:]
        if args[0] == "launch":
            args = ["train", *args[args.index("train.py") + 1 :]]
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"README.md: {shlex.join(tokens)} does not parse")


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_make_targets_exist(page):
    targets = makefile_targets()
    named = set()
    for code in all_code(page.read_text(encoding="utf-8")):
        named.update(re.findall(r"(?:^|[\s;&(])make\s+([a-z][\w-]*)", code, re.MULTILINE))
    assert named - targets == set()


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_config_files_and_set_keys_exist(page):
    """Every ``--config configs/...`` exists, and every command's ``--set`` overrides load
    with it through ``config.load``: an unknown key or a wrong type fails here."""
    problems = []
    for tokens in sdlora_commands(page.read_text(encoding="utf-8")):
        if "--config" not in tokens:
            continue
        path = tokens[tokens.index("--config") + 1]
        if not path.startswith("configs/"):
            continue  # a placeholder (--config FILE)
        if not (REPO / path).is_file():
            problems.append(f"{path}: no such config")
            continue
        sets = [tokens[i + 1] for i, t in enumerate(tokens) if t == "--set"]
        try:
            config.load(REPO / path, sets)
        except config.ConfigError as err:
            problems.append(f"{shlex.join(tokens)}: {err}")
    assert problems == []


def test_readme_names_config_overrides_that_load():
    """The README shows at least one real-model command whose overrides are checked above."""
    commands = sdlora_commands(README.read_text(encoding="utf-8"))
    assert any("--set" in c and "configs/lora.toml" in c for c in commands)
