"""``sdlora export``: any checkpoint in the client formats, loading in diffusers as before."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_kohya
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainer.commands.cli import main
from trainer.lora import hashes as lora_hashes
from trainer.lora.files import WEIGHTS_NAME
from trainer.run import loop

NAME = "exp"


@pytest.fixture(scope="module")
def trained(tiny_config, tmp_path_factory):
    """A LoRA whose alpha differs from its rank, on the UNet and the text encoder, with a
    checkpoint at update 2 and the final weights at update 3."""
    out = tmp_path_factory.mktemp("export") / "run"
    cfg = tiny_config(
        out,
        "train.max_steps=3",
        "checkpoint.every_n_steps=2",
        "train.learning_rate=1e-2",
        "lora.rank=4",
        "lora.alpha=8.0",
        "lora.train_text_encoder=true",
        'output.save_dtype="fp32"',
        f'output.name="{NAME}"',
    )
    loop.run(cfg)
    return out


def header(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


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


def test_checkpoint_export_writes_both_formats_outside_the_checkpoint(trained, capsys):
    assert main(["export", str(trained / "checkpoints" / "step-000002")]) == 0
    folder = trained / "export" / "step-000002"
    kohya_file = folder / f"{NAME}-step00000002.safetensors"
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS_NAME, kohya_file.name])
    assert str(kohya_file) in capsys.readouterr().out
    keys = load_file(kohya_file)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    assert {v.item() for k, v in keys.items() if k.endswith(".alpha")} == {8.0}
    assert {v.dtype for v in keys.values()} == {torch.float32}  # the run's output.save_dtype
    meta = header(kohya_file)
    assert meta["ss_steps"] == "2" and meta["ss_output_name"] == NAME
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_alpha"] == "8.0"
    assert all(lora_hashes.verify(kohya_file, meta).values())
    diffusers_keys = load_file(folder / WEIGHTS_NAME)
    assert any(k.startswith("text_encoder.text_model.encoder.") for k in diffusers_keys)


def test_exporting_the_last_checkpoint_gives_the_final_files(trained, tmp_path):
    out = tmp_path / "last"
    checkpoint = trained / "checkpoints" / "step-000003"
    assert main(["export", str(checkpoint), "--out", str(out), "--name", NAME]) == 0
    for exported, final in (
        (out / WEIGHTS_NAME, trained / WEIGHTS_NAME),
        (out / f"{NAME}-step00000003.safetensors", trained / f"{NAME}.safetensors"),
    ):
        a, b = load_file(exported), load_file(final)
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a)
        # Every metadata entry too: the image count, tags and optimizer the loop recorded
        # in the checkpoint, and its save time (a file name differs, so its title does not).
        assert header(exported) == header(final)


def test_kohya_export_predicts_like_the_diffusers_file(trained, tiny_model, tmp_path):
    assert main(["export", str(trained), "--format", "kohya", "--out", str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == [f"{NAME}.safetensors"]
    ours = predict_with(tiny_model, trained / WEIGHTS_NAME)
    kohya = predict_with(tiny_model, tmp_path / f"{NAME}.safetensors")
    torch.testing.assert_close(kohya, ours, rtol=1e-5, atol=1e-6)


def test_plain_conversion_with_alpha_equal_to_rank_would_load_at_the_wrong_scale(
    trained, tiny_model, tmp_path
):
    """Why the exporter writes the trained alpha: diffusers' converter writes alpha = rank."""
    plain = convert_state_dict_to_kohya(load_file(trained / WEIGHTS_NAME))
    assert {v.item() for k, v in plain.items() if k.endswith(".alpha")} == {4}
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in plain.items()}, str(path))
    ours = predict_with(tiny_model, trained / WEIGHTS_NAME)
    assert not torch.allclose(predict_with(tiny_model, path), ours, rtol=1e-5, atol=1e-6)


def test_old_files_without_text_model_are_renamed_on_export(trained, tmp_path):
    """Files trained under transformers 5 before the fix hold text_encoder.encoder.… keys."""
    source = tmp_path / "old"
    source.mkdir()
    final = trained / WEIGHTS_NAME
    old = {
        k.replace("text_encoder.text_model.", "text_encoder."): v
        for k, v in load_file(final).items()
    }
    save_file(old, str(source / WEIGHTS_NAME), metadata=header(final))
    assert main(["export", str(source), "--name", "old"]) == 0
    kohya = load_file(source / "export" / "old.safetensors")
    text = [k for k in kohya if k.startswith("lora_te")]
    assert text and all(k.startswith("lora_te_text_model_encoder_layers_") for k in text)
    renamed = load_file(source / "export" / WEIGHTS_NAME)
    assert set(renamed) == set(load_file(final))


def test_export_errors_are_one_clear_line(trained, tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "no LoRA weights" in capsys.readouterr().err
    assert main(["export", str(trained), "--out", str(trained)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "overwrite" in err and "Traceback" not in err
    stray = tmp_path / "stray"
    stray.mkdir()
    save_file({"unet.a.lora_A.weight": torch.zeros(1, 1)}, str(stray / WEIGHTS_NAME))
    assert main(["export", str(stray)]) == 2
    assert "lora_adapter_metadata" in capsys.readouterr().err
    kohya_only = tmp_path / "kohya-only"  # a run with output.format = "kohya"
    shutil.copytree(trained / "checkpoints", kohya_only / "checkpoints")
    assert main(["export", str(kohya_only)]) == 2
    err = capsys.readouterr().err
    assert f"sdlora export {kohya_only / 'checkpoints' / 'step-000003'}" in err


def test_export_record_of_a_checkpoint_comes_from_its_config(trained, tmp_path):
    checkpoint = trained / "checkpoints" / "step-000002"
    assert main(["export", str(checkpoint), "--format", "diffusers", "--out", str(tmp_path)]) == 0
    meta = header(tmp_path / WEIGHTS_NAME)
    record = json.loads(meta["sdlora_training"])
    assert record["steps"] == 2 and record["alpha"] == 8.0 and record["architecture"] == "sd1"
    assert record["base_model"] == "model"


def test_export_never_replaces_other_weights_without_overwrite(trained, tmp_path, capsys):
    """An export into a run's output_dir would replace its trained LoRA: refused, nothing
    written; the same export rerun succeeds and changes nothing; --overwrite replaces."""
    run = tmp_path / "run"
    run.mkdir()
    for name in (WEIGHTS_NAME, f"{NAME}-step00000002.safetensors"):
        (run / name).write_bytes((trained / WEIGHTS_NAME).read_bytes())  # "the final LoRA"
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    checkpoint = str(trained / "checkpoints" / "step-000002")
    assert main(["export", checkpoint, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and str(run / WEIGHTS_NAME) in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before, "something was written"

    fresh = tmp_path / "fresh"
    assert main(["export", checkpoint, "--out", str(fresh)]) == 0
    first = {p.name: p.read_bytes() for p in fresh.iterdir()}
    assert main(["export", checkpoint, "--out", str(fresh)]) == 0  # the up arrow
    again = {p.name: p.read_bytes() for p in fresh.iterdir()}
    assert again.keys() == first.keys() and again == first
    assert main(["export", checkpoint, "--out", str(fresh), "--dtype", "fp16"]) == 2
    capsys.readouterr()

    assert main(["export", checkpoint, "--out", str(run), "--overwrite"]) == 0
    for name in first:
        a, b = load_file(run / name), load_file(fresh / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not [p for p in run.iterdir() if p.name.startswith(".export-")]


# ---------------------------------------------------------------- bad sources, clear errors


def only_export_error(capsys, path) -> str:
    """The one `error: PATH: ...` line a failed export prints (no traceback)."""
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {path}: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return captured.err


@pytest.mark.parametrize(
    "make",
    [
        lambda p: p.write_text("unet.a.lora_A.weight = [[0.0]]\n"),  # a text file
        lambda p: torch.save({"state_dict": {"a": torch.zeros(2)}}, p),  # a .ckpt pickle
    ],
    ids=["text", "pickle"],
)
def test_a_file_that_is_not_safetensors_is_the_inspect_error(tmp_path, capsys, make):
    path = tmp_path / "model.ckpt"
    make(path)
    assert main(["export", str(path)]) == 2
    err = only_export_error(capsys, path)
    assert "not a safetensors file" in err and ".ckpt/.pt pickle is not read" in err
    assert main(["inspect", str(path)]) == 2
    assert capsys.readouterr().err == err, "export and inspect disagree about the file"
    assert not (tmp_path / "export").exists()


def test_a_truncated_file_is_the_inspect_error(trained, tmp_path, capsys):
    data = (trained / WEIGHTS_NAME).read_bytes()
    for cut in (len(data) // 2, 100):  # inside the tensors; inside the header
        source = tmp_path / f"cut{cut}"
        source.mkdir()
        path = source / WEIGHTS_NAME
        path.write_bytes(data[:cut])
        assert main(["export", str(source)]) == 2
        err = only_export_error(capsys, path)
        assert "truncated" in err and "get it again" in err
        assert main(["inspect", str(path)]) == 2
        assert capsys.readouterr().err == err
        assert not (source / "export").exists()


def test_our_kohya_file_names_the_file_to_export_instead(trained, tmp_path, capsys):
    """The kohya file holds no peft adapter config; the error names its own source, and
    exporting that source gives the kohya file's tensors back."""
    kohya_file = trained / f"{NAME}.safetensors"
    assert main(["export", str(kohya_file)]) == 2
    err = only_export_error(capsys, kohya_file)
    assert err.rstrip().endswith(f"sdlora export {trained / WEIGHTS_NAME}")

    # A run with output.format = "kohya": no diffusers file, its checkpoint is named.
    kohya_run = tmp_path / "kohya-run"
    shutil.copytree(trained / "checkpoints", kohya_run / "checkpoints")
    alone = kohya_run / kohya_file.name
    shutil.copy(kohya_file, alone)
    assert main(["export", str(alone)]) == 2
    named = kohya_run / "checkpoints" / "step-000003"
    assert only_export_error(capsys, alone).rstrip().endswith(f"sdlora export {named}")
    assert main(["export", str(named), "--format", "kohya", "--out", str(tmp_path / "again")]) == 0
    again = load_file(tmp_path / "again" / f"{NAME}-step00000003.safetensors")
    given = load_file(kohya_file)
    assert again.keys() == given.keys() and all(torch.equal(again[k], given[k]) for k in given)

    # A checkpoint's export: the diffusers file beside it.
    assert main(["export", str(trained / "checkpoints" / "step-000002")]) == 0
    capsys.readouterr()
    exported = trained / "export" / "step-000002"
    step_file = exported / f"{NAME}-step00000002.safetensors"
    assert main(["export", str(step_file)]) == 2
    assert (
        only_export_error(capsys, step_file)
        .rstrip()
        .endswith(f"sdlora export {exported / WEIGHTS_NAME}")
    )

    lone = tmp_path / "lone" / kohya_file.name  # copied away from everything
    lone.parent.mkdir()
    shutil.copy(kohya_file, lone)
    assert main(["export", str(lone)]) == 2
    err = only_export_error(capsys, lone)
    assert "none is beside it" in err and WEIGHTS_NAME in err and "checkpoints/step-" in err
    assert sorted(p.name for p in lone.parent.iterdir()) == [lone.name]


def without_alpha(trained, folder):
    """The run's diffusers file with an adapter config that records no alpha: the kohya
    file cannot be written, which is found only while writing."""
    meta = header(trained / WEIGHTS_NAME)
    adapters = json.loads(meta["lora_adapter_metadata"])
    meta["lora_adapter_metadata"] = json.dumps(
        {k: v for k, v in adapters.items() if not k.endswith("lora_alpha")}
    )
    folder.mkdir()
    save_file(load_file(trained / WEIGHTS_NAME), str(folder / WEIGHTS_NAME), metadata=meta)
    return folder / WEIGHTS_NAME


def test_a_failed_export_leaves_no_folder_it_created(trained, tmp_path, capsys):
    source = without_alpha(trained, tmp_path / "source")
    out = tmp_path / "new" / "deeper"
    assert main(["export", str(source), "--format", "kohya", "--out", str(out)]) == 2
    assert "lora_alpha" in only_export_error(capsys, source)
    assert not (tmp_path / "new").exists()
    assert main(["export", str(source)]) == 2  # the default --out, SOURCE/export
    capsys.readouterr()
    assert sorted(p.name for p in source.parent.iterdir()) == [WEIGHTS_NAME]

    existing = tmp_path / "existing"  # a folder the user made stays, empty as it was
    existing.mkdir()
    assert main(["export", str(source), "--out", str(existing)]) == 2
    capsys.readouterr()
    assert existing.is_dir() and list(existing.iterdir()) == []


def test_an_interrupted_export_leaves_no_folder_it_created(trained, tmp_path, monkeypatch):
    from trainer.lora import outputs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "write_lora_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["export", str(trained), "--out", str(tmp_path / "new" / "out")])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- which formats each type gets

MODULE = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
# The tensors of one module of each adapter type (peft's names, the tiny model's width 32).
TYPE_TENSORS = {
    ("lora", "input"): {"lora_A.weight": (4, 32), "lora_B.weight": (32, 4)},
    ("dora", "input"): {
        "lora_A.weight": (4, 32),
        "lora_B.weight": (32, 4),
        "lora_magnitude_vector": (1, 32),
    },
    ("dora", "output"): {
        "lora_A.weight": (4, 32),
        "lora_B.weight": (32, 4),
        "lora_magnitude_vector": (32,),
    },
    ("loha", "input"): {
        "hada_w1_a": (32, 4),
        "hada_w1_b": (4, 32),
        "hada_w2_a": (32, 4),
        "hada_w2_b": (4, 32),
    },
    ("lokr", "input"): {"lokr_w1": (4, 4), "lokr_w2_a": (8, 4), "lokr_w2_b": (4, 8)},
}
# docs/adapters.md, "Files and clients": the formats each type is written in.
WRITTEN_IN = {
    ("lora", "input"): {"diffusers", "kohya", "both"},
    ("dora", "input"): {"kohya", "both"},
    ("dora", "output"): {"diffusers"},
    ("loha", "input"): {"kohya", "both"},
    ("lokr", "input"): {"kohya", "both"},
}


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "both"])
@pytest.mark.parametrize("kind", list(TYPE_TENSORS), ids="-".join)
def test_training_and_export_write_each_type_in_the_same_formats(
    trained, make_config, tmp_path, capsys, kind, fmt
):
    from trainer.config.load import ConfigError

    adapter_type, axis = kind
    sets = [f"lora.type={adapter_type}", f"output.format={fmt}"]
    if adapter_type == "dora":
        sets.append(f"lora.dora_axis={axis}")
    try:
        make_config(*sets)
        trains = True
    except ConfigError as err:
        trains = False
        assert "output.format" in str(err)

    source = tmp_path / "source"
    source.mkdir()
    state = {f"{MODULE}.{name}": torch.randn(shape) for name, shape in TYPE_TENSORS[kind].items()}
    meta = header(trained / WEIGHTS_NAME)
    meta["lora_adapter_metadata"] = json.dumps({"unet.r": 4, "unet.lora_alpha": 8.0})
    save_file(state, str(source / WEIGHTS_NAME), metadata=meta)
    out = tmp_path / "out"
    code = main(["export", str(source), "--format", fmt, "--out", str(out), "--name", "t"])
    captured = capsys.readouterr()

    assert trains == (fmt in WRITTEN_IN[kind])
    assert (code == 0) == trains, captured.err
    if trains:
        expected = {"diffusers": [WEIGHTS_NAME], "kohya": ["t.safetensors"]}
        names = expected.get(fmt, [WEIGHTS_NAME, "t.safetensors"])
        assert sorted(p.name for p in out.iterdir()) == sorted(names)
    else:
        assert captured.err.startswith(f"error: {source / WEIGHTS_NAME}: --format {fmt} ")
        assert "Traceback" not in captured.err and not out.exists()
        assert all(f"--format {f}" in captured.err for f in WRITTEN_IN[kind])
