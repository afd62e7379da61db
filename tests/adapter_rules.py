"""How the clients apply a kohya/LyCORIS module, written independently of the trainer.

Restated in our words from the clients' code: A1111 ``extensions-builtin/Lora``
(``network.py`` ``finalize_updown`` / ``apply_weight_decompose``, ``network_lora.py``,
``network_hada.py``, ``network_lokr.py``, ``lyco_helpers.py``) and ComfyUI
``comfy/weight_adapter`` (``base.py`` ``weight_decompose``, ``lora.py``, ``loha.py``,
``lokr.py``). Both agree on every formula used here:

- scale: ``alpha / dim`` where ``dim`` is the rank read from the tensors (``lora_down``'s rows;
  ``hada_w1_b``'s rows; LoKr: ``lokr_w1_b``'s or ``lokr_w2_b``'s rows, and **1** when both
  LoKr factors are full matrices, since no tensor holds a rank then);
- LoRA: ``ΔW = up · down``; LoHa: ``ΔW = (w1a · w1b) ⊙ (w2a · w2b)``, or with the Tucker
  cores ``t1``/``t2`` each factor ``einsum(t, a, b)``; LoKr: ``ΔW = kron(w1, w2)`` with each
  factor either full or ``a · b`` (``t2``: Tucker core); every ``ΔW`` reshaped to the weight;
- DoRA (a ``dora_scale`` beside a LoRA): ``W' = W + scale · ΔW``, then ``W' · dora_scale /
  ‖W'‖`` with the norm of each **input column** (over the output and kernel dimensions).
"""

from __future__ import annotations

import torch


def group_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {part: tensor}}``: A1111 splits each key at its first dot."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        modules.setdefault(name, {})[part] = value.float()
    return modules


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # core (r, r, k, k); a (r, out); b (r, in) -> (out, in, k, k)
    return torch.einsum("i j k l, i p, j r -> p r k l", core, a, b)


def _pair(w: dict, full: str, a: str, b: str, core: str | None = None) -> torch.Tensor:
    if full in w:
        return w[full]
    if core is not None and core in w:
        return _tucker(w[core], w[a], w[b])
    return w[a].reshape(w[a].shape[0], -1) @ w[b].reshape(w[b].shape[0], -1)


def delta_and_scale(w: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """The module's unscaled ``ΔW`` and the scale the clients apply to it."""
    alpha = float(w["alpha"]) if "alpha" in w else None
    if "lora_up.weight" in w:
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        dim = down.shape[0]
    elif "hada_w1_a" in w:
        first = _pair(w, "", "hada_w1_a", "hada_w1_b", "hada_t1")
        second = _pair(w, "", "hada_w2_a", "hada_w2_b", "hada_t2")
        delta, dim = first * second, w["hada_w1_b"].shape[0]
    else:
        w1 = _pair(w, "lokr_w1", "lokr_w1_a", "lokr_w1_b")
        w2 = _pair(w, "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2.contiguous())
        ranks = [w[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in w]
        dim = ranks[-1] if ranks else None
    scale = alpha / dim if alpha is not None and dim else 1.0
    return delta, scale


def merged_weight(w: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The weight a client computes for one layer from one module's tensors (strength 1)."""
    delta, scale = delta_and_scale(w)
    merged = weight.float() + scale * delta.reshape(weight.shape)
    if "dora_scale" in w:
        dims = [d for d in range(merged.dim()) if d != 1]
        norm = merged.pow(2).sum(dim=dims, keepdim=True).sqrt()
        # The clients divide as stored: a dora_scale of another shape would broadcast wrongly.
        assert w["dora_scale"].shape == norm.shape, (w["dora_scale"].shape, norm.shape)
        merged = merged * (w["dora_scale"] / norm)
    return merged
