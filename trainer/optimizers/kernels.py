"""Which torch kernel runs a torch optimizer's update: ``impl`` of ``adamw`` and ``sgd``.

- ``"fused"``: one kernel for every tensor (CUDA, and CPU since torch 2.4);
- ``"foreach"``: the per-tensor updates batched into a few multi-tensor kernels;
- ``"default"``: whatever torch picks (foreach on CUDA, a plain loop on CPU);
- ``"auto"``: fused where this torch offers it for the device, else torch's pick.

The kernels compute the same update up to float rounding, so a run (and its resume) is
bitwise reproducible for any one choice, not across choices.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

Impl = Literal["auto", "default", "foreach", "fused"]
IMPL_DOC = (
    "Update kernel: 'auto' = fused where the device supports it, else torch's pick; 'fused', "
    "'foreach', or 'default' (torch's pick)"
)


def build(cls: type, impl: Impl, groups: list[dict[str, Any]], **kwargs: Any) -> Any:
    """``cls(groups, **kwargs)`` with the kernel ``impl`` asks for."""
    if impl == "auto":
        device = groups[0]["params"][0].device
        impl = "fused" if fused_error(cls, device) is None else "default"
    flag = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    return cls(groups, **kwargs, **flag)


@functools.cache  # one probe per optimizer class and device in a process
def fused_error(cls: type, device: torch.device) -> str | None:
    """Why this torch has no fused ``cls`` for ``device`` (None: it has one).

    torch checks the device at the first step, not at construction, so this takes one step
    on a one-element probe.
    """
    import torch

    probe = torch.zeros(1, device=device, requires_grad=True)
    probe.grad = torch.zeros_like(probe)
    try:
        cls([probe], lr=1e-3, fused=True).step()
    except RuntimeError as err:
        return str(err).splitlines()[0]
    return None


def device_problems(cls: type, impl: Impl, device: torch.device, where: str) -> list[str]:
    """An explicit ``impl = "fused"`` the device does not offer is an error, not a fallback."""
    error = fused_error(cls, device) if impl == "fused" else None
    if error is None:
        return []
    import torch

    return [
        f"{where}.impl: 'fused' {cls.__name__} is not available on {device.type} with torch "
        f"{torch.__version__} ({error}); use 'auto' or 'foreach'"
    ]
