"""``accelerate launch train.py --config lora.toml [--set table.key=value ...]``

A thin launcher for ``sdlora train``: all the work is in ``trainer/run/loop.py``.
"""

import sys

from trainer.commands.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
