"""The loss options: which timesteps are drawn, the per-element loss, and the weights that turn
it into one number per batch. The names and formulas are kohya's (``train_util.py``,
``custom_train_functions.py``), where kohya has the option, and the SD3 paper's for the
timestep densities (as diffusers' ``compute_density_for_timestep_sampling``).

- ``train.timestep_sampling``: ``uniform`` (every timestep equally likely), ``logit_normal``
  (``t = T·sigmoid(logit_mean + logit_std·n)``, n standard normal) or ``mode``
  (``u ↦ 1 − u − mode_scale·(cos²(πu/2) − 1 + u)``, u uniform), one draw per example from its
  own seeded generator.
- ``train.loss``: ``mse``; ``huber`` and ``smooth_l1``, kohya's pseudo-Huber forms
  ``2c(√(d² + c²) − c)`` and ``2(√(d² + c²) − c)`` (quadratic near 0, linear far out), whose
  ``c`` follows ``train.huber_schedule``: ``constant`` (``huber_c``), ``exponential``
  (``huber_c^(t/T)``: 1 at t = 0 down to ``huber_c`` at t = T) or ``snr``
  (``(1 − huber_c)/(1 + σ_t)² + huber_c`` with ``σ_t = √((1 − ᾱ_t)/ᾱ_t)``).
- Weights per example, multiplied: Min-SNR-γ, ``train.debiased_estimation`` (kohya's
  ``1/√SNR``, or ``1/(SNR + 1)`` for v-prediction, SNR capped at 1000), and the example's own
  loss weight (a subset's ``loss_weight``, regularisation images' prior loss weight).
- The batch loss is the mean over examples of each example's weighted mean over its latent
  (over the kept part of it, with a mask: ``trainer/data/masks.py``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from trainer.config.load import ConfigError

if TYPE_CHECKING:
    from trainer.config.schema import TrainConfig
    from trainer.run.step import ExampleRandom

# kohya caps the SNR at 1000 in its debiased weights: SNR(t = 0) is large and 1/√SNR tiny.
DEBIASED_SNR_CAP = 1000.0


@dataclass(frozen=True)
class LossOptions:
    """What decides the loss of a batch besides the model: ``[train]``'s loss keys."""

    noise_offset: float = 0.0
    snr_gamma: float = 0.0
    loss: str = "mse"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    debiased_estimation: bool = False

    @classmethod
    def of(cls, train: TrainConfig) -> LossOptions:
        """The options ``[train]`` sets."""
        return cls(**{k: getattr(train, k) for k in cls.__dataclass_fields__})


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) at each timestep, in fp32."""
    a = alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    return a / (1.0 - a)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al., 2023), for an MSE against ε or against v.

    For ε-prediction the weight is min(SNR, γ) / SNR; for v-prediction the MSE on v already
    carries a factor (SNR + 1), so the weight is min(SNR, γ) / (SNR + 1).
    """
    clipped = torch.clamp(snr_t, max=gamma)
    return clipped / (snr_t + 1.0) if prediction_type == "v_prediction" else clipped / snr_t


def debiased_weights(snr_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """kohya's debiased estimation weights: 1/√SNR (ε), 1/(SNR + 1) (v), SNR capped at 1000."""
    capped = torch.clamp(snr_t, max=DEBIASED_SNR_CAP)
    return 1.0 / (capped + 1.0) if prediction_type == "v_prediction" else capped.rsqrt()


def sample_timesteps(rand: ExampleRandom, count: int, options: LossOptions) -> torch.Tensor:
    """One timestep in [0, count) per example, drawn by ``options.timestep_sampling``."""
    if options.timestep_sampling == "uniform":
        return rand.randint(count)
    if options.timestep_sampling == "logit_normal":
        u = torch.sigmoid(options.logit_mean + options.logit_std * rand.randn(()))
    else:  # "mode": the SD3 paper's mode-centred density, by inverting a uniform draw
        u = rand.rand(())
        u = 1 - u - options.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    # u in (0, 1) maps to whole timesteps; fp32 rounding may reach 1.0, which is kept inside.
    return (u * count).long().clamp(0, count - 1)


def huber_thresholds(
    timesteps: torch.Tensor, noise_scheduler: Any, options: LossOptions
) -> torch.Tensor:
    """The ``c`` of each example's (smooth-L1 / pseudo-)Huber loss, by ``huber_schedule``."""
    c = options.huber_c
    if options.huber_schedule == "constant":
        return torch.full(timesteps.shape, c, device=timesteps.device)
    if options.huber_schedule == "exponential":
        steps = noise_scheduler.config.num_train_timesteps
        return torch.exp(math.log(c) * timesteps.float() / steps)
    alpha_bar = noise_scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    sigma = ((1.0 - alpha_bar) / alpha_bar).sqrt()  # inf at zero terminal SNR: c → huber_c
    return (1.0 - c) / (1.0 + sigma) ** 2 + c


def elementwise(
    prediction: torch.Tensor, target: torch.Tensor, options: LossOptions, c: torch.Tensor | None
) -> torch.Tensor:
    """The loss at every latent element, (B, C, h, w), in fp32."""
    prediction, target = prediction.float(), target.float()
    if options.loss == "mse":
        return F.mse_loss(prediction, target, reduction="none")
    assert c is not None
    c = c.view(-1, *([1] * (prediction.ndim - 1)))
    root = torch.sqrt((prediction - target) ** 2 + c**2) - c
    return 2 * c * root if options.loss == "huber" else 2 * root


def example_weights(
    timesteps: torch.Tensor, noise_scheduler: Any, options: LossOptions
) -> torch.Tensor | None:
    """The per-example weights of Min-SNR-γ and debiased estimation (None: all 1)."""
    if not (options.snr_gamma or options.debiased_estimation):
        return None
    kind = noise_scheduler.config.prediction_type
    snr_t = snr(noise_scheduler.alphas_cumprod, timesteps)
    weights = torch.ones_like(snr_t)
    if options.snr_gamma:
        weights = weights * min_snr_weights(snr_t, options.snr_gamma, kind)
    if options.debiased_estimation:
        weights = weights * debiased_weights(snr_t, kind)
    return weights


def masked_mean(per_element: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Each example's mean loss over its latent, the elements weighted by ``mask`` (broadcast
    over channels): ``Σ m·l / Σ m``, so an all-ones mask is exactly the plain mean and a
    half mask the mean over that half. An example masked out entirely contributes 0."""
    dims = tuple(range(1, per_element.ndim))
    if mask is None:
        return per_element.mean(dim=dims)
    mask = mask.to(per_element.device, per_element.dtype)
    if mask.shape[-2:] != per_element.shape[-2:]:  # e.g. a latent a VAE made of another size
        mask = F.interpolate(mask, size=per_element.shape[-2:], mode="area")
    mask = mask.expand_as(per_element)
    kept = mask.mean(dim=dims)
    weighted = (per_element * mask).mean(dim=dims)
    return torch.where(kept > 0, weighted / kept.clamp_min(torch.finfo(kept.dtype).tiny), 0.0)


def batch_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler: Any,
    options: LossOptions,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The batch's loss: each example's mean over its latent (over the masked part of it),
    weighted, then the batch mean.

    Args:
        prediction: The UNet's output.
        target: What it should have predicted (ε or v).
        timesteps: Each example's timestep.
        noise_scheduler: The training noise scheduler (its ᾱ and prediction type).
        options: The loss options.
        weights: Each example's own loss weight (None: 1).
        mask: Each example's loss mask at the latent's size, (B, 1, h, w) in [0, 1]
            (``trainer/data/masks.py``); None: unmasked.
    """
    c = huber_thresholds(timesteps, noise_scheduler, options) if options.loss != "mse" else None
    per_element = elementwise(prediction, target, options, c)
    per_example = masked_mean(per_element, mask)
    schedule_weights = example_weights(timesteps, noise_scheduler, options)
    if schedule_weights is not None:
        per_example = per_example * schedule_weights
    if weights is not None:
        per_example = per_example * weights.to(per_example.device, per_example.dtype)
    return per_example.mean()


# ---------------------------------------------------------------- zero terminal SNR


def zero_snr_problems(config: Any) -> list[str]:
    """``train.zero_terminal_snr`` against the prediction type a local diffusers model's
    scheduler config names, found before the model loads (an explicit
    ``model.prediction_type`` is checked with the config; a single file, when it loads)."""
    if not config.train.zero_terminal_snr or config.model.prediction_type:
        return []
    path = Path(config.model.pretrained).expanduser() / "scheduler" / "scheduler_config.json"
    try:
        scheduler = json.loads(path.read_text())
        kind = scheduler.get("prediction_type", "epsilon")
    except (OSError, ValueError, AttributeError):
        return []  # not a local diffusers folder: checked once the model is loaded
    if str(scheduler.get("_class_name", "")).startswith("FlowMatch"):
        return []  # SD3: refused as a family rule (trainer/config/sd3.py)
    return [] if kind == "v_prediction" else [zero_snr_refusal(kind, str(path))]


def zero_snr_refusal(kind: str, where: str) -> str:
    """Why zero terminal SNR cannot train a model that predicts ``kind``."""
    return (
        f"train.zero_terminal_snr: the model predicts {kind!r} ({where}), and at zero SNR the "
        "last timestep's input is pure noise, so ε says nothing about the image; set "
        'model.prediction_type = "v_prediction" (and train long enough to adapt the model), '
        "or turn zero_terminal_snr off"
    )


def training_noise_scheduler(noise_scheduler: Any, train: TrainConfig) -> Any:
    """The noise scheduler training uses: the model's, with its betas rescaled to zero
    terminal SNR when ``train.zero_terminal_snr`` is on (diffusers' ``rescale_betas_zero_snr``,
    the same rescaling as kohya's ``fix_noise_scheduler_betas_for_zero_terminal_snr``).

    Raises:
        ConfigError: zero terminal SNR with an ε-predicting model.
    """
    if not train.zero_terminal_snr:
        return noise_scheduler
    kind = noise_scheduler.config.prediction_type
    if kind != "v_prediction":
        raise ConfigError([zero_snr_refusal(kind, "its scheduler config")])
    return type(noise_scheduler).from_config(noise_scheduler.config, rescale_betas_zero_snr=True)
