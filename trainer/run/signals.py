"""SIGTERM/SIGINT handling: finish the update, save, stop (a second signal stops at once)."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeAlias

log = logging.getLogger("sdlora")

# What signal.signal returns: the handler it replaced.
_Handler: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each optimizer update."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[signal.Signals, _Handler] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.requested:  # a second signal: the user insists, stop now
            raise KeyboardInterrupt
        self.requested = True
        log.warning("got signal %d: finishing this update, saving, then stopping", signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
