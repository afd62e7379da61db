"""The loss pieces against closed forms and against diffusers' own helpers."""

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from trainer.models.conditioning import Conditioning
from trainer.run import step
from trainer.run.loss import LossOptions


@pytest.fixture
def noise_scheduler():
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_snr_matches_diffusers(noise_scheduler):
    t = torch.tensor([0, 1, 10, 500, 999])
    torch.testing.assert_close(
        step.snr(noise_scheduler.alphas_cumprod, t), compute_snr(noise_scheduler, t)
    )


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weights_closed_form(kind):
    snr = torch.tensor([0.01, 1.0, 5.0, 20.0, 1000.0], dtype=torch.float64)
    gamma = 5.0
    expected = [min(s, gamma) / (s + 1 if kind == "v_prediction" else s) for s in snr.tolist()]
    got = step.min_snr_weights(snr, gamma, kind)
    assert got.tolist() == pytest.approx(expected, rel=1e-12)


def test_v_target_is_sqrt_alpha_noise_minus_sqrt_one_minus_alpha_x0(noise_scheduler):
    noise_scheduler.register_to_config(prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([3, 400, 990])
    a = noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(step.training_target(noise_scheduler, x0, eps, t), expected)


def test_epsilon_target_is_the_noise(noise_scheduler):
    eps = torch.randn(2, 4, 8, 8)
    assert step.training_target(noise_scheduler, torch.zeros_like(eps), eps, None) is eps


def test_unknown_prediction_type_is_a_clear_error(noise_scheduler):
    noise_scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(ValueError, match=r"model\.prediction_type"):
        step.training_target(noise_scheduler, torch.zeros(1), torch.zeros(1), None)


def test_noise_offset_adds_a_per_channel_constant():
    latents = torch.zeros(2, 4, 8, 8)
    plain = step.sample_noise(latents, step.ExampleRandom([1, 2]))
    offset = step.sample_noise(latents, step.ExampleRandom([1, 2]), noise_offset=0.1)
    shift = offset - plain
    # Identical first draw, then a constant per (sample, channel) of scale 0.1 · N(0, 1).
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift))
    for i, seed in enumerate([1, 2]):
        g = torch.Generator().manual_seed(seed)
        torch.randn((4, 8, 8), generator=g)
        expected = 0.1 * torch.randn((4, 1, 1), generator=g)
        torch.testing.assert_close(shift[i, :, :1, :1], expected)


def test_each_example_draws_from_its_own_seed_whatever_the_batch():
    """Splitting a batch across processes or micro-batches gives every example the same draws."""
    whole = step.ExampleRandom([11, 22, 33, 44])
    halves = [step.ExampleRandom([11, 22]), step.ExampleRandom([33, 44])]
    assert torch.equal(whole.randn((4, 8, 8)), torch.cat([h.randn((4, 8, 8)) for h in halves]))
    assert torch.equal(whole.randint(1000), torch.cat([h.randint(1000) for h in halves]))


def test_sample_latents_matches_diffusers_posterior_sampling():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    params = torch.randn(1, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    dist = DiagonalGaussianDistribution(params)
    ours = step.sample_latents(dist.mean, dist.std, step.ExampleRandom([5]))
    theirs = dist.sample(torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, theirs)


def test_diffusion_loss_is_reproducible_from_the_seeds(tiny_model):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))

    def loss(seed: int, gamma: float = 0.0):
        rand = step.ExampleRandom([seed, seed + 1])
        with torch.no_grad():
            return step.diffusion_loss(
                unet, noise_scheduler, latents, Conditioning(hidden), rand,
                LossOptions(snr_gamma=gamma),
            )  # fmt: skip

    assert torch.equal(loss(7), loss(7))
    assert not torch.equal(loss(7), loss(9))
    assert torch.isfinite(loss(7, gamma=5.0))
