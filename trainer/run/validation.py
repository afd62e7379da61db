"""A fixed-seed validation loss, so runs (e.g. LR schedules in a sweep) compare fairly.

Each held-out example is scored at ``validation.timesteps`` evenly spaced timesteps with noise
drawn from a seed fixed per example, so the number depends only on the weights: two runs, or
two points of one run, are compared on exactly the same noisy inputs. Images are center
cropped, never flipped, and captions are used as written. The fixed-seed sample images are
drawn by ``trainer/report/samples.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trainer.data import images
from trainer.data.dataset import Example
from trainer.data.order import seed_for
from trainer.models import conditioning
from trainer.models.vae import posterior
from trainer.run import flow_matching, step


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class Validator:
    """Scores the current adapters on the held-out examples.

    The held-out images are encoded once, at construction (the VAE is frozen), so scoring
    needs only the text encoders and the UNet. Their conditioning is built by the function
    training uses (``conditioning.condition``), SDXL's time ids from each center crop.

    Args:
        examples: The held-out examples.
        tokenizer: The tokenizer, or SDXL's two in order (then time ids are scored too).
        vae: The frozen VAE.
        timesteps: Fixed timesteps per example.
        seed: The run seed (the noise is seeded per example from it).
        batch_size: Examples per forward pass.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer,
        vae: torch.nn.Module,
        timesteps: int,
        seed: int,
        batch_size: int,
    ) -> None:
        self.timesteps = timesteps
        self.batches = []
        tokenizers = _as_list(tokenizer)
        device, dtype = vae.device, vae.dtype
        for start in range(0, len(examples), batch_size):
            for group in _by_size(examples[start : start + batch_size]):
                loaded = [images.load_example(e.path, e.size, True, False, None) for e in group]
                pixels = torch.stack([p for p, _ in loaded])
                with torch.no_grad():
                    mean, std = posterior(vae, pixels.to(device, dtype))
                ids = conditioning.tokenize(tokenizers, [e.caption for e in group])
                text = {"input_ids": ids[0]} | {
                    f"input_ids_{n}": t for n, t in enumerate(ids[1:], 2)
                }
                if len(tokenizers) > 1:
                    text["time_ids"] = torch.tensor([g.time_ids() for _, g in loaded]).float()
                seeds = [seed_for(seed, "val", str(e.path)) for e in group]
                self.batches.append((text, mean.float().cpu(), std.float().cpu(), seeds))

    @torch.no_grad()
    def loss(self, unet: torch.nn.Module, text_encoder, noise_scheduler, device) -> float:
        """Mean loss over examples × fixed timesteps (plain MSE against the training target).

        Args:
            unet: The unwrapped UNet with adapters (no DDP collectives inside).
            text_encoder: The (unwrapped) text encoder, or SDXL's two in order.
            noise_scheduler: The training noise scheduler.
            device: Where the models are.
        """
        encoders = _as_list(text_encoder)
        if flow_matching.is_flow_matching(noise_scheduler):  # SD3: fixed σ, same noise
            conditioned = (
                (conditioning.condition(_on(text, device), encoders), mean, std, seeds)
                for text, mean, std, seeds in self.batches
            )
            return flow_matching.fixed_sigma_loss(
                unet, noise_scheduler, conditioned, self.timesteps, device
            )
        steps = noise_scheduler.config.num_train_timesteps
        fixed = [int((k + 0.5) * steps / self.timesteps) for k in range(self.timesteps)]
        total, count = 0.0, 0
        for text, mean, std, seeds in self.batches:
            cond = conditioning.condition({k: v.to(device) for k, v in text.items()}, encoders)
            rand = step.ExampleRandom(seeds, device)
            latents = step.sample_latents(mean.to(device), std.to(device), rand)
            noise = rand.randn(latents.shape[1:])
            for t in fixed:
                timesteps = torch.full((len(seeds),), t, device=device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                target = step.training_target(noise_scheduler, latents, noise, timesteps)
                pred = unet(noisy, timesteps, **cond.unet_kwargs(), return_dict=False)[0]
                total += (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3)).sum().item()
                count += len(seeds)
        return total / count


def _on(text: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in text.items()}


def _by_size(chunk: Sequence[Example]) -> list[list[Example]]:
    groups: dict[tuple[int, int], list[Example]] = {}
    for e in chunk:
        groups.setdefault(e.size, []).append(e)
    return list(groups.values())
