"""The kohya export loads in diffusers exactly like the diffusers-format file."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_kohya
from safetensors.torch import load_file, save_file

from trainer import loop
from trainer.cli import main
from trainer.export import KOHYA_NAME
from trainer.lora import WEIGHTS_NAME


@pytest.fixture(scope="module")
def trained(tiny_config, tmp_path_factory):
    """A LoRA whose alpha differs from its rank, on the UNet and the text encoder."""
    out = tmp_path_factory.mktemp("export")
    cfg = tiny_config(
        out,
        "train.max_steps=3",
        "train.learning_rate=1e-2",
        "lora.rank=4",
        "lora.alpha=8.0",
        "lora.train_text_encoder=true",
        'lora.save_dtype="fp32"',
    )
    loop.run(cfg)
    return out


def unet_prediction(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    ids = pipe.tokenizer("a red circle", padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        return pipe.unet(sample, torch.tensor([500]), hidden).sample


def predict_with(tiny_model, lora_file) -> torch.Tensor:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    return unet_prediction(pipe)


def test_kohya_export_matches_the_diffusers_file(trained, tiny_model, capsys):
    assert main(["export", str(trained), "--dtype", "fp32"]) == 0
    kohya = trained / KOHYA_NAME
    keys = load_file(kohya)
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te1_") for k in keys)
    assert {v.item() for k, v in keys.items() if k.endswith(".alpha")} == {8.0}
    ours = predict_with(tiny_model, trained / WEIGHTS_NAME)
    torch.testing.assert_close(predict_with(tiny_model, kohya), ours, rtol=1e-5, atol=1e-6)


def test_plain_conversion_with_alpha_equal_to_rank_would_load_at_the_wrong_scale(
    trained, tiny_model, tmp_path
):
    """The reason export rewrites alpha: diffusers' converter writes alpha = rank."""
    plain = convert_state_dict_to_kohya(load_file(trained / WEIGHTS_NAME))
    assert {v.item() for k, v in plain.items() if k.endswith(".alpha")} == {4}
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in plain.items()}, str(path))
    ours = predict_with(tiny_model, trained / WEIGHTS_NAME)
    assert not torch.allclose(predict_with(tiny_model, path), ours, rtol=1e-5, atol=1e-6)


def test_export_of_a_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "no LoRA weights" in capsys.readouterr().err
