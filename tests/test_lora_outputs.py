"""The files a run leaves: both formats, exact keys, loading in diffusers, metadata and hashes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from datetime import datetime

import client_rules as rules
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save

from trainer.files import umask_mode
from trainer.lora import adapters as lora
from trainer.lora import files as lora_files
from trainer.lora import hashes as lora_hashes
from trainer.run import checkpoint as ckpt
from trainer.run import final, loop

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
NAME = "shapes"
PROMPT = "a red circle"
LAUNCH = {"num_processes": 1}


@pytest.fixture(scope="module")
def dataset(tiny_data, tmp_path_factory):
    """Four images at the top with comma-separated tags, and two in a ``3_extra`` folder that
    kohya's layout repeats three times."""
    root = tmp_path_factory.mktemp("tagged") / "pets"
    extra = root / "3_extra"
    extra.mkdir(parents=True)
    captions = ["Red, circle", "red, square, big", "blue,circle", "circle, , Red"]
    images = sorted(tiny_data.glob("*.png"))
    for i, caption in enumerate(captions):
        shutil.copy(images[i], root / f"a{i}.png")
        (root / f"a{i}.txt").write_text(caption)
    for i, caption in enumerate(["green, triangle", "green"]):
        shutil.copy(images[4 + i], extra / f"b{i}.png")
        (extra / f"b{i}.txt").write_text(caption)
    return root


@pytest.fixture(scope="module")
def run(tiny_config, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "run"
    cfg = tiny_config(
        out,
        f'data.path="{dataset}"',
        "train.max_steps=2",
        "train.batch_size=2",
        "lora.rank=4",
        "lora.alpha=8.0",
        "lora.train_text_encoder=true",
        'output.save_dtype="fp32"',
        f'output.name="{NAME}"',
    )
    return cfg, loop.run(cfg)


def header(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def expected_names(tiny_model):
    """The diffusers keys and kohya module names for the tiny model, from its module tree."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    text = rules.as_transformers4(
        CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
    )
    diffusers_keys, kohya = set(), set()
    for component, model, targets in (
        ("unet", unet, UNET_TARGETS),
        ("text_encoder", text, TEXT_TARGETS),
    ):
        for name, _ in model.named_modules():
            if name.endswith(tuple("." + t for t in targets)):
                diffusers_keys |= {
                    f"{component}.{name}.lora_A.weight",
                    f"{component}.{name}.lora_B.weight",
                }
    for name in rules.kohya_names(unet, [text]):
        if name.endswith(tuple("_" + t.replace(".", "_") for t in UNET_TARGETS + TEXT_TARGETS)):
            kohya |= {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    return diffusers_keys, kohya


def test_both_files_with_exact_key_names_and_normal_permissions(run, tiny_model):
    _, result = run
    diffusers_file = result.output_dir / lora_files.WEIGHTS_NAME
    kohya_file = result.output_dir / f"{NAME}.safetensors"
    diffusers_keys, kohya_keys = expected_names(tiny_model)
    assert set(load_file(diffusers_file)) == diffusers_keys
    assert set(load_file(kohya_file)) == kohya_keys
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in kohya_keys)
    for path in (diffusers_file, kohya_file):
        assert os.stat(path).st_mode & 0o777 == umask_mode()
    alphas = {v.item() for k, v in load_file(kohya_file).items() if k.endswith(".alpha")}
    assert alphas == {8.0}


@pytest.fixture(scope="module")
def nontrivial(run, tmp_path_factory):
    """The run's adapters with random up matrices: a few updates move the image only ~1e-4,
    too little to tell a LoRA that loaded from one that did not."""
    cfg, result = run
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (result.unet, result.text_encoder):
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    # The final files are written from the last checkpoint, as a run writes them: a copy of
    # the run's, holding these adapters as a checkpoint save writes them.
    checkpoint = tmp_path_factory.mktemp("checkpoint") / "step-000002"
    shutil.copytree(ckpt.find_latest(result.output_dir), checkpoint)
    lora.save(checkpoint, result.unet, result.text_encoder, dtype="fp32")
    folder = tmp_path_factory.mktemp("nontrivial")
    final.write_outputs(checkpoint, folder, cfg, LAUNCH)
    return folder


def pipeline(tiny_model, folder=None, weight_name=None):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.load_lora_weights(str(folder), weight_name=weight_name)
    return pipe


def outputs_of(pipe):
    ids = pipe.tokenizer(PROMPT, padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
    image = pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    return hidden, torch.from_numpy(image)


def test_kohya_file_gives_the_diffusers_files_image_text_encoder_included(nontrivial, tiny_model):
    base_hidden, base_image = outputs_of(pipeline(tiny_model))
    ours_hidden, ours_image = outputs_of(pipeline(tiny_model, nontrivial, lora_files.WEIGHTS_NAME))
    kohya_hidden, kohya_image = outputs_of(pipeline(tiny_model, nontrivial, f"{NAME}.safetensors"))
    # The text-encoder part loaded from both files, identically.
    assert (ours_hidden - base_hidden).abs().max() > 1e-2
    torch.testing.assert_close(kohya_hidden, ours_hidden, rtol=1e-5, atol=1e-5)
    assert (ours_image - base_image).abs().max() > 1e-2
    torch.testing.assert_close(kohya_image, ours_image, rtol=1e-4, atol=1e-5)


def test_kohya_metadata_values(run, dataset):
    cfg, result = run
    meta = header(result.output_dir / f"{NAME}.safetensors")
    # The dataset facts, counted here by kohya's rule: tags split at commas, stripped and
    # lower-cased, once per distinct image, keyed by folder name; images counted with repeats.
    tags: dict[str, Counter] = {}
    images = 0
    for caption_file in sorted(dataset.rglob("*.txt")):
        folder = caption_file.parent.name
        repeats = int(folder.split("_")[0]) if folder[0].isdigit() else 1
        images += repeats
        words = (t.strip().lower() for t in caption_file.read_text().split(","))
        tags.setdefault(folder, Counter()).update(t for t in words if t)
    assert json.loads(meta["ss_tag_frequency"]) == {k: dict(v) for k, v in tags.items()}
    assert meta["ss_num_train_images"] == str(images) == "10"
    assert json.loads(meta["ss_dataset_dirs"]) == {
        "pets": {"n_repeats": 1, "img_count": 4},
        "3_extra": {"n_repeats": 3, "img_count": 2},
    }
    expected = {
        "ss_output_name": NAME,
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "8.0",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_resolution": "(64, 64)",
        "ss_steps": "2",
        "ss_epoch": "1",
        "ss_num_epochs": "1",
        "ss_seed": str(cfg.train.seed),
        "ss_lr_scheduler": cfg.lr_scheduler.name,
        "ss_sd_model_name": "model",
        "ss_mixed_precision": "no",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": NAME,
        "modelspec.resolution": "64x64",
        "modelspec.prediction_type": "epsilon",
        "modelspec.sai_model_spec": "1.0.0",
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert meta["ss_optimizer"].startswith("torch.optim.AdamW(")
    assert datetime.fromisoformat(meta["modelspec.date"].replace("Z", "+00:00")).year >= 2024
    record = json.loads(meta[lora_files.TRAINING_METADATA_KEY])
    assert record["steps"] == 2 and record["text_encoder_trained"] is True


def test_no_absolute_path_in_any_header(run, tiny_model, dataset, tmp_path_factory):
    _, result = run
    root = str(tmp_path_factory.getbasetemp())
    for path in (
        result.output_dir / lora_files.WEIGHTS_NAME,
        result.output_dir / f"{NAME}.safetensors",
    ):
        for key, value in header(path).items():
            for leak in (root, str(tiny_model), str(dataset), str(result.output_dir)):
                assert leak not in value, f"{path.name}: {key} holds {leak}"


def independent_hashes(path) -> tuple[str, str]:
    """sha256 of the bytes after the header, and kohya's legacy hash, computed here."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    content = hashlib.sha256(raw[8 + length :]).hexdigest()
    ss_only = {k: v for k, v in header(path).items() if k.startswith("ss_")}
    serialised = save(load_file(path), ss_only or None)
    legacy = hashlib.sha256(serialised[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return content, legacy


def test_stored_hashes_are_the_files_own(run):
    _, result = run
    kohya_file = result.output_dir / f"{NAME}.safetensors"
    content, legacy = independent_hashes(kohya_file)
    meta = header(kohya_file)
    assert meta["sshs_model_hash"] == content
    assert meta["modelspec.hash_sha256"] == "0x" + content
    assert meta["sshs_legacy_hash"] == legacy
    diffusers_file = result.output_dir / lora_files.WEIGHTS_NAME
    assert (
        header(diffusers_file)["modelspec.hash_sha256"]
        == "0x" + independent_hashes(diffusers_file)[0]
    )


def test_legacy_hash_of_a_file_over_one_mib(tmp_path):
    """Below 1 MiB the legacy window is empty; a bigger LoRA exercises the real read."""
    generator = torch.Generator().manual_seed(1)
    tensors = {
        f"lora_unet_x{i}.lora_down.weight": torch.randn(256, 512, generator=generator)
        for i in range(3)
    }
    path = tmp_path / "big.safetensors"
    meta = lora_hashes.with_hashes(tensors, {"ss_output_name": "big", "modelspec.title": "big"})
    from trainer.files import save_safetensors

    save_safetensors(path, tensors, meta)
    content, legacy = independent_hashes(path)
    assert meta["sshs_model_hash"] == content
    assert meta["sshs_legacy_hash"] == legacy != hashlib.sha256(b"").hexdigest()[:8]
    assert all(lora_hashes.verify(path, meta).values())


def test_a_changed_byte_fails_the_hash(run, tmp_path):
    _, result = run
    copy = tmp_path / "changed.safetensors"
    data = bytearray((result.output_dir / f"{NAME}.safetensors").read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    verdict = lora_hashes.verify(copy, header(copy))
    assert verdict["sshs_model_hash"] is False and verdict["modelspec.hash_sha256"] is False


@pytest.mark.parametrize(
    ("fmt", "files"), [("diffusers", [lora_files.WEIGHTS_NAME]), ("kohya", [f"{NAME}.safetensors"])]
)
def test_output_format_picks_the_files(run, tiny_config, tmp_path, fmt, files):
    cfg, result = run
    out = tmp_path / "only"
    cfg = tiny_config(
        out, f'output.format="{fmt}"', f'output.name="{NAME}"', "lora.train_text_encoder=true"
    )
    written = final.write_outputs(ckpt.find_latest(result.output_dir), out, cfg, LAUNCH)
    assert [p.name for p in written] == files
    assert sorted(p.name for p in out.glob("*.safetensors")) == files


def test_save_dtype_and_the_deprecated_lora_key(run, tiny_config, tmp_path, caplog):
    cfg, result = run
    cfg = tiny_config(tmp_path / "a", 'output.save_dtype="bf16"', "lora.train_text_encoder=true")
    checkpoint = ckpt.find_latest(result.output_dir)
    (path, kohya) = final.write_outputs(checkpoint, tmp_path / "a", cfg, LAUNCH)
    assert {v.dtype for v in load_file(path).values()} == {torch.bfloat16}
    assert {v.dtype for k, v in load_file(kohya).items() if not k.endswith(".alpha")} == {
        torch.bfloat16
    }
    assert kohya.name == "a.safetensors"  # output.name unset: the output_dir's name
    with caplog.at_level(logging.WARNING, logger="sdlora"):
        cfg = tiny_config(tmp_path / "b", 'lora.save_dtype="fp16"', "lora.train_text_encoder=true")
    assert "output.save_dtype" in caplog.text and "deprecated" in caplog.text
    (path, _) = final.write_outputs(checkpoint, tmp_path / "b", cfg, LAUNCH)
    assert {v.dtype for v in load_file(path).values()} == {torch.float16}


def adapter_state(unet, text_encoder) -> dict[str, torch.Tensor]:
    """All LoRA tensors of the two models, keyed as the diffusers file keys them."""
    return lora.collect({"unet": unet, "text_encoder": text_encoder})[0]


def test_saved_weights_load_back_under_either_transformers_layout(run, tmp_path):
    """Resume: a file's canonical keys go into a model with or without the text_model level,
    and so do keys written before they were canonical (trained under transformers 5)."""
    _, result = run
    flat = result.text_encoder
    nested = rules.as_transformers4(flat)
    nested.peft_config = flat.peft_config
    path = lora.save(tmp_path / "canonical", result.unet, flat)
    from_nested = load_file(lora.save(tmp_path / "nested", result.unet, nested))
    canonical = load_file(path)
    assert set(from_nested) == set(canonical)
    assert all(torch.equal(from_nested[k], canonical[k]) for k in canonical)
    before = {k: v.clone() for k, v in adapter_state(result.unet, flat).items()}
    old = {
        k.replace("text_encoder.text_model.", "text_encoder."): v
        for k, v in load_file(path).items()
    }
    old_file = tmp_path / "old.safetensors"
    shutil.copy(path, old_file)
    from safetensors.torch import save_file

    save_file(old, str(old_file))
    for source, target in ((path, nested), (old_file, flat), (old_file, nested)):
        with torch.no_grad():
            for name, param in flat.named_parameters():
                if "lora_" in name:
                    param.zero_()
        lora.load_into(source, result.unet, target)
        after = adapter_state(result.unet, flat)
        assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_mistyped_output_key_is_a_config_error(tiny_config, tmp_path):
    from trainer.config.load import ConfigError

    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, 'output.format="safetensors"', 'output.nmae="x"')
    problems = "\n".join(err.value.problems)
    assert "output.format" in problems and '"both"' in problems
    assert "output.nmae" in problems and "did you mean 'name'" in problems
