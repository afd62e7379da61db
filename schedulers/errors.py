"""The errors the LR schedule package raises, each with a message a user can act on."""

from __future__ import annotations

from typedtables import ConfigError
from typedtables.registry import RegistryError, UnknownNameError

# The one config error type of the project: a schedule's problems are config problems, and a
# caller assembling a whole config collects them with every other table's.
ScheduleConfigError = ConfigError
SOURCE = "the LR schedule"


# A failed lookup (a KeyError whose str() is the message, naming what exists and the closest
# name), and a schedule that cannot be registered or loaded: the shared registry's errors.
UnknownScheduleError = UnknownNameError
ScheduleRegistryError = RegistryError
