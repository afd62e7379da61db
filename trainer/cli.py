"""The ``sdlora`` command line: one entry point, one subcommand per job.

    sdlora train --config FILE [--set table.key=value ...] [--resume latest|PATH]
    sdlora config-help

``train.py`` at the repository root is the ``accelerate launch`` target for ``sdlora train``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from trainer.config import ConfigError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="TOML config file, e.g. configs/tiny.toml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="override one config key (TOML value); repeatable, e.g. --set train.max_steps=50",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="sdlora", description="Stable Diffusion LoRA trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train LoRA adapters from a TOML config")
    _add_config_args(train)
    train.add_argument(
        "--resume",
        metavar="latest|PATH",
        help="resume from the newest checkpoint in output_dir, or from a step-NNNNNN folder "
        "(same as checkpoint.resume)",
    )
    train.add_argument(
        "--allow-change",
        metavar="KEYS",
        help="comma-separated config keys or tables that may differ from the checkpoint's, "
        "e.g. max_steps,lr_scheduler (same as checkpoint.allow_change)",
    )
    sub.add_parser("config-help", help="print every config table and key with its doc")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    """Load the config and run training."""
    from trainer import config, loop

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={json.dumps(args.resume)}")
    if args.allow_change:
        keys = [k.strip() for k in args.allow_change.split(",") if k.strip()]
        overrides.append(f"checkpoint.allow_change={json.dumps(keys)}")
    cfg = config.load(args.config, overrides)
    result = loop.run(cfg)
    if not result.is_main_process:
        return 130 if result.interrupted else 0
    if result.interrupted:
        command = " ".join(shlex.quote(a) for a in [*_launcher(), "--config", args.config])
        print(f"stopped after {result.updates} updates; resume with:\n  {command} --resume latest")
        return 130
    print(f"done: {result.updates} updates; LoRA weights in {result.output_dir}")
    return 0


def _launcher() -> list[str]:
    """How this process was started, for the resume hint (train.py or the sdlora script)."""
    script = Path(sys.argv[0]).name
    return ["accelerate", "launch", "train.py"] if script == "train.py" else ["sdlora", "train"]


def cmd_config_help(args: argparse.Namespace) -> int:
    """Print the config reference."""
    from trainer import config

    print(config.describe())
    return 0


COMMANDS = {"train": cmd_train, "config-help": cmd_config_help}


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; a bad config or dataset prints its problems and exits with 2."""
    from trainer.checkpoint import CheckpointError
    from trainer.data import DataError
    from trainer.models import ModelLoadError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, ModelLoadError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
