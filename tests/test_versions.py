"""The installed set against sdlora's ranges, and text-encoder training under a transformers
whose own peft gate refuses to run."""

from __future__ import annotations

from importlib import metadata

import pytest
import transformers.integrations.peft as transformers_peft
from packaging.requirements import Requirement

from trainer.commands import cli
from trainer.run import loop, versions


def _faked_version(name: str, fake: str):
    real = metadata.version

    def version(dist: str) -> str:
        return fake if dist.lower() == name else real(dist)

    return version


def test_the_installed_set_passes():
    assert versions.problems() == []


def test_a_package_out_of_range_is_named_with_its_version_and_the_fix(
    monkeypatch, capsys, tiny_model, tiny_data, tmp_path
):
    monkeypatch.setattr(versions.metadata, "version", _faked_version("peft", "0.10.0"))
    loaded = []
    monkeypatch.setattr(loop, "setup", lambda *a: loaded.append(a))  # must never be reached
    code = cli.main(
        [
            "train",
            "--config",
            str(cli.Path(__file__).parents[1] / "configs" / "tiny.toml"),
            "--set",
            f'model.pretrained="{tiny_model}"',
            "--set",
            f'data.path="{tiny_data}"',
            "--set",
            f'output_dir="{tmp_path / "out"}"',
            "--set",
            "lora.train_text_encoder=true",
        ]
    )
    err = capsys.readouterr().err
    declared = next(
        Requirement(r) for r in metadata.requires("sdlora") if r.startswith("peft")
    ).specifier
    assert code == 2 and not loaded
    assert f"peft 0.10.0 is installed; sdlora needs peft{declared}" in err
    assert "pip install -c requirements/cpu.lock -e ." in err
    assert "lora." not in err and "config" not in err
    assert "Traceback" not in err


def test_a_missing_package_is_named(monkeypatch):
    real = metadata.version

    def version(dist: str) -> str:
        if dist.lower() == "safetensors":
            raise metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(versions.metadata, "version", version)
    [problem] = versions.problems()
    assert problem.startswith("safetensors is not installed; sdlora needs safetensors>=")


def test_text_encoder_lora_trains_when_transformers_refuses_its_own_add_adapter(
    monkeypatch, make_config
):
    """transformers 5.24 refuses peft < 0.22 in ``add_adapter``; adapters are attached through
    peft itself, so that gate (simulated here for any peft) cannot stop training."""

    def refuse(*args, **kwargs):
        raise ValueError("The version of PEFT you are using is not compatible (simulated gate)")

    monkeypatch.setattr(transformers_peft, "check_peft_version", refuse)
    from peft import LoraConfig
    from transformers import CLIPTextModel

    model = make_config().model.pretrained
    encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    with pytest.raises(ValueError, match="simulated gate"):  # the gate is live on its own path
        encoder.add_adapter(LoraConfig(target_modules=["q_proj"]))
    result = loop.run(make_config("lora.train_text_encoder=true", "train.max_steps=2"))
    assert result.updates == 2
    trained = [n for n, p in result.text_encoder.named_parameters() if "lora_" in n]
    assert trained, "the text encoder got no adapters"
