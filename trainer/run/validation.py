"""A fixed-seed validation loss, so runs (e.g. LR schedules in a sweep) compare fairly.

Each held-out example is scored at ``validation.timesteps`` evenly spaced timesteps with noise
drawn from a seed fixed per example, so the number depends only on the weights: two runs, or
two points of one run, are compared on exactly the same noisy inputs. Images are center
cropped, never flipped, and captions are used as written. The loss at each of the fixed
timesteps is kept too (``val_loss_by_timestep``): high timesteps are mostly noise, where a
model learns layout and colour; low ones are nearly clean, where it learns fine detail, so
two schedules with the same mean can differ in where they help. The fixed-seed sample images are
drawn by ``trainer/report/samples.py``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer.data import images
from trainer.data.dataset import Example
from trainer.data.order import seed_for
from trainer.models import conditioning
from trainer.models.vae import posterior
from trainer.run import flow_matching, step

if TYPE_CHECKING:
    from diffusers.models import AutoencoderKL

    from trainer.report.image_scores import ImageScorer


@dataclass(frozen=True)
class Scored:
    """A validation pass: the mean loss, and the mean loss at each fixed timestep."""

    loss: float
    by_timestep: dict[int, float]

    def record(self) -> dict[str, Any]:
        """The metrics.jsonl keys: ``val_loss``, and ``val_loss_by_timestep`` keyed by the
        timestep as text (JSON object keys are strings)."""
        return {
            "val_loss": self.loss,
            "val_loss_by_timestep": {str(t): v for t, v in self.by_timestep.items()},
        }


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
        vae: AutoencoderKL,
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
        return self.evaluate(unet, text_encoder, noise_scheduler, device).loss

    def fixed_timesteps(self, noise_scheduler) -> list[int]:
        """The timesteps every example is scored at: the centres of ``timesteps`` equal
        slices of the noise scheduler's range."""
        steps = noise_scheduler.config.num_train_timesteps
        return [int((k + 0.5) * steps / self.timesteps) for k in range(self.timesteps)]

    @torch.no_grad()
    def evaluate(self, unet: torch.nn.Module, text_encoder, noise_scheduler, device) -> Scored:
        """The mean loss, and the mean loss at each fixed timestep (same arguments as
        :meth:`loss`). Each timestep scores every example once, so the mean over timesteps
        is the overall mean; the overall mean is summed as before, in the same order."""
        encoders = _as_list(text_encoder)
        if flow_matching.is_flow_matching(noise_scheduler):  # SD3: fixed σ, same noise
            conditioned = (
                (conditioning.condition(_on(text, device), encoders), mean, std, seeds)
                for text, mean, std, seeds in self.batches
            )
            loss, by_timestep = flow_matching.fixed_sigma_loss(
                unet, noise_scheduler, conditioned, self.timesteps, device
            )
            return Scored(loss, by_timestep)
        fixed = self.fixed_timesteps(noise_scheduler)
        total, count = 0.0, 0
        per_t = dict.fromkeys(fixed, 0.0)
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
                summed = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3)).sum().item()
                total += summed
                per_t[t] += summed
                count += len(seeds)
        examples = count // len(fixed)
        return Scored(total / count, {t: v / examples for t, v in per_t.items()})


def _on(text: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in text.items()}


def _by_size(chunk: Sequence[Example]) -> list[list[Example]]:
    groups: dict[tuple[int, int], list[Example]] = {}
    for e in chunk:
        groups.setdefault(e.size, []).append(e)
    return list(groups.values())


def load_scorer(config, device, held_out: Sequence[Example], message) -> ImageScorer | None:
    """The image scorer of ``validation.scores``, its models loaded once on ``device`` and
    the held-out images embedded; None (said in one line) when no score is configured.

    Args:
        config: The run config.
        device: The run's device.
        held_out: The held-out examples (the references of clip_i and dino).
        message: Where the one line goes (the tracker's ``message``).
    """
    from trainer.report import image_scores

    val = config.validation
    if not val.scores:
        if val.prompts or val.fraction or val.path:
            message("image scores: off (validation.scores = [] ; clip_t, clip_i, dino score "
                    "the samples)")  # fmt: skip
        return None
    start = time.monotonic()
    references = image_scores.load_images([e.path for e in held_out])
    scorer = image_scores.ImageScorer(
        val.scores, val.clip_model, val.dino_model, references, device
    )
    models = [m for s, m in (("clip", val.clip_model), ("dino", val.dino_model))
              if scorer.uses(s)]  # fmt: skip
    message(f"image scores: {', '.join(scorer.scores)} with {', '.join(models)} "
            f"({time.monotonic() - start:.1f} s to load)")  # fmt: skip
    return scorer


def score_samples(scorer: ImageScorer, folder: Path, prompts: Sequence[str]) -> dict[str, float]:
    """The image scores of one validation point's samples (the PNGs in ``folder``, in prompt
    order, as ``trainer/report/samples.py`` wrote them)."""
    from trainer.report import grids, image_scores

    paths = grids.images_by_prompt(folder)
    indices = [k for k in sorted(paths) if k < len(prompts)]
    images = image_scores.load_images([paths[k] for k in indices])
    return scorer.score(images, [prompts[k] for k in indices])
