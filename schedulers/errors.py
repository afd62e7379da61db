"""The errors the LR schedule package raises, each with a message a user can act on."""

from __future__ import annotations

from collections.abc import Sequence

from typedtables import ConfigError

# The one config error type of the project: a schedule's problems are config problems, and a
# caller assembling a whole config collects them with every other table's.
ScheduleConfigError = ConfigError
SOURCE = "the LR schedule"


class UnknownScheduleError(KeyError):
    """No LR schedule is registered under the name asked for.

    It is a ``KeyError`` (a failed lookup) whose ``str()`` is the plain message, not its repr.

    Attributes:
        name: The name that was asked for.
        available: The names that exist.
        suggestion: The closest existing name, or ``None``.
    """

    def __init__(self, name: str, available: Sequence[str], suggestion: str | None) -> None:
        self.name = name
        self.available = list(available)
        self.suggestion = suggestion
        super().__init__(name)

    def __reduce__(self) -> tuple:
        # Rebuild from all three arguments, so the error survives pickling across processes.
        return type(self), (self.name, self.available, self.suggestion)

    def __str__(self) -> str:
        hint = f"; did you mean {self.suggestion!r}?" if self.suggestion else ""
        return (
            f"unknown LR schedule {self.name!r}{hint} Available: {', '.join(self.available)} "
            '(or a plug-in class written as "package.module:ClassName")'
        )


class ScheduleRegistryError(ValueError):
    """A schedule cannot be registered or loaded: a duplicate name or a broken plug-in."""
