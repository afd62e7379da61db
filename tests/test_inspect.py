"""``sdlora inspect``: our files, other trainers' files, keys a client would drop, bad files.

Other trainers' files are built here from their documented key conventions (kohya
``networks/lora.py``, LyCORIS LoHa, diffusers' older attention-processor format), with tensor
shapes that fit the tiny test model.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainer.commands.cli import main
from trainer.lora.files import WEIGHTS_NAME
from trainer.run import loop

NAME = "ours"
WIDTH = 32  # the tiny model's attention width (and CLIP hidden size)
ATTN = "down_blocks_0_attentions_0_transformer_blocks_0_attn1"


@pytest.fixture(scope="module")
def ours(tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "run"
    cfg = tiny_config(
        out,
        "train.max_steps=1",
        "lora.rank=4",
        "lora.alpha=2.0",
        "lora.train_text_encoder=true",
        f'output.name="{NAME}"',
    )
    loop.run(cfg)
    return out


def inspect_json(capsys, *args) -> tuple[int, dict]:
    code = main(["inspect", *map(str, args), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_our_files(ours, tiny_model, capsys):
    for path, fmt in (
        (ours / f"{NAME}.safetensors", "kohya"),
        (ours / WEIGHTS_NAME, "diffusers/PEFT"),
    ):
        code, report = inspect_json(capsys, path, "--against", tiny_model)
        assert code == 0
        assert report["format"] == fmt
        assert report["architecture"] == "sd1"
        assert report["text_encoder"] is True
        assert len(report["modules"]) == 40  # 32 UNet attention projections + 8 CLIP ones
        assert {(m["rank"], m["alpha"]) for m in report["modules"]} == {(4, 2.0)}
        assert report["hashes"] and all(report["hashes"].values())
        assert report["unmatched"] == [] and report["wrong_shape"] == []
        assert report["metadata"]["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert set(report["targets"]) == {"unet", "text_encoder"}
    assert "self_attn.q_proj" in report["targets"]["text_encoder"]
    assert main(["inspect", str(ours / f"{NAME}.safetensors"), "--modules"]) == 0
    text = capsys.readouterr().out
    assert "hash:          sshs_model_hash verifies" in text
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in text


def kohya_module(name: str, rank: int, width_in: int, width_out: int, alpha: float) -> dict:
    return {
        f"{name}.lora_down.weight": torch.randn(rank, width_in),
        f"{name}.lora_up.weight": torch.randn(width_out, rank),
        f"{name}.alpha": torch.tensor(alpha),
    }


def test_keys_that_match_nothing_are_named(ours, tiny_model, tmp_path, capsys):
    state = load_file(ours / f"{NAME}.safetensors")
    added = kohya_module("lora_unet_down_blocks_7_attentions_0_proj_in", 4, WIDTH, WIDTH, 4.0)
    # The pre-fix spelling under transformers 5: no text_model level, so every client drops it.
    added |= kohya_module("lora_te_encoder_layers_0_self_attn_q_proj", 4, WIDTH, WIDTH, 4.0)
    # A module that exists, at another width: an SD2 LoRA on an SD1 model.
    wrong = kohya_module(f"lora_unet_{ATTN}_to_k", 4, 1024, WIDTH, 4.0)
    path = tmp_path / "extra.safetensors"
    save_file({**state, **added, **wrong}, str(path))
    code, report = inspect_json(capsys, path, "--against", tiny_model)
    assert code == 1
    assert report["unmatched"] == sorted(added)
    assert report["wrong_shape"] == sorted(wrong)
    assert main(["inspect", str(path), "--against", str(tiny_model)]) == 1
    text = capsys.readouterr().out
    assert "6 key(s) name no module" in text and "lora key not loaded" in text
    assert all(key in text for key in added)


def test_a_kohya_sdxl_file_from_another_trainer(tmp_path, capsys):
    state = kohya_module(
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 8, 640, 640, 4.0
    )
    state |= kohya_module("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 8, 768, 768, 4.0)
    state |= kohya_module(
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 8, 1280, 1280, 4.0
    )
    path = tmp_path / "sdxl.safetensors"
    save_file(state, str(path))  # no metadata: the family must come from the keys
    code, report = inspect_json(capsys, path)
    assert code == 0
    assert (report["format"], report["architecture"]) == ("kohya", "sdxl")
    assert {(m["component"], m["rank"], m["alpha"]) for m in report["modules"]} == {
        ("unet", 8, 4.0),
        ("text_encoder", 8, 4.0),
        ("text_encoder_2", 8, 4.0),
    }
    assert report["hashes"] == {}


def test_a_lycoris_loha_file(tiny_model, tmp_path, capsys):
    name = f"lora_unet_{ATTN}_to_q"
    state = {
        f"{name}.hada_w1_a": torch.randn(WIDTH, 4),
        f"{name}.hada_w1_b": torch.randn(4, WIDTH),
        f"{name}.hada_w2_a": torch.randn(WIDTH, 4),
        f"{name}.hada_w2_b": torch.randn(4, WIDTH),
        f"{name}.alpha": torch.tensor(1.0),
    }
    path = tmp_path / "loha.safetensors"
    save_file(state, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_v2": "False"})
    code, report = inspect_json(capsys, path, "--against", tiny_model)
    assert code == 0
    assert report["format"] == "LyCORIS" and report["text_encoder"] is False
    assert report["modules"] == [
        {"name": name, "component": "unet", "kind": "loha", "rank": 4, "alpha": 1.0}
    ]


def test_older_diffusers_attention_processor_keys(tiny_model, tmp_path, capsys):
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    state = {}
    for layer in ("to_q", "to_out"):
        state[f"{base}.{layer}_lora.down.weight"] = torch.randn(4, WIDTH)
        state[f"{base}.{layer}_lora.up.weight"] = torch.randn(WIDTH, 4)
    text = "text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora_linear_layer"
    state[f"{text}.down.weight"] = torch.randn(4, WIDTH)
    state[f"{text}.up.weight"] = torch.randn(WIDTH, 4)
    path = tmp_path / "legacy.safetensors"
    save_file(state, str(path))
    code, report = inspect_json(capsys, path, "--against", tiny_model)
    assert code == 0 and report["unmatched"] == []
    assert report["format"].startswith("diffusers (legacy")
    assert {m["name"] for m in report["modules"]} == {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "text_encoder.text_model.encoder.layers.1.self_attn.q_proj",
    }
    assert main(["inspect", str(path)]) == 0
    assert "alpha not stored (clients use alpha = rank)" in capsys.readouterr().out


def test_a_peft_file_with_text_encoder_keys_lacking_text_model(ours, tiny_model, tmp_path, capsys):
    """What this trainer wrote under transformers 5 before the fix: reported as dropped."""
    with safe_open(str(ours / WEIGHTS_NAME), framework="pt") as f:
        metadata = f.metadata()
    state = {
        k.replace("text_encoder.text_model.", "text_encoder."): v
        for k, v in load_file(ours / WEIGHTS_NAME).items()
    }
    path = tmp_path / "old.safetensors"
    save_file(state, str(path), metadata=metadata)
    code, report = inspect_json(capsys, path, "--against", tiny_model)
    assert code == 1
    assert report["unmatched"] == sorted(k for k in state if k.startswith("text_encoder."))
    assert len(report["unmatched"]) == 16


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda p, m: p.write_bytes(
                (m / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
            ),
            "holds no LoRA tensors",
        ),
        (lambda p, m: p.write_text("<html>404 Not Found</html>"), "not a safetensors file"),
        (lambda p, m: p.write_bytes(b"\x01\x02"), "too short"),
    ],
)
def test_files_that_are_not_loras_are_one_clear_error(tiny_model, tmp_path, capsys, make, message):
    path = tmp_path / "bad.safetensors"
    make(path, tiny_model)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and message in err and "Traceback" not in err


def test_a_truncated_file_is_one_clear_error(ours, tmp_path, capsys):
    data = (ours / f"{NAME}.safetensors").read_bytes()
    for cut in (len(data) - 100, 200):  # inside the tensors; inside the header
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        assert main(["inspect", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: truncated") and "Traceback" not in err


def test_against_needs_a_diffusers_folder(ours, tmp_path, capsys):
    assert main(["inspect", str(ours / WEIGHTS_NAME), "--against", str(tmp_path)]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_a_reader_that_stops_early_is_no_error(tmp_path):
    """`sdlora inspect --modules FILE | head -1`: a report larger than the pipe's buffer,
    whose reader leaves after one line, ends with status 0 and no traceback."""
    import subprocess
    import sys

    tensors = {}
    for i in range(3000):  # ~200 KB of module lines, more than a pipe holds
        name = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q_{i}"
        tensors[f"{name}.lora_down.weight"] = torch.zeros(4, 8)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(8, 4)
    path = tmp_path / "big.safetensors"
    save_file(tensors, str(path))
    code = "import sys; from trainer.commands.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "inspect", "--modules", str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"file:")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err
