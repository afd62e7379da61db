"""The loss options against independent implementations on a fixed batch.

Each reference below is written apart from ``trainer/run/loss.py``: the noise and timesteps
are drawn from each example's own generator as a user of diffusers would draw them
(``compute_density_for_timestep_sampling``), the noisy latents by the forward-process formula,
and the losses and weights by their formulas as kohya and the papers write them.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr

from trainer.config import load as config
from trainer.models.conditioning import Conditioning
from trainer.run import loss as losses
from trainer.run import step
from trainer.run.loss import LossOptions

SEEDS = [11, 12, 13]
SHAPE = (4, 8, 8)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    latents = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(1))
    return unet, latents, hidden


def scheduler(kind: str = "epsilon", **kw) -> DDPMScheduler:
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=kind, **kw,
    )  # fmt: skip


def ours(tiny, noise_scheduler, options: LossOptions) -> float:
    unet, latents, hidden = tiny
    with torch.no_grad():
        return step.diffusion_loss(
            unet, noise_scheduler, latents, Conditioning(hidden), step.ExampleRandom(SEEDS),
            options,
        ).item()  # fmt: skip


def reference(tiny, noise_scheduler, scheme: str = "uniform", **density):
    """Per example: its noise, its timestep, the target and the UNet's prediction, drawn and
    computed without ``trainer/run``."""
    unet, latents, hidden = tiny
    count = noise_scheduler.config.num_train_timesteps
    noise, timesteps = [], []
    for seed in SEEDS:
        g = torch.Generator().manual_seed(seed)
        noise.append(torch.randn(SHAPE, generator=g))
        if scheme == "uniform":
            timesteps.append(int(torch.randint(0, count, (1,), generator=g)))
        else:
            u = compute_density_for_timestep_sampling(scheme, 1, generator=g, **density)
            timesteps.append(min(int(u * count), count - 1))
    eps, t = torch.stack(noise), torch.tensor(timesteps)
    a = noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * eps
    target = eps if noise_scheduler.config.prediction_type == "epsilon" else (
        a.sqrt() * eps - (1 - a).sqrt() * latents
    )  # fmt: skip
    with torch.no_grad():
        prediction = unet(noisy, t, encoder_hidden_states=hidden).sample
    return prediction, target, t


@pytest.mark.parametrize("kind", ["huber", "smooth_l1"])
@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_losses_equal_the_pseudo_huber_formula(tiny, kind, schedule):
    noise_scheduler, c0 = scheduler(), 0.2
    options = LossOptions(loss=kind, huber_c=c0, huber_schedule=schedule)
    prediction, target, t = reference(tiny, noise_scheduler)
    a = noise_scheduler.alphas_cumprod[t].double()
    c = {
        "constant": torch.full_like(a, c0),
        "exponential": c0 ** (t.double() / 1000),
        "snr": (1 - c0) / (1 + ((1 - a) / a).sqrt()) ** 2 + c0,
    }[schedule].view(-1, 1, 1, 1)
    d = (prediction - target).double()
    # δ²(√(1 + (d/δ)²) − 1), the textbook pseudo-Huber: kohya's forms are 2× it (huber), and
    # 2/c × it (smooth_l1).
    pseudo = c**2 * (torch.sqrt(1 + (d / c) ** 2) - 1)
    elementwise = 2 * pseudo if kind == "huber" else 2 * pseudo / c
    expected = elementwise.mean(dim=(1, 2, 3)).mean().item()
    assert ours(tiny, noise_scheduler, options) == pytest.approx(expected, rel=1e-5)


def test_huber_with_a_large_c_is_the_mse_and_smooth_l1_with_a_small_c_is_twice_l1():
    prediction = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3))
    target = torch.zeros_like(prediction)
    big, small = torch.full((2,), 100.0), torch.full((2,), 1e-4)
    huber = losses.elementwise(prediction, target, LossOptions(loss="huber"), big)
    # d² − d⁴/(4c²) + ...; fp32 rounds √(d² + c²) to about 1e-5 at c = 100.
    torch.testing.assert_close(huber, prediction**2, rtol=1e-2, atol=5e-3)
    smooth = losses.elementwise(prediction, target, LossOptions(loss="smooth_l1"), small)
    torch.testing.assert_close(smooth, 2 * prediction.abs(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("scheme", "density"),
    [
        ("logit_normal", {"logit_mean": 0.3, "logit_std": 0.8}),
        ("mode", {"mode_scale": 1.29}),
    ],
)
def test_timestep_densities_draw_what_diffusers_draws(tiny, scheme, density):
    noise_scheduler = scheduler()
    options = LossOptions(timestep_sampling=scheme, **density)
    _, _, expected = reference(tiny, noise_scheduler, scheme, **density)
    rand = step.ExampleRandom(SEEDS)
    step.sample_noise(tiny[1], rand)  # the noise is drawn first from each generator
    got = losses.sample_timesteps(rand, 1000, options)
    assert got.tolist() == expected.tolist()


def test_logit_normal_loss_equals_the_mse_at_diffusers_timesteps(tiny):
    noise_scheduler = scheduler()
    density = {"logit_mean": -0.5, "logit_std": 1.2}
    options = LossOptions(timestep_sampling="logit_normal", **density)
    prediction, target, _ = reference(tiny, noise_scheduler, "logit_normal", **density)
    expected = ((prediction - target) ** 2).mean().item()
    assert ours(tiny, noise_scheduler, options) == pytest.approx(expected, rel=1e-5)


def test_logit_normal_draws_mid_range_timesteps_more_often():
    rand = step.ExampleRandom(range(4000))
    t = losses.sample_timesteps(rand, 1000, LossOptions(timestep_sampling="logit_normal"))
    middle = ((t >= 250) & (t < 750)).float().mean().item()
    # sigmoid(n) in [0.25, 0.75) ⟺ |n| < ln 3 ≈ 1.0986: P = 0.7280 for a standard normal.
    assert middle == pytest.approx(math.erf(math.log(3) / math.sqrt(2)), abs=0.03)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_debiased_estimation_weights_each_example_by_its_snr(tiny, kind):
    noise_scheduler = scheduler(kind)
    prediction, target, t = reference(tiny, noise_scheduler)
    snr = torch.minimum(compute_snr(noise_scheduler, t), torch.tensor(1000.0))
    weight = 1 / (snr + 1) if kind == "v_prediction" else 1 / torch.sqrt(snr)
    per_example = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    expected = (per_example * weight).mean().item()
    got = ours(tiny, noise_scheduler, LossOptions(debiased_estimation=True))
    assert got == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- zero terminal SNR


def kohya_zero_terminal_betas(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2023), Algorithm 1, as kohya's fix_noise_scheduler_betas... applies it."""
    root = (1 - betas).cumprod(0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    alpha_bar = root**2
    return 1 - torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])


def test_zero_terminal_snr_rescales_the_betas_as_the_paper_does():
    train = config.TrainConfig(zero_terminal_snr=True)
    rescaled = losses.training_noise_scheduler(scheduler("v_prediction"), train)
    expected = kohya_zero_terminal_betas(scheduler().betas.double())
    # diffusers rescales in fp32: ᾱ is close to the float64 reference, betas (ratios of
    # neighbouring ᾱ) to fp32's cancellation.
    torch.testing.assert_close(
        rescaled.alphas_cumprod.double(), (1 - expected).cumprod(0), rtol=1e-5, atol=1e-7
    )
    torch.testing.assert_close(rescaled.betas.double(), expected, rtol=1e-3, atol=1e-5)
    assert rescaled.alphas_cumprod[-1] == 0
    assert compute_snr(rescaled, torch.tensor([999])).item() == 0


def test_zero_terminal_snr_losses_stay_finite_at_the_last_timestep(tiny):
    train = config.TrainConfig(zero_terminal_snr=True)
    noise_scheduler = losses.training_noise_scheduler(scheduler("v_prediction"), train)
    t = torch.tensor([999, 0, 500])
    options = LossOptions(snr_gamma=5.0, debiased_estimation=True, loss="huber")
    weights = losses.example_weights(t, noise_scheduler, options)
    assert torch.isfinite(weights).all() and weights[0] == 0
    assert torch.isfinite(losses.huber_thresholds(t, noise_scheduler, options)).all()


def test_zero_terminal_snr_refuses_an_epsilon_model(tmp_path, tiny_model):
    base = {"model": {"pretrained": str(tiny_model)}, "data": {"path": "d"}, "output_dir": "o"}
    with pytest.raises(config.ConfigError, match=r"train\.zero_terminal_snr: needs v-prediction"):
        config.build(
            {**base, "model": {"pretrained": "m", "prediction_type": "epsilon"},
             "train": {"zero_terminal_snr": True}}
        )  # fmt: skip
    # The model's own scheduler config says epsilon: found before the model loads.
    cfg = config.build({**base, "train": {"zero_terminal_snr": True}})
    (problem,) = losses.zero_snr_problems(cfg)
    assert "scheduler_config.json" in problem and "v_prediction" in problem
    with pytest.raises(config.ConfigError, match="predicts 'epsilon'"):
        losses.training_noise_scheduler(scheduler(), cfg.train)
    saved = json.loads((tiny_model / "scheduler" / "scheduler_config.json").read_text())
    assert saved.get("prediction_type", "epsilon") == "epsilon"


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        ({"huber_c": 0.0, "loss": "huber"}, "train.huber_c: 0.0 must be in (0, 1]"),
        ({"huber_c": 0.3}, "train.huber_c: applies only to train.loss = 'huber' or 'smooth_l1'"),
        ({"logit_std": 2.0}, "train.logit_std: applies only to train.timestep_sampling"),
        ({"mode_scale": 3.0, "timestep_sampling": "mode"}, "train.mode_scale: 3.0 must be in"),
        ({"loss": "l2"}, 'train.loss: "l2" is not one of "mse" | "huber" | "smooth_l1"'),
    ],
)
def test_loss_keys_are_checked_before_any_model_loads(train, expected):
    data = {"model": {"pretrained": "m"}, "data": {"path": "d"}, "train": train}
    with pytest.raises(config.ConfigError) as err:
        config.build(data)
    assert any(expected in p for p in err.value.problems), err.value.problems


# ---------------------------------------------------------------- a run


LOSS_RUN = (
    "train.max_steps=3",
    "train.batch_size=2",
    "train.gradient_accumulation_steps=1",
    'model.prediction_type="v_prediction"',
    'train.loss="smooth_l1"',
    'train.huber_schedule="exponential"',
    'train.timestep_sampling="mode"',
    "train.debiased_estimation=true",
    "train.zero_terminal_snr=true",
    "train.snr_gamma=5.0",
    'lora.save_dtype="fp32"',
    "checkpoint.every_n_steps=2",
)


def test_a_run_with_the_loss_options_resumes_bitwise_and_records_them(make_config, tmp_path):
    from safetensors.torch import load_file

    from trainer.lora.files import WEIGHTS_NAME, read_header
    from trainer.report.tracking import read_metrics
    from trainer.run import checkpoint as ckpt
    from trainer.run import loop

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    loop.run(make_config(*LOSS_RUN, output=whole))
    start = f'checkpoint.resume="{ckpt.step_dir(whole, 2)}"'
    loop.run(make_config(*LOSS_RUN, start, output=resumed))
    a, b = load_file(whole / WEIGHTS_NAME), load_file(resumed / WEIGHTS_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(math.isfinite(r["loss"]) for r in read_metrics(whole))
    (kohya_file,) = [p for p in whole.glob("*.safetensors") if p.name != WEIGHTS_NAME]
    header = read_header(kohya_file).metadata
    assert {k: header[k] for k in header if k.startswith(("ss_loss", "ss_huber", "ss_weight"))} == {
        "ss_loss_type": "smooth_l1",
        "ss_huber_schedule": "exponential",
        "ss_huber_c": "0.1",
        "ss_weighting_scheme": "mode",
    }
    assert header["ss_mode_scale"] == "1.29"
    assert header["ss_debiased_estimation"] == header["ss_zero_terminal_snr"] == "True"


def test_samples_of_a_zero_terminal_snr_run_start_at_the_pure_noise_timestep():
    from diffusers import DDIMScheduler

    from trainer.report.samples import make_sampler

    train = config.TrainConfig(zero_terminal_snr=True)
    rescaled = losses.training_noise_scheduler(scheduler("v_prediction"), train)
    ddim = make_sampler(rescaled.config, DDIMScheduler)
    ddim.set_timesteps(4)
    assert ddim.config.rescale_betas_zero_snr and ddim.timesteps[0] == 999
    plain = make_sampler(scheduler().config, DDIMScheduler)
    plain.set_timesteps(4)
    assert plain.timesteps[0] < 999  # "leading" spacing, as before
