"""The errors a user can fix: the command line prints them as one ``error: ...`` line and exits
with status 2, with no traceback.

Each package raises its own subclass (``DataError``, ``ModelLoadError``, ``CheckpointError``...)
beside the code that finds the problem; this base lets the command line catch them all without
importing those packages, so ``sdlora --help`` need not load torch. Config problems are
``typedtables.ConfigError``, caught beside it.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input or environment, with a message that says how to fix it."""
