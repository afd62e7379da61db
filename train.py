"""``accelerate launch train.py --config lora.toml [--set table.key=value ...]``

A thin launcher for ``sdlora train``: all the work is in ``trainer/run/loop.py``.
``accelerate launch train.py lr-find --config ...`` runs ``sdlora lr-find`` on every process.
"""

import sys

from trainer.commands.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args if args[:1] == ["lr-find"] else ["train", *args]))
