"""Typed access to what torch's stubs cannot see on a module.

Libraries set plain attributes on modules at run time (peft's ``peft_config`` and ``lora_A``,
transformers' and diffusers' ``config``); torch's stubs type every attribute they do not
declare as ``Tensor | Module``. :func:`attribute` reads one and checks its type, so the code
after it is typed by what the attribute really is. :func:`move` is ``module.to(...)`` for any
module: torch's overloads of ``Module.to`` leave out its ``memory_format`` keyword, and
diffusers wraps its models' ``to`` in ``functools.wraps``, which mypy reads as a function that
still needs ``self`` (python/mypy#17166).
"""

from __future__ import annotations

from typing import TypeVar

import torch

A = TypeVar("A")


def attribute(module: torch.nn.Module, name: str, kind: type[A]) -> A:
    """``module.<name>``, which must be a ``kind``.

    Raises:
        AttributeError: ``module`` has no such attribute.
        TypeError: It is not a ``kind``.
    """
    value = getattr(module, name)
    if not isinstance(value, kind):
        raise TypeError(
            f"{type(module).__name__}.{name} is a {type(value).__name__}, not a {kind.__name__}"
        )
    return value


def move(
    module: torch.nn.Module,
    *args: torch.device | str | torch.dtype,
    **kwargs: torch.device | str | torch.dtype | torch.memory_format,
) -> None:
    """``module.to(*args, **kwargs)``: a module moves and casts itself in place."""
    # torch accepts every argument typed above; its overloads of Module.to omit memory_format.
    module.to(*args, **kwargs)  # type: ignore[call-overload]  # see the comment above
