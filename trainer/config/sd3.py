"""SD3's part of the run config: the flow-matching table, SD3's rules, its default targets.

SD3 is trained by flow matching (Esser et al., 2024, "Scaling Rectified Flow Transformers"),
as diffusers' ``train_dreambooth_lora_sd3.py`` does it: the noisy latent is
``(1 − σ)·x₀ + σ·ε``, the target ``ε − x₀``, σ read from the scheduler's (shifted) table at
a position drawn from a density, and the squared error optionally weighted by σ. The
``[flow_matching]`` table holds those choices with that script's defaults. Every rule that
depends on the family is checked before any model loads: here when ``model.arch`` names the
family, by preflight (``trainer/run/preflight.py``) once ``model.arch = "auto"`` is resolved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

from typedtables import doc

# The diffusers script's defaults (logit_normal, mean 0, std 1; mode_scale 1.29).
DENSITIES = ("logit_normal", "mode", "uniform")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
# The longest T5 sequence StableDiffusion3Pipeline accepts (its check_inputs).
T5_MAX_TOKENS = 512
# diffusers' SD3 LoRA targets (train_dreambooth_lora_sd3.py: the joint attention's image and
# text projections). Named without ``attn.`` so that 3.5 Medium's second self-attention
# (``attn2.to_q/k/v``, ``attn2.to_out.0``) is adapted too: its blocks have both.
SD3_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)  # fmt: skip
FLOW = "sd3"  # the families trained by flow matching


@dataclass(frozen=True)
class FlowMatchingConfig:
    """[flow_matching]: SD3's objective (ignored by no family: SD 1.x/2.x/SDXL refuse it)."""

    timestep_density: Literal["logit_normal", "mode", "uniform"] = doc(
        "Where σ is drawn: 'logit_normal' (sigmoid of a normal: SD3's choice), 'mode' (the "
        "SD3 paper's mode sampling, mode_scale) or 'uniform'",
        "logit_normal",
    )
    logit_mean: float = doc("logit_normal: mean of the normal before the sigmoid", 0.0)
    logit_std: float = doc("logit_normal: standard deviation of that normal (> 0)", 1.0)
    mode_scale: float = doc("mode: the scale s of mode sampling (the paper's default 1.29)", 1.29)
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = doc(
        "Weight of each example's squared error: 'none', 'sigma_sqrt' (σ⁻²) or 'cosmap' "
        "(2 / (π(1 − 2σ + 2σ²)))",
        "none",
    )
    shift: float = doc(
        "Shift of the σ table (σ' = sσ / (1 + (s − 1)σ)); 0 = the model's scheduler's (3.0 for "
        "SD 3.5)",
        0.0,
    )

    def problems(self, where: str) -> list[str]:
        """Checks of this table alone."""
        p = []
        if not (self.logit_std > 0 and math.isfinite(self.logit_std)):
            p.append(f"{where}.logit_std: {self.logit_std} must be > 0")
        for key in ("logit_mean", "mode_scale", "shift"):
            if not math.isfinite(getattr(self, key)):
                p.append(f"{where}.{key}: must be a finite number")
        if self.shift < 0:
            p.append(f"{where}.shift: {self.shift} must be > 0, or 0 for the model's own")
        return p

    def changed(self) -> list[str]:
        """The keys set away from their defaults."""
        return [f.name for f in fields(self) if getattr(self, f.name) != f.default]


def family_problems(config: Any, architecture: str) -> list[str]:
    """The keys that do not fit the family: SD3's objective and text settings on SD 1.x/2.x/
    SDXL, and the ε/v-prediction settings on SD3.

    Args:
        config: The ``RunConfig``.
        architecture: ``sd1``, ``sd2``, ``sdxl`` or ``sd3`` (``auto`` checks nothing).
    """
    if architecture == "auto":
        return []
    model, train = config.model, config.train
    if architecture != FLOW:
        sd3_only = [f"flow_matching.{k}" for k in config.flow_matching.changed()]
        defaults = {f.name: f.default for f in fields(type(model))}
        sd3_only += [
            f"model.{k}" for k in ("t5", "t5_max_length") if getattr(model, k) != defaults[k]
        ]
        return [
            f"{key}: applies only to SD3 (flow matching), and the model is {architecture}; "
            "remove it"
            for key in sd3_only
        ]
    p = []
    if train.snr_gamma:
        p.append(
            "train.snr_gamma: Min-SNR-γ weights the ε/v loss by the DDPM schedule's "
            "signal-to-noise ratio, which SD3 (flow matching) does not have; set it to 0 and "
            "weight by σ with flow_matching.loss_weighting ('sigma_sqrt' or 'cosmap')"
        )
    if model.prediction_type:
        p.append(
            f"model.prediction_type: {model.prediction_type!r}, but SD3 predicts the flow "
            "ε − x₀ (flow matching), neither ε nor v; remove the key"
        )
    return p


def lora_targets(lora: Any, architecture: str) -> tuple[str, ...]:
    """``lora.target_modules``, or SD3's default targets when the key is left at the UNet
    default on an SD3 model (the SD 1.x/SDXL default names only the image attention)."""
    from trainer.config.schema import LoraConfig

    default: Any = next(f.default for f in fields(LoraConfig) if f.name == "target_modules")
    if architecture == FLOW and tuple(lora.target_modules) == tuple(default):
        return SD3_TARGETS
    return tuple(lora.target_modules)


def resolved_lora(lora: Any, architecture: str) -> Any:
    """The ``[lora]`` table with :func:`lora_targets` in place (what the adapters get)."""
    import dataclasses

    targets = lora_targets(lora, architecture)
    if targets == tuple(lora.target_modules):
        return lora
    return dataclasses.replace(lora, target_modules=targets)
