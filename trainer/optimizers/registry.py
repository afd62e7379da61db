"""Find optimizers by name: built-ins, entry-point plug-ins and ``"package.module:Class"`` paths.

- Built-ins register themselves with ``@register("adamw")`` when ``optimizers`` is imported.
- Third-party packages declare an entry point in the group ``sdlora.optimizers``
  (``my_opt = "my_pkg.optim:MyOptimizer"`` under
  ``[project.entry-points."sdlora.optimizers"]`` in their ``pyproject.toml``).
- Any importable optimizer table can be named by its path, ``name = "my_pkg.optim:MyOptimizer"``.

The mechanism is :class:`typedtables.registry.Registry`; this module holds the optimizers' one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from trainer.optimizers.base import OptimizerSpec
from typedtables.registry import Registry, RegistryError, UnknownNameError

ENTRY_POINT_GROUP = "sdlora.optimizers"

SpecT = TypeVar("SpecT", bound=type[OptimizerSpec])


def _implements_create(cls: type[OptimizerSpec], what: str) -> None:
    if cls.create is OptimizerSpec.create:
        raise RegistryError(f"{what}: {cls.__qualname__} does not implement create()")


REGISTRY: Registry[type[OptimizerSpec]] = Registry(
    "optimizer", OptimizerSpec, ENTRY_POINT_GROUP, _implements_create
)
OptimizerRegistryError = RegistryError
UnknownOptimizerError = UnknownNameError


def register(name: str) -> Callable[[SpecT], SpecT]:
    """Class decorator registering an optimizer table under ``name`` (``[optimizer] name``)."""
    add = REGISTRY.register(name)

    def decorate(cls: SpecT) -> SpecT:
        add(cls)  # checks and registers it; returning `cls` here keeps its own type
        return cls

    return decorate


def get(name: str) -> type[OptimizerSpec]:
    """The optimizer class for a name or a ``"package.module:Class"`` path.

    Raises:
        UnknownOptimizerError: No optimizer has that name (the message suggests the closest).
        OptimizerRegistryError: A plug-in or path failed to load, or two plug-ins clash.
    """
    return REGISTRY.get(name)


def available() -> list[str]:
    """Every optimizer name: built-ins, registered plug-ins and entry points, sorted."""
    return REGISTRY.available()
