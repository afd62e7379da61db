"""The ``sdlora`` command line: one entry point, one subcommand per job.

    sdlora train --config FILE [--set table.key=value ...]
    sdlora config-help

``train.py`` at the repository root is the ``accelerate launch`` target for ``sdlora train``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

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
    sub.add_parser("config-help", help="print every config table and key with its doc")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    """Load the config and run training."""
    from trainer import config, loop

    cfg = config.load(args.config, args.overrides)
    result = loop.run(cfg)
    print(f"done: {result.updates} updates; LoRA weights in {result.output_dir}")
    return 0


def cmd_config_help(args: argparse.Namespace) -> int:
    """Print the config reference."""
    from trainer import config

    print(config.describe())
    return 0


COMMANDS = {"train": cmd_train, "config-help": cmd_config_help}


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; a bad config or dataset prints its problems and exits with 2."""
    from trainer.data import DataError
    from trainer.models import ModelLoadError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
