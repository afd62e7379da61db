"""The EMA of the LoRA weights: its decay against diffusers' EMAModel, the average against the
closed-form recurrence on the weights each checkpoint recorded, exact resume, and the outputs."""

from __future__ import annotations

import pytest
import torch
from helpers import training_metadata, without_clock
from safetensors.torch import load_file

from trainer.config import load as config
from trainer.lora.files import WEIGHTS_NAME
from trainer.report.tracking import read_metrics
from trainer.run import checkpoint as ckpt
from trainer.run import ema, loop


@pytest.mark.parametrize(
    "table",
    [
        {"warmup": "ratio", "decay": 0.9999},
        {"warmup": "power", "decay": 0.9999, "inv_gamma": 1.0, "power": 2 / 3},
        {"warmup": "power", "decay": 0.995, "inv_gamma": 3.0, "power": 0.75},
    ],
)
def test_the_decay_ramp_is_diffusers_emamodels(table):
    from diffusers.training_utils import EMAModel

    settings = config.EmaConfig(enabled=True, **table)
    theirs = EMAModel(
        [torch.nn.Parameter(torch.zeros(1))], decay=settings.decay,
        use_ema_warmup=settings.warmup == "power", inv_gamma=settings.inv_gamma,
        power=settings.power,
    )  # fmt: skip
    # Our k-th average update (0-based) is diffusers' optimization step k + 1.
    for k in range(0, 3000, 7):
        assert ema.decay_at(settings, k) == pytest.approx(theirs.get_decay(k + 1), rel=1e-12)


def test_without_warmup_the_average_is_the_closed_form_sum_from_the_initial_weights():
    module = torch.nn.Linear(3, 2)
    settings = config.EmaConfig(enabled=True, decay=0.8, warmup="off")
    initial = module.weight.detach().double().clone()
    average = ema.Ema(settings, {"unet": module})
    history = []
    for k in range(1, 6):
        with torch.no_grad():
            module.weight.add_(torch.randn(2, 3, generator=torch.Generator().manual_seed(k)))
        history.append(module.weight.detach().double().clone())
        average.after_update(k)
    d, n = 0.8, len(history)
    expected = d**n * initial + sum((1 - d) * d ** (n - k) * w for k, w in enumerate(history, 1))
    torch.testing.assert_close(average.shadow["unet.weight"].double(), expected)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"decay": 1.0}, "ema.decay: 1.0 must be in [0, 1)"),
        ({"every_n_steps": 0}, "ema.every_n_steps: 0 must be >= 1"),
        ({"power": 0.5}, "ema.power: applies only to ema.warmup = 'power', not 'ratio'"),
        ({"warmup": "linear"}, 'ema.warmup: "linear" is not one of "ratio" | "power" | "off"'),
    ],
)
def test_ema_settings_are_checked_with_the_config(table, expected):
    data = {"model": {"pretrained": "m"}, "data": {"path": "d"}, "ema": table}
    with pytest.raises(config.ConfigError) as err:
        config.build(data)
    assert any(expected in p for p in err.value.problems), err.value.problems


# ---------------------------------------------------------------- runs

EMA_RUN = (
    "train.max_steps=6",
    "train.batch_size=2",
    "train.gradient_accumulation_steps=1",
    "ema.enabled=true",
    "ema.every_n_steps=2",
    'output.save_dtype="fp32"',
    "checkpoint.every_n_steps=1",
    "validation.fraction=0.125",
    "validation.every_n_steps=3",
    "validation.timesteps=2",
)


@pytest.fixture(scope="module")
def ema_run(tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("ema")
    loop.run(tiny_config(out, *EMA_RUN))
    return out


@pytest.fixture(scope="module")
def trained_outputs_run(tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("ema_trained_outputs")
    loop.run(tiny_config(out, *EMA_RUN, "ema.use_for_outputs=false"))
    return out


def test_the_average_is_the_recurrence_on_the_recorded_weights(ema_run):
    """Averaged at updates 2, 4, 6 (every_n_steps = 2): decays 0, 2/11, 3/12 (ratio ramp)."""
    weights = {k: load_file(ckpt.step_dir(ema_run, k) / WEIGHTS_NAME) for k in (2, 4, 6)}
    averaged = load_file(ckpt.step_dir(ema_run, 6) / ema.EMA_WEIGHTS)
    assert averaged.keys() == weights[6].keys()
    for key in averaged:
        expected = weights[2][key].double()
        for k, update in ((1, 4), (2, 6)):
            d = (1 + k) / (10 + k)
            expected = d * expected + (1 - d) * weights[update][key].double()
        torch.testing.assert_close(averaged[key].double(), expected, rtol=1e-5, atol=1e-7)
    first = load_file(ckpt.step_dir(ema_run, 2) / ema.EMA_WEIGHTS)
    assert all(torch.equal(first[k], weights[2][k]) for k in first)  # decay 0: a copy
    # Between average updates the average stands still.
    third = load_file(ckpt.step_dir(ema_run, 3) / ema.EMA_WEIGHTS)
    assert all(torch.equal(third[k], first[k]) for k in first)


def test_resume_continues_the_average_bitwise(ema_run, tiny_config, tmp_path):
    out = tmp_path / "resumed"
    loop.run(tiny_config(out, *EMA_RUN, f'checkpoint.resume="{ckpt.step_dir(ema_run, 3)}"'))
    for name in (WEIGHTS_NAME, ema.EMA_WEIGHTS):
        a = load_file(ckpt.step_dir(out, 6) / name)
        b = load_file(ckpt.step_dir(ema_run, 6) / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    final, reference = load_file(out / WEIGHTS_NAME), load_file(ema_run / WEIGHTS_NAME)
    assert all(torch.equal(final[k], reference[k]) for k in final)


def test_outputs_hold_the_average_and_say_so(ema_run, trained_outputs_run):
    averaged = load_file(ckpt.step_dir(ema_run, 6) / ema.EMA_WEIGHTS)
    trained = load_file(ckpt.step_dir(ema_run, 6) / WEIGHTS_NAME)
    final = load_file(ema_run / WEIGHTS_NAME)
    assert all(torch.equal(final[k], averaged[k]) for k in final)
    assert not all(torch.equal(final[k], trained[k]) for k in final)
    record = training_metadata(ema_run / WEIGHTS_NAME)
    assert record["weights"] == "ema"
    assert record["ema"] == {
        "decay": 0.999, "warmup": "ratio", "every_n_steps": 2, "use_for_outputs": True,
    }  # fmt: skip
    (kohya_file,) = [p for p in ema_run.glob("*.safetensors") if p.name != WEIGHTS_NAME]
    assert training_metadata(kohya_file)["weights"] == "ema"

    # use_for_outputs = false: the same training, the trained weights out, another val loss.
    other = load_file(trained_outputs_run / WEIGHTS_NAME)
    assert all(torch.equal(other[k], trained[k]) for k in other)
    assert training_metadata(trained_outputs_run / WEIGHTS_NAME)["weights"] == "trained"
    ours, theirs = read_metrics(ema_run), read_metrics(trained_outputs_run)
    drop = ("val_loss", "val_loss_by_timestep")  # scored on other weights
    assert [{k: v for k, v in r.items() if k not in drop} for r in without_clock(ours)] == [
        {k: v for k, v in r.items() if k not in drop} for r in without_clock(theirs)
    ]
    assert ours[2]["val_loss"] != theirs[2]["val_loss"]


def test_a_checkpoints_average_and_trained_weights_export_as_what_they_are(ema_run, tmp_path):
    from trainer.commands.export import export

    folder = ckpt.step_dir(ema_run, 4)
    for name, weights in ((ema.EMA_WEIGHTS, "ema"), (WEIGHTS_NAME, "trained")):
        out = tmp_path / weights
        export(folder / name, "diffusers", out, dtype="fp32")
        assert training_metadata(out / WEIGHTS_NAME)["weights"] == weights
        got, source = load_file(out / WEIGHTS_NAME), load_file(folder / name)
        assert all(torch.equal(got[k], source[k]) for k in source)
