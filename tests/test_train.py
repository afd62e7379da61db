"""A few optimizer updates of real training on the tiny model, and what they leave behind."""

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from helpers import training_metadata, without_clock
from safetensors.torch import load_file

from trainer.lora.files import WEIGHTS_NAME
from trainer.report.tracking import read_metrics
from trainer.run import loop


@pytest.fixture(scope="module")
def trained(tiny_config, tmp_path_factory):
    """One short run shared by the tests of this module: 3 updates of 2 × accumulation 2."""
    cfg = tiny_config(
        tmp_path_factory.mktemp("run"),
        "train.max_steps=3",
        "train.batch_size=2",
        "train.gradient_accumulation_steps=2",
        "train.learning_rate=1e-2",
        'lora.save_dtype="fp32"',
        "lr_scheduler.warmup_steps=0",
    )
    return cfg, loop.run(cfg)


def test_metrics_have_one_finite_record_per_update(trained):
    _, result = trained
    records = read_metrics(result.output_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert all(len(r["lr"]) == 1 for r in records)
    # samples count micro-batches × batch: 2 micro-batches of 2 per update.
    assert [r["samples"] for r in records] == [4, 8, 12]


def test_lora_changed_and_base_weights_are_bit_identical(trained, tiny_model):
    _, result = trained
    saved = load_file(result.output_dir / WEIGHTS_NAME)
    ups = [v for k, v in saved.items() if "lora_B" in k]
    assert ups and all(v.abs().sum() > 0 for v in ups), "lora_B starts at zero and must move"
    fresh = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    base = {k: v for k, v in fresh.state_dict().items()}
    trained_state = {
        k.replace(".base_layer", ""): v
        for k, v in result.unet.state_dict().items()
        if "lora_" not in k
    }
    assert set(trained_state) == set(base)
    assert all(torch.equal(trained_state[k], base[k]) for k in base)


def test_outputs_beside_the_weights(trained):
    cfg, result = trained
    out = result.output_dir
    assert (out / "config.toml").is_file()
    state = json.loads((out / "lr_scheduler.json").read_text())
    assert state["name"] == cfg.lr_scheduler.name and state["step"] == 3
    meta = training_metadata(out / WEIGHTS_NAME)
    assert meta["rank"] == cfg.lora.rank and meta["steps"] == 3 and meta["seed"] == 0
    # The model's folder name, never the local path (the file may be shared).
    assert meta["base_model"] == Path(cfg.model.pretrained).name


def test_saved_config_reloads_to_the_same_config(trained):
    from trainer.config import load as config

    cfg, result = trained
    assert config.load(result.output_dir / "config.toml") == cfg


def test_lora_loads_in_diffusers_and_reproduces_the_trained_unet(trained, tiny_model):
    _, result = trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    hidden = torch.randn(1, 77, 32, generator=generator)
    t = torch.tensor([500])
    with torch.no_grad():
        before = pipe.unet(sample, t, hidden).sample
        pipe.load_lora_weights(result.output_dir)
        after = pipe.unet(sample, t, hidden).sample
        ours = result.unet(sample, t, hidden).sample
    assert (after - before).abs().max() > 1e-4, "the LoRA must change the prediction"
    # Same prediction as the model we trained: keys, rank and alpha scale all survived.
    torch.testing.assert_close(after, ours, rtol=1e-5, atol=1e-6)

    def image():
        return pipe(
            "a red circle",
            num_inference_steps=2,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    with_lora = image()
    pipe.unload_lora_weights()
    without = image()
    assert abs(with_lora - without).max() > 0


def test_v_prediction_and_min_snr_train(make_config):
    cfg = make_config(
        'model.prediction_type="v_prediction"',
        "train.snr_gamma=5.0",
        "train.noise_offset=0.05",
        "train.max_steps=2",
    )
    result = loop.run(cfg)
    assert all(math.isfinite(r["loss"]) for r in read_metrics(result.output_dir))


def test_text_encoder_lora_gets_its_own_param_group(make_config):
    cfg = make_config(
        "lora.train_text_encoder=true", "train.text_encoder_lr=5e-5", "train.max_steps=2"
    )
    result = loop.run(cfg)
    records = read_metrics(result.output_dir)
    assert all(len(r["lr"]) == 2 for r in records)
    saved = load_file(result.output_dir / WEIGHTS_NAME)
    assert any(k.startswith("text_encoder.") for k in saved)
    assert any(k.startswith("unet.") for k in saved)


def test_bf16_runs_on_cpu_with_fp32_adapters(make_config):
    cfg = make_config('train.mixed_precision="bf16"', "train.max_steps=2")
    result = loop.run(cfg)
    trainable = [p for p in result.unet.parameters() if p.requires_grad]
    frozen = [p for p in result.unet.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)


def test_fp16_without_cuda_is_a_clear_error(make_config):
    from trainer.config.load import ConfigError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = make_config('train.mixed_precision="fp16"')
    with pytest.raises(ConfigError, match="bf16"):
        loop.run(cfg)


def test_xformers_request_without_cuda_falls_back_to_sdpa_with_one_log_line(tiny_model, caplog):
    from trainer.models.load import enable_attention_backend

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    with caplog.at_level("WARNING"):
        assert enable_attention_backend(unet, want_xformers=True) == "sdpa"
    (record,) = caplog.records
    assert "train.xformers" in record.message and "SDPA" in record.message
    caplog.clear()
    assert enable_attention_backend(unet, want_xformers=False) == "sdpa"
    assert not caplog.records


def test_gradient_checkpointing_trains_the_same_adapters(make_config, tmp_path):
    """Checkpointing recomputes activations; with frozen base weights the LoRA must still get
    its gradients (a reentrant checkpoint would silently drop them)."""
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        loop.run(
            make_config("train.max_steps=2", f"train.gradient_checkpointing={flag}", output=out)
        )
        runs[flag] = load_file(out / WEIGHTS_NAME)
    assert any(v.abs().sum() > 0 for k, v in runs["true"].items() if "lora_B" in k)
    for key, value in runs["false"].items():
        torch.testing.assert_close(runs["true"][key], value, rtol=1e-4, atol=1e-6)


def test_channels_last_trains_the_same_adapters(make_config, tmp_path):
    """A memory format changes how tensors are laid out, not what is computed."""
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        sets = ("train.max_steps=2", 'data.cache_latents="off"', f"train.channels_last={flag}")
        loop.run(make_config(*sets, output=out))
        runs[flag] = read_metrics(out)
    # The same loss to float rounding (Adam would amplify rounding in near-zero gradients
    # into visible weight differences, so the losses are the sharper check).
    assert [r["loss"] for r in runs["true"]] == pytest.approx(
        [r["loss"] for r in runs["false"]], rel=1e-5
    )


def test_dataloader_workers_feed_the_same_batches(make_config, tmp_path):
    runs = {}
    for workers in (0, 2):
        out = tmp_path / str(workers)
        cfg = make_config("train.max_steps=3", f"data.num_workers={workers}", output=out)
        loop.run(cfg)
        runs[workers] = without_clock(read_metrics(out))
    assert runs[0] == runs[2]


def test_model_source_errors_name_the_source(tmp_path):
    from trainer.config.load import ModelConfig
    from trainer.models.load import ModelLoadError, load_components

    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"not really")
    with pytest.raises(ModelLoadError, match=r"only \.safetensors checkpoints"):
        load_components(ModelConfig(pretrained=str(pickled)))
    with pytest.raises(ModelLoadError, match="no such file"):
        load_components(ModelConfig(pretrained=str(tmp_path / "missing.safetensors")))
    with pytest.raises(ModelLoadError, match="could not load it"):
        load_components(ModelConfig(pretrained=str(tmp_path)))


def test_tensorboard_gets_the_loss_and_every_param_groups_lr(make_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    cfg = make_config(
        'logging.tracker="tensorboard"',
        "lora.train_text_encoder=true",
        "train.text_encoder_lr=5e-5",
        "train.max_steps=3",
        output=out,
    )
    loop.run(cfg)
    events = out / "logs" / cfg.logging.project  # the run: scalars, hparams, images
    scalars = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"train/loss", "train/lr/unet", "train/lr/text_encoder"} <= set(scalars)
    lrs = [e.value for e in EventAccumulator(str(events)).Reload().Scalars("train/lr/text_encoder")]
    assert lrs == pytest.approx([r["lr"][1] for r in read_metrics(out)], rel=1e-6)
