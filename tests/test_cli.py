"""The command line itself: ``--version`` and help text on every flag."""

from __future__ import annotations

import argparse
import shlex
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib

from trainer import cli
from trainer.cli import build_parser, main, package_version

REPO = Path(__file__).resolve().parents[1]

# `export` is being rewritten separately; its flags get their help text there.
NOT_YET_DOCUMENTED = {"export"}


def pyproject_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sdlora {metadata.version('sdlora')}"


def test_version_falls_back_to_pyproject_when_not_installed(monkeypatch):
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert package_version() == pyproject_version()


def test_the_installed_version_is_this_checkout():
    # `make install` installs this tree in editable mode; a stale venv would print another version.
    assert metadata.version("sdlora") == pyproject_version()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_flag_and_subcommand_has_help():
    parser = build_parser()
    commands = subcommands(parser)
    assert set(commands) == set(cli.COMMANDS)
    (sub_action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for choice in sub_action._choices_actions:
        assert choice.help, f"subcommand {choice.dest} has no help"
    missing = []
    for name, sub in [("sdlora", parser), *commands.items()]:
        if name in NOT_YET_DOCUMENTED:
            continue
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_resume_command_keeps_every_flag_and_the_accelerate_launch():
    from trainer.cli import resume_command

    argv = ["train.py", "--config", "my run.toml", "--set", 'output_dir="out/a b"', "--resume",
            "step-3", "--overwrite", "--allow-change", "max_steps"]  # fmt: skip
    parent = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--num_processes", "2",
              "train.py", "--config", "my run.toml"]  # fmt: skip
    command = resume_command(argv, parent)
    _, launched = command.split(" && ", 1)
    assert shlex.split(launched) == [
        "/venv/bin/accelerate", "launch", "--num_processes", "2", "train.py",
        "--config", "my run.toml", "--set", 'output_dir="out/a b"',
        "--allow-change", "max_steps", "--resume", "latest",
    ]  # fmt: skip


def test_resume_command_of_a_direct_python_run_uses_this_python():
    from trainer.cli import resume_command

    command = resume_command(["train.py", "--config", "c.toml"], parent=["bash"])
    assert shlex.split(command.split(" && ", 1)[1]) == [
        sys.executable, "train.py", "--config", "c.toml", "--resume", "latest"
    ]  # fmt: skip
