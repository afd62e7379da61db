"""The command line itself: ``--version``, help text on every flag, the resume command, and
the documented launcher (``python -m trainer.commands.launch``) under a bad config and Ctrl-C."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import tomllib

from trainer.commands import cli
from trainer.commands.cli import build_parser, main, package_version
from trainer.report.tracking import read_metrics

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
    from trainer.commands.cli import resume_command

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
    from trainer.commands.cli import resume_command

    command = resume_command(["train.py", "--config", "c.toml"], parent=["bash"])
    assert shlex.split(command.split(" && ", 1)[1]) == [
        sys.executable, "train.py", "--config", "c.toml", "--resume", "latest"
    ]  # fmt: skip


def test_resume_command_repeats_the_launch_module_and_its_flags():
    """``sdlora launch`` (the documented launcher), its module form and accelerate's are
    launchers too: the resume command starts the run the same way."""
    from trainer.commands.cli import resume_command

    argv = ["train.py", "--config", "c.toml", "--set", "train.max_steps=9"]
    parent = ["/v/bin/python", "/v/bin/sdlora", "launch", "--num_processes", "2", "train.py"]
    command = resume_command(argv, parent)
    assert shlex.split(command.split(" && ", 1)[1]) == [
        "/v/bin/sdlora", "launch", "--num_processes", "2", "train.py",
        "--config", "c.toml", "--set", "train.max_steps=9", "--resume", "latest",
    ]  # fmt: skip
    for module in ("trainer.commands.launch", "accelerate.commands.launch"):
        parent = ["python", "-m", module, "--multi_gpu", "--num_processes", "2", "train.py",
                  "--config", "c.toml"]  # fmt: skip
        command = resume_command(argv, parent)
        assert shlex.split(command.split(" && ", 1)[1]) == [
            sys.executable, "-m", module, "--multi_gpu", "--num_processes", "2", "train.py",
            "--config", "c.toml", "--set", "train.max_steps=9", "--resume", "latest",
        ]  # fmt: skip


def launch_flags(processes: int) -> list[str]:
    """``accelerate launch`` flags for ``processes`` CPU processes, every setting explicit (as
    in tests/test_distributed.py), so no user accelerate config is read."""
    if processes > 1:  # MULTI_GPU over gloo on a machine without CUDA (docker/accelerate/)
        flags = ["--config_file", str(REPO / "docker" / "accelerate" / "cpu2.yaml")]
        flags += ["--num_processes", str(processes), "--main_process_port", "0"]
    else:
        flags = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no"]
        flags += ["--dynamo_backend", "no"]
    return [*flags, "--num_cpu_threads_per_process", "1"]


def launch_env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_config_error_under_the_documented_launcher_ends_with_our_line_alone(processes):
    """Under ``accelerate launch`` a bad key printed our error, then accelerate's
    CalledProcessError (one process) or torch elastic's ChildFailedError (two) traceback."""
    sdlora = str(Path(sys.executable).with_name("sdlora"))  # the documented console script
    cmd = [sdlora, "launch", *launch_flags(processes), "train.py"]
    cmd += ["--config", "configs/tiny.toml", "--set", "train.max_stpes=3"]
    done = subprocess.run(
        cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-3000:]  # our status, not accelerate's 1
    assert done.stderr.count("error: 1 problem(s) in configs/tiny.toml") == 1  # not per process
    assert "train.max_stpes: unknown key; did you mean 'max_steps'?" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "Error:" not in done.stderr  # no CalledProcessError / ChildFailedError summary


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_ctrl_c_under_the_launcher_saves_and_its_resume_command_finishes_the_run(
    processes, tiny_model, tiny_data, tmp_path
):
    """Ctrl-C (SIGINT to the terminal's process group) stops the run with a checkpoint, the
    resume command and status 130, with no KeyboardInterrupt / SignalException traceback;
    the printed command, run as is, relaunches the same way and finishes the run."""
    out = tmp_path / "out"
    sets = [f'model.pretrained="{tiny_model}"', f'data.path="{tiny_data}"', f'output_dir="{out}"']
    sets += ["train.max_steps=60", "checkpoint.every_n_steps=2", 'logging.tracker="none"']
    cmd = [sys.executable, "-m", "trainer.commands.launch", *launch_flags(processes), "train.py"]
    cmd += ["--config", "configs/tiny.toml", *(x for s in sets for x in ("--set", s))]
    # Its own session, so the SIGINT below reaches the launcher and what shares its terminal
    # group, as a Ctrl-C does, and nothing of pytest's.
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "checkpoints" / "step-000002").is_dir():
            os.killpg(proc.pid, signal.SIGINT)
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=240)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal landed (machine too fast)")
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    printed = stdout.split("resume with:\n", 1)[1].splitlines()[0].strip()
    launcher = [
        sys.executable,
        "-m",
        "trainer.commands.launch",
        *launch_flags(processes),
        "train.py",
    ]
    assert shlex.split(printed.split(" && ", 1)[1])[: len(launcher)] == launcher
    done = subprocess.run(
        printed, shell=True, env=launch_env(), capture_output=True, text=True, cwd="/",
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_metrics(out)[-1]["step"] == 60


def test_documented_launch_commands_use_the_launcher_without_tracebacks():
    """Every command line in the README, docs/ and the Makefile starts training through
    ``sdlora launch``, the launcher the tests above run, not ``accelerate launch``."""
    docs = sorted((REPO / "docs").glob("*.md"))
    found = []
    for path in [REPO / "README.md", REPO / "Makefile", *docs]:
        block = path.suffix != ".md"  # the Makefile is all commands
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                block = not block
            elif re.search(
                r"(^|\s|/)accelerate launch\s" if block else r"`accelerate launch\s", line
            ):
                found.append(f"{path.name}:{number}: {line.strip()}")
    assert found == []


@pytest.mark.parametrize(
    "raised, status, said",
    [
        (subprocess.CalledProcessError(2, ["train.py"]), 2, ""),
        (subprocess.CalledProcessError(-9, ["train.py"]), 137, "train.py was killed by SIGKILL"),
        ({1: -15, 0: 2}, 2, ""),  # rank 0 failed; the agent then stopped rank 1
        ({0: -9, 1: -9}, 137, "train.py (rank 0) was killed by SIGKILL"),
        (KeyboardInterrupt(), 130, ""),
    ],
    ids=["one-exit-2", "one-killed", "two-exit-2", "two-killed", "ctrl-c-no-child"],
)
def test_the_launcher_exits_with_the_failed_process_status(
    raised, status, said, monkeypatch, capsys
):
    """What accelerate raises for a failed run becomes that run's exit status, with a line only
    where no training process could say anything itself (killed by a signal)."""
    import accelerate.commands.launch as accelerate_launch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from trainer.commands import launch

    if isinstance(raised, dict):
        failures = {r: ProcessFailure(r, 100 + r, code, "<N/A>") for r, code in raised.items()}
        raised = ChildFailedError("train.py", failures)

    def fail(args):
        raise raised

    def no_child(pid, options):
        raise ChildProcessError  # pytest's own children are not the launcher's to reap

    monkeypatch.setattr(accelerate_launch, "launch_command", fail)
    monkeypatch.setattr(launch.os, "waitpid", no_child)
    assert launch.main(["--num_processes", "1", "train.py", "--config", "c.toml"]) == status
    assert capsys.readouterr().err.strip() == (f"error: {said}" if said else "")
