"""DoRA with one magnitude per input column: the orientation A1111/Forge and ComfyUI apply.

DoRA (arXiv:2402.09353) writes an adapted weight as ``m · W' / ‖W'‖`` with
``W' = W + (alpha / r)·B·A``. Which norm ``‖W'‖`` means decides what a file holds:

- peft's ``use_dora`` takes it per **output row** (``‖W'[i, :]‖``, magnitude shape ``(out,)``);
- the DoRA paper's ``‖·‖_c`` and LyCORIS (``wd_on_out = False``, its default) take it per
  **input column** (``‖W'[:, j]‖``, over the output and kernel dimensions), and so do the
  clients that read kohya-style ``dora_scale`` tensors: A1111's ``network.py``
  ``apply_weight_decompose`` always does, and ComfyUI's ``weight_adapter/base.py``
  ``weight_decompose`` does for a ``dora_scale`` of shape ``(1, in, …)``. ComfyUI's branch for
  a per-output ``dora_scale`` divides by the *base* weight's norm instead, and A1111 would
  broadcast one wrongly, so a per-output DoRA cannot be exported for them.

:class:`InputAxisDora` replaces peft's DoRA module on each adapted layer after
``add_adapter(LoraConfig(use_dora=True))``: peft still owns the layer, its LoRA pair and the
magnitude parameter (same state-dict key, ``…lora_magnitude_vector``), but the magnitude is
the per-input norm, shaped ``(1, in)`` (``(1, in, 1, 1)`` for a convolution) exactly as the
kohya file's ``dora_scale``. As in peft and the paper (section 4.3), the norm is detached from
the gradient. peft's merge helpers assume the per-output shape; this trainer never merges.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import LoraLayer
from torch.nn.modules.conv import _ConvNd

from trainer.models.accessors import attribute

ADAPTER = "default"


class _Weighted(Protocol):
    """A layer with a weight: peft's LoRA ``A`` and ``B`` (a Linear or a convolution)."""

    @property
    def weight(self) -> torch.Tensor: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``B·A`` in the base weight's shape (a convolution's A holds the kernel)."""
    rank = lora_a.shape[0]
    return (lora_b.reshape(-1, rank) @ lora_a.reshape(rank, -1)).reshape(shape)


def input_norm(weight: torch.Tensor) -> torch.Tensor:
    """The norm of every input column: over all dimensions but 1, kept as size-1 dimensions."""
    dims = [d for d in range(weight.dim()) if d != 1]
    return torch.linalg.vector_norm(weight, dim=dims, keepdim=True)


class InputAxisDora(DoraLinearLayer):
    """peft's DoRA module with the weight norm taken per input column (see the module doc)."""

    def get_weight_norm(self, weight, lora_weight, scaling, adapter_name=None) -> torch.Tensor:
        """``‖W + scaling·ΔW‖`` per input column; peft calls it to initialise the magnitude."""
        return input_norm(weight + scaling * lora_weight.reshape(weight.shape)).to(weight.dtype)

    def forward(
        self,
        x: torch.Tensor,
        *,
        lora_A: _Weighted,
        lora_B: _Weighted,
        scaling: float,
        base_layer: torch.nn.Linear | _ConvNd,
        base_result: torch.Tensor | None = None,
        adapter_name: str = ADAPTER,
    ) -> torch.Tensor:
        """What to add to the base layer's output so the layer computes ``W''·x``.

        ``W'' = W'·c`` with ``c = m / ‖W'‖`` per input column, so ``W''x = W'(c ⊙ x)`` and the
        extra output is ``W((c - 1) ⊙ x) + scaling·B(A(c ⊙ x))``. ``x`` arrives after the LoRA
        dropout when there is one (peft then passes no ``base_result``, as for its own DoRA).
        """
        weight = base_layer.weight.to(x.dtype)
        lora_weight = delta_weight(lora_A.weight, lora_B.weight, weight.shape).to(x.dtype)
        norm = input_norm(weight + scaling * lora_weight.detach()).detach()
        column_scale = self.weight.to(x.dtype) / norm
        if weight.dim() == 2:
            column_scale = column_scale.reshape(-1)  # broadcasts over x's last dimension
            base_extra = F.linear(x * (column_scale - 1), weight)
        else:
            assert isinstance(base_layer, _ConvNd)  # a 3+-d weight is a convolution's
            column_scale = column_scale.reshape(1, -1, *[1] * (weight.dim() - 2))
            base_extra = self._conv(x * (column_scale - 1), weight, base_layer)
        return base_extra + lora_B(lora_A(x * column_scale)) * scaling

    @staticmethod
    def _conv(x: torch.Tensor, weight: torch.Tensor, layer: _ConvNd) -> torch.Tensor:
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
        return conv(
            x,
            weight,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
        )

    def __repr__(self) -> str:
        return "sdlora.dora.input_axis." + super().__repr__()


def use_input_axis(model: torch.nn.Module) -> int:
    """Swap peft's DoRA module for :class:`InputAxisDora` on every adapted layer of ``model``.

    Called right after ``add_adapter``, while ``B`` is still zero: the magnitude then starts
    as the base weight's per-input norm, so the adapted model starts equal to the base one.

    Returns:
        The number of layers changed.
    """
    count = 0
    for module in model.modules():
        vectors = getattr(module, "lora_magnitude_vector", None)
        if not isinstance(vectors, torch.nn.ModuleDict) or ADAPTER not in vectors:
            continue
        # Only peft's LoRA layers hold a `lora_magnitude_vector`; the check types `module`.
        if not isinstance(module, LoraLayer):
            continue
        old = _weight(vectors[ADAPTER])
        new = InputAxisDora(fan_in_fan_out=False)
        new.update_layer(
            base_layer=module.get_base_layer(),
            lora_A=_weight(module.lora_A[ADAPTER]),
            lora_B=_weight(module.lora_B[ADAPTER]),
            scaling=module.scaling[ADAPTER],
        )
        new.weight.requires_grad_(old.requires_grad)
        vectors[ADAPTER] = new.to(old.device)
        count += 1
    return count


def _weight(layer: torch.nn.Module) -> torch.Tensor:
    return attribute(layer, "weight", torch.Tensor)
