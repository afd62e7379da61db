"""Every optimizer in the real loop on the tiny model: it trains, every param group's LR follows
the schedule, a resumed run ends bitwise where the uninterrupted one did, and a schedule-free
optimizer saves (and validates with) the weights it means to be evaluated.

References are other runs and the optimizers' own documented formulas, never our code.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import without_clock
from safetensors.torch import load_file

from trainer import optimizers
from trainer.lora import adapters as lora
from trainer.lora.files import WEIGHTS_NAME
from trainer.optimizers.modes import TRAIN_WEIGHTS
from trainer.report.tracking import read_metrics
from trainer.run import checkpoint as ckpt
from trainer.run import loop

# Sixteen-odd short runs of the loop: end to end, like the other slow tests.
pytestmark = pytest.mark.slow

# UNet and text encoder trained (two param groups), accumulation, random crops, flips and LoRA
# dropout; checkpoints at update 2 and 4 of 4.
COMMON = (
    "train.max_steps=4",
    "train.batch_size=2",
    "train.gradient_accumulation_steps=2",
    "lora.train_text_encoder=true",
    "lora.dropout=0.1",
    'lora.save_dtype="fp32"',
    "data.center_crop=false",
    "data.random_flip=true",
    "checkpoint.every_n_steps=2",
)
DECAY = ('lr_scheduler={name = "linear", warmup_steps = 1}',)
TWO_LRS = ("train.learning_rate=1e-3", "train.text_encoder_lr=4e-4")
# Per optimizer: its table and the base LRs and schedule it is meant to run with.
SETUPS = {
    "adamw": ('optimizer={name = "adamw", text_encoder_weight_decay = 0.0}', *TWO_LRS, *DECAY),
    "adamw8bit": ('optimizer={name = "adamw8bit", min_8bit_size = 0}', *TWO_LRS, *DECAY),
    "prodigy": (
        'optimizer={name = "prodigy"}',
        "train.learning_rate=1.0",
        'lr_scheduler={name = "cosine", warmup_steps = 1}',
    ),
    "schedule_free_adamw": (
        'optimizer={name = "schedule_free_adamw"}',
        *TWO_LRS,
        'lr_scheduler={name = "constant_with_warmup", warmup_steps = 1}',
    ),
    "adafactor": ('optimizer={name = "adafactor"}', *TWO_LRS, *DECAY),
    "lion": ('optimizer={name = "lion", weight_decay = 0.1}', *TWO_LRS, *DECAY),
    "came": ('optimizer={name = "came"}', *TWO_LRS, *DECAY),
    "sgd": ('optimizer={name = "sgd", momentum = 0.9}', "train.learning_rate=1e-2", *DECAY),
}


def test_every_builtin_has_a_setup():
    assert sorted(SETUPS) == optimizers.available()


@pytest.fixture(scope="module", params=sorted(SETUPS))
def reference(request, tiny_config, tmp_path_factory):
    """The uninterrupted run of each optimizer."""
    name = request.param
    cfg = tiny_config(tmp_path_factory.mktemp(name), *COMMON, *SETUPS[name])
    problems = cfg.optimizer.device_problems(torch.device("cpu"))
    if problems:
        pytest.skip(f"{name} cannot run on this CPU: {problems}")
    result = loop.run(cfg)
    return name, cfg, result


def lora_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS_NAME)


def test_each_optimizer_trains_both_param_groups(reference):
    name, _, result = reference
    records = read_metrics(result.output_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in records)
    saved = lora_weights(result.output_dir)
    for prefix in ("unet.", "text_encoder."):
        ups = [v for k, v in saved.items() if k.startswith(prefix) and "lora_B" in k]
        assert ups and all(v.abs().sum() > 0 for v in ups), f"{name}: {prefix} lora_B never moved"


def test_each_groups_lr_follows_the_schedule_exactly(reference):
    _, cfg, result = reference
    base_lrs = cfg.base_lrs()
    assert len(base_lrs) == 2
    for record in read_metrics(result.output_dir):
        assert record["lr"] == cfg.lr_scheduler.lrs(record["step"] - 1, 4, base_lrs)


def test_resume_is_bitwise_exact(reference, make_config, tmp_path):
    name, _, result = reference
    out = tmp_path / "resumed"
    start = ckpt.step_dir(result.output_dir, 2)
    loop.run(make_config(*COMMON, *SETUPS[name], f'checkpoint.resume="{start}"', output=out))
    mine, theirs = lora_weights(out), lora_weights(result.output_dir)
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), f"{name}: {key} differs after resume"
    # The clock (time, elapsed) differs between two runs; everything else must not.
    assert without_clock(read_metrics(out)) == without_clock(read_metrics(result.output_dir))[2:]


def test_prodigy_logs_its_step_size_d_times_lr(reference):
    name, _, result = reference
    records = read_metrics(result.output_dir)
    if name != "prodigy":
        assert all("effective_lr" not in r for r in records)
        return
    assert all(len(r["effective_lr"]) == 2 for r in records)
    # Update 3 starts from the d and k in the step-2 checkpoint: prodigyopt steps with
    # d · lr · sqrt(1 - beta2^(k+1)) / (1 - beta1^(k+1)) (its bias correction is on).
    group = ckpt.load_tensors_state(ckpt.step_dir(result.output_dir, 2) / "optimizer.pt")[
        "param_groups"
    ][0]
    beta1, beta2 = group["betas"]
    k = group["k"]
    correction = math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1))
    expected = [group["d"] * lr * correction for lr in records[2]["lr"]]
    assert records[2]["effective_lr"] == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- schedule-free


def schedule_free(make_config, *extra, output):
    return make_config(*COMMON, *SETUPS["schedule_free_adamw"], *extra, output=output)


def trained_params(unet, text_encoder) -> list[torch.Tensor]:
    """The LoRA parameters in the optimizer's order: UNet group, then text-encoder group.

    ``text_encoder`` is one module, or the list validation hands over (SDXL has two).
    """
    encoders = text_encoder if isinstance(text_encoder, list) else [text_encoder]
    return [p for m in (unet, *encoders) for p in m.parameters() if p.requires_grad]


def test_schedule_free_saves_its_eval_weights(make_config, tmp_path):
    """The checkpoint's LoRA is x = (y - (1 - beta1) z) / beta1 for the train-mode weights y
    and schedulefree's z, and the final file is that LoRA."""
    result = loop.run(schedule_free(make_config, output=tmp_path / "run"))
    folder = ckpt.step_dir(result.output_dir, 4)
    state = ckpt.load_tensors_state(folder / "optimizer.pt")
    beta1 = state["param_groups"][0]["betas"][0]
    assert not state["param_groups"][0]["train_mode"]  # saved in eval mode

    params = trained_params(result.unet, result.text_encoder)
    held = [p.detach().clone() for p in params]
    # Loading the saved file into the returned models changes nothing: they hold its weights.
    lora.load_into(folder / WEIGHTS_NAME, result.unet, result.text_encoder)
    assert all(torch.equal(p, h) for p, h in zip(params, held, strict=True))
    assert lora_weights(folder).keys() == lora_weights(result.output_dir).keys()
    for key, value in lora_weights(folder).items():
        assert torch.equal(value, lora_weights(result.output_dir)[key])

    moved = 0
    for i, (x, y) in enumerate(zip(params, state[TRAIN_WEIGHTS], strict=True)):
        z = state["state"][i]["z"]
        formula = (y.double() - (1 - beta1) * z.double()) / beta1
        torch.testing.assert_close(x.double(), formula, rtol=1e-6, atol=1e-8)
        assert torch.equal(x, y.lerp(z, 1 - 1 / beta1))  # schedulefree's own eval() step
        moved += not torch.equal(x, y)
    assert moved, "x equals y everywhere: the eval switch was not exercised"


def test_schedule_free_validates_and_samples_with_its_eval_weights(
    make_config, tmp_path, tiny_data, monkeypatch
):
    from trainer.report import samples
    from trainer.run import validation

    seen = {}
    real_evaluate = validation.Validator.evaluate

    def evaluate(self, unet, encoder, *args, **kwargs):
        seen.setdefault("val", []).append(
            [p.detach().clone() for p in trained_params(unet, encoder)]
        )
        return real_evaluate(self, unet, encoder, *args, **kwargs)

    def sample_point(state, unet, encoder):
        seen.setdefault("samples", []).append(
            [p.detach().clone() for p in trained_params(unet, encoder)]
        )

    monkeypatch.setattr(validation.Validator, "evaluate", evaluate)
    monkeypatch.setattr(samples, "sample_point", sample_point)
    cfg = schedule_free(
        make_config,
        f'validation.path="{tiny_data}"',
        'validation.prompts=["a red circle"]',
        output=tmp_path / "run",
    )
    result = loop.run(cfg)
    assert len(seen["val"]) == len(seen["samples"]) == 1  # at the end only
    # The last validation ran at update 4, the update the final weights are from.
    final = trained_params(result.unet, result.text_encoder)  # x: the run ends in eval mode
    for snapshot in (seen["val"][0], seen["samples"][0]):
        assert all(torch.equal(a, b) for a, b in zip(snapshot, final, strict=True))
    y = ckpt.load_tensors_state(ckpt.step_dir(result.output_dir, 4) / "optimizer.pt")
    assert any(not torch.equal(a, b) for a, b in zip(final, y[TRAIN_WEIGHTS], strict=True))


def test_switching_to_eval_and_back_never_changes_training(make_config, tmp_path, tiny_data):
    """Validating every update and saving every update trains bitwise the same LoRA as
    neither: the train-mode weights are restored exactly after each switch."""
    plain = loop.run(
        schedule_free(make_config, "checkpoint.every_n_steps=0", output=tmp_path / "a")
    )
    busy = loop.run(
        schedule_free(
            make_config,
            f'validation.path="{tiny_data}"',
            "validation.every_n_steps=1",
            "checkpoint.every_n_steps=1",
            output=tmp_path / "b",
        )
    )
    a, b = lora_weights(plain.output_dir), lora_weights(busy.output_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["loss"] for r in read_metrics(busy.output_dir)]
    assert losses == [r["loss"] for r in read_metrics(plain.output_dir)]


def test_schedule_free_resume_restores_the_saved_train_weights(make_config, tmp_path):
    """A checkpoint where schedulefree's own eval/train round trip would not give the train
    weights back: only the saved ones make the resumed run bitwise the uninterrupted one."""
    longer = ("train.max_steps=8", "checkpoint.every_n_steps=6")
    lrs = ("train.learning_rate=5e-2", "train.text_encoder_lr=2e-2")
    whole = loop.run(schedule_free(make_config, *longer, *lrs, output=tmp_path / "whole"))
    start = ckpt.step_dir(whole.output_dir, 6)
    state = ckpt.load_tensors_state(start / "optimizer.pt")
    beta1 = state["param_groups"][0]["betas"][0]
    lossy = 0
    for i, y in enumerate(state[TRAIN_WEIGHTS]):
        z = state["state"][i]["z"]
        lossy += not torch.equal(y.lerp(z, 1 - 1 / beta1).lerp(z, 1 - beta1), y)
    assert lossy, "the round trip is exact here; the test would not see a missing restore"
    resumed = loop.run(
        schedule_free(
            make_config, *longer, *lrs, f'checkpoint.resume="{start}"', output=tmp_path / "r"
        )
    )
    a, b = lora_weights(whole.output_dir), lora_weights(resumed.output_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
