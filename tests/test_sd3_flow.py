"""SD3's flow-matching objective against diffusers' own definition of it.

The reference is diffusers' ``train_dreambooth_lora_sd3.py`` step, rebuilt here from the
library functions it calls: ``compute_density_for_timestep_sampling`` for u (with the same
per-example generators, in the same order as our draws), the scheduler's own ``timesteps``
and ``sigmas`` (looked up by timestep as the script's ``get_sigmas`` does), and
``compute_loss_weighting_for_sd3``; the noisy latent is checked against the scheduler's
``scale_noise``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from trainer.config.load import ConfigError
from trainer.config.sd3 import FlowMatchingConfig
from trainer.models.conditioning import Conditioning
from trainer.run import flow_matching, step

SEEDS = [11, 12, 13]


@pytest.fixture(scope="module")
def transformer(tiny_sd3) -> SD3Transformer2DModel:
    return SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer").eval()


@pytest.fixture(scope="module")
def scheduler(tiny_sd3) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3, subfolder="scheduler")


def batch(transformer) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """A fixed batch: posterior mean and std of 16-channel latents, and text conditioning."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(len(SEEDS), 16, 8, 8, generator=g)
    std = torch.rand(len(SEEDS), 16, 8, 8, generator=g) * 0.1
    config = transformer.config
    hidden = torch.randn(len(SEEDS), 20, config.joint_attention_dim, generator=g)
    pooled = torch.randn(len(SEEDS), config.pooled_projection_dim, generator=g)
    return mean, std, Conditioning(hidden, pooled)


def reference_loss(transformer, scheduler, mean, std, cond, config: FlowMatchingConfig):
    """diffusers' SD3 LoRA step (no preconditioning: the target is noise − x₀)."""
    if config.shift:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            scheduler.config, shift=config.shift
        )
    latents, noise, u = [], [], []
    for seed, m, s in zip(SEEDS, mean, std, strict=True):
        g = torch.Generator().manual_seed(seed)
        latents.append(m + s * torch.randn(m.shape, generator=g))  # latent_dist.sample()
        noise.append(torch.randn(m.shape, generator=g))
        u.append(
            compute_density_for_timestep_sampling(
                weighting_scheme=config.timestep_density,
                batch_size=1,
                logit_mean=config.logit_mean,
                logit_std=config.logit_std,
                mode_scale=config.mode_scale,
                generator=g,
            )
        )
    latents, noise, u = torch.stack(latents), torch.stack(noise), torch.cat(u)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    steps = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]  # get_sigmas
    sigmas = scheduler.sigmas[steps].flatten().reshape(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    pred = transformer(
        hidden_states=noisy,
        timestep=timesteps,
        encoder_hidden_states=cond.hidden,
        pooled_projections=cond.text_embeds,
        return_dict=False,
    )[0]
    weighting = compute_loss_weighting_for_sd3(
        weighting_scheme=config.loss_weighting, sigmas=sigmas
    )
    target = noise - latents
    loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(3, -1), 1)
    return loss.mean(), (latents, noise, timesteps)


def ours(transformer, scheduler, mean, std, cond, config, noise_offset=0.0):
    rand = step.ExampleRandom(SEEDS)
    latents = step.sample_latents(mean, std, rand)  # as loop.encode_latents does
    return flow_matching.flow_matching_loss(
        transformer, scheduler, latents, cond, rand, config, noise_offset
    )


CONFIGS = {
    "defaults": FlowMatchingConfig(),
    "logit_normal shifted": FlowMatchingConfig(logit_mean=0.5, logit_std=0.8, shift=1.5),
    "mode cosmap": FlowMatchingConfig(timestep_density="mode", loss_weighting="cosmap"),
    "uniform sigma_sqrt": FlowMatchingConfig(
        timestep_density="uniform", loss_weighting="sigma_sqrt"
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_loss_is_diffusers_sd3_loss_with_the_same_generators(name, transformer, scheduler):
    config = CONFIGS[name]
    mean, std, cond = batch(transformer)
    with torch.no_grad():
        expected, _ = reference_loss(transformer, scheduler, mean, std, cond, config)
        got = ours(transformer, scheduler, mean, std, cond, config)
    assert torch.equal(got, expected), (got, expected)


class Recorder(torch.nn.Module):
    """A transformer stand-in that records its inputs and predicts zero."""

    def forward(self, hidden_states, timestep, **kwargs):
        self.noisy, self.timestep = hidden_states, timestep
        return (torch.zeros_like(hidden_states),)


def test_the_noisy_latent_is_the_schedulers_scale_noise_and_the_target_the_velocity(
    transformer, scheduler
):
    mean, std, cond = batch(transformer)
    config = FlowMatchingConfig(loss_weighting="cosmap")
    recorder = Recorder()
    loss = ours(recorder, scheduler, mean, std, cond, config)
    _, (latents, noise, timesteps) = reference_loss(transformer, scheduler, mean, std, cond, config)
    assert torch.equal(recorder.timestep, timesteps)
    sampler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    torch.testing.assert_close(recorder.noisy, sampler.scale_noise(latents, timesteps, noise))
    # A zero prediction's loss is the weighted mean square of the target, noise − x₀.
    sigmas = sampler.sigmas[[(sampler.timesteps == t).nonzero().item() for t in timesteps]]
    weights = 2 / (torch.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    per_example = ((noise - latents) ** 2).reshape(3, -1).mean(1)
    torch.testing.assert_close(loss, (weights * per_example).mean())


def test_the_shift_moves_sigma_up_the_table(transformer, scheduler):
    """The same draws at a larger shift land at larger σ (σ' = sσ / (1 + (s − 1)σ))."""
    mean, std, cond = batch(transformer)
    seen = []
    for shift in (1.0, 6.0):
        recorder = Recorder()
        ours(recorder, scheduler, mean, std, cond, FlowMatchingConfig(shift=shift))
        seen.append(recorder.timestep)
    low, high = seen
    assert (high > low).all()
    s, sigma = 6.0, low / 1000
    torch.testing.assert_close(high / 1000, s * sigma / (1 + (s - 1) * sigma), atol=1e-3, rtol=0)


def test_noise_offset_draws_after_the_noise_and_before_sigma(transformer, scheduler):
    """With an offset the σ draw comes from the same generators, one draw later: resume and
    the split across processes stay exact, and the noise itself is unchanged but offset."""
    mean, std, cond = batch(transformer)
    plain, offset = Recorder(), Recorder()
    ours(plain, scheduler, mean, std, cond, FlowMatchingConfig())
    ours(offset, scheduler, mean, std, cond, FlowMatchingConfig(), noise_offset=0.1)
    assert not torch.equal(plain.timestep, offset.timestep)


def test_validation_scores_fixed_sigmas_of_the_models_own_table(transformer, scheduler):
    """The same σ and noise whatever the run's [flow_matching] table: runs compare fairly."""
    mean, std, cond = batch(transformer)
    batches = [(cond, mean, std, SEEDS)]
    with torch.no_grad():
        loss, _ = flow_matching.fixed_sigma_loss(transformer, scheduler, batches, 4, "cpu")
        rand = step.ExampleRandom(SEEDS)
        latents = step.sample_latents(mean, std, rand)
        noise = rand.randn(latents.shape[1:])
        sampler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        total = 0.0
        for k in range(4):  # positions 1/8, 3/8, 5/8, 7/8 of the 1000-entry table
            t = sampler.timesteps[int((k + 0.5) * 1000 / 4)].repeat(3)
            noisy = sampler.scale_noise(latents, t, noise)
            pred = transformer(
                hidden_states=noisy,
                timestep=t,
                encoder_hidden_states=cond.hidden,
                pooled_projections=cond.text_embeds,
            ).sample
            total += ((pred - (noise - latents)) ** 2).reshape(3, -1).mean(1).sum().item()
    assert loss == pytest.approx(total / 12, rel=1e-6)


def test_flow_matching_keys_are_checked(tiny_config, tmp_path):
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, "flow_matching.logit_std=0.0", "flow_matching.shift=-1.0")
    assert sorted(p.split(":")[0] for p in err.value.problems) == [
        "flow_matching.logit_std",
        "flow_matching.shift",
    ]
    assert dataclasses.asdict(FlowMatchingConfig()) == {
        "timestep_density": "logit_normal",
        "logit_mean": 0.0,
        "logit_std": 1.0,
        "mode_scale": 1.29,
        "loss_weighting": "none",
        "shift": 0.0,
    }


def test_a_position_of_one_reads_the_last_entry_of_the_table(scheduler):
    """Mode sampling turns a uniform draw of 0 into u = 1: the last σ, not an index error."""
    sigmas, timesteps = flow_matching.table_position(scheduler, torch.tensor([1.0, 0.0]))
    assert sigmas.tolist() == [scheduler.sigmas[-1].item(), scheduler.sigmas[0].item()]
    assert timesteps.tolist() == [scheduler.timesteps[-1].item(), scheduler.timesteps[0].item()]
    mode = FlowMatchingConfig(timestep_density="mode")
    u = 1 - torch.zeros(1) - mode.mode_scale * (torch.cos(torch.zeros(1)) ** 2 - 1)
    assert u.item() == 1.0
