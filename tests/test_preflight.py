"""Every problem a config can have is refused in seconds, before any model weights are read,
with the key or file named, and never as a traceback.

"Before any model weights are read" is proven twice: the model path points at a folder whose
weights are destroyed (loading it would fail with a different error), and the loader itself
is made to fail, so only an error found first can be the one raised.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from trainer.commands import cli
from trainer.config.load import ConfigError
from trainer.data.dataset import DataError
from trainer.models import load as models
from trainer.run import loop

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def broken_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model's configs with every weights file destroyed."""
    folder = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(tiny_model, folder)
    for weights in folder.rglob("*.safetensors"):
        weights.write_bytes(b"not weights")
    return folder


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("model weights were read before the config error was found")

    monkeypatch.setattr(models, "load_components", refuse)


def problems(config) -> list[str]:
    with pytest.raises(ConfigError) as err:
        loop.run(config)
    return err.value.problems


LATE = {
    # With max_steps = 0 the run length comes from the dataset (16 images here).
    "warmup longer than the derived run": (
        ["train.max_steps=0", "train.epochs=1", "lr_scheduler.warmup_steps=50"],
        "lr_scheduler.warmup_steps: 50 warmup updates is not shorter than the run (2 updates)",
    ),
    "batch larger than the dataset": (
        ["train.max_steps=0", "train.batch_size=32"],
        "train.batch_size: 16 examples cannot fill one batch of 32",
    ),
    "accumulation larger than an epoch": (
        ["train.max_steps=0", "train.epochs=1", "train.gradient_accumulation_steps=8"],
        "train.epochs: 1 epoch(s) of 4 micro-batches make no update",
    ),
    "a LoRA target that matches nothing": (
        ['lora.target_modules=["to_q", "nope"]'],
        "lora.target_modules: 'nope' match no module of the UNet2DConditionModel; valid names "
        "include ",
    ),
    "a text-encoder target that matches nothing": (
        ["lora.train_text_encoder=true", 'lora.text_encoder_target_modules=["q_prj"]'],
        "lora.text_encoder_target_modules: 'q_prj' match no module of the CLIPTextModel",
    ),
}


@pytest.mark.parametrize("case", list(LATE), ids=list(LATE))
def test_late_config_errors_come_before_any_model_load(
    case, make_config, broken_model, no_model_load
):
    overrides, expected = LATE[case]
    found = problems(make_config(f'model.pretrained="{broken_model}"', *overrides))
    assert any(p.startswith(expected) for p in found), found


def test_valid_names_are_listed_for_a_bad_target(make_config, no_model_load):
    (problem,) = problems(make_config('lora.target_modules=["nope"]'))
    for name in ("to_q", "to_k", "to_out.0", "proj_in"):
        assert name in problem


def test_every_problem_is_reported_at_once(make_config, broken_model, no_model_load):
    found = problems(
        make_config(
            f'model.pretrained="{broken_model}"',
            'lora.target_modules=["nope"]',
            "train.max_steps=0",
            "train.batch_size=32",
        )
    )
    assert len(found) == 2 and "lora.target_modules" in found[0] and "train.batch_size" in found[1]


def test_a_missing_local_path_is_called_a_missing_path(make_config, tmp_path, no_model_load):
    (problem,) = problems(make_config(f'model.pretrained="{tmp_path / "no" / "such" / "model"}"'))
    assert "no such folder" in problem and "hub" not in problem


def test_a_relative_path_that_may_be_a_hub_id_names_both(make_config, no_model_load):
    (problem,) = problems(make_config('model.pretrained="tiny/modle"'))
    assert "no such folder" in problem and "not in the local cache" in problem


def test_a_folder_that_is_not_a_diffusers_model_says_what_it_lacks(
    make_config, tmp_path, no_model_load
):
    (tmp_path / "photos").mkdir()
    (problem,) = problems(make_config(f'model.pretrained="{tmp_path / "photos"}"'))
    assert "not a diffusers Stable Diffusion model" in problem and "unet/config.json" in problem


def test_an_unreachable_hub_is_reported_at_once(make_config, monkeypatch, no_model_load):
    # A closed local port: the lookup fails at once instead of being retried for minutes.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    # conftest set HF_HUB_OFFLINE=1 before huggingface_hub read it: without this, the lookup
    # fails with OfflineModeIsEnabled and no connection is ever tried.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    (problem,) = problems(make_config('model.pretrained="someone/sd-typo"'))
    assert "could not be reached" in problem
    assert "offline" not in problem.split("(", 1)[1].split(")")[0].lower(), "no connection tried"


def test_output_dir_that_is_a_file(make_config, tmp_path, no_model_load):
    target = tmp_path / "taken"
    target.write_text("a file")
    (problem,) = problems(make_config(output=target))
    assert problem == f"output_dir = {str(target)!r}: is a file, not a folder; choose a folder path"


def test_an_unusable_output_dir_is_reported_with_the_models_and_datas_problems(
    make_config, tmp_path, no_model_load
):
    target = tmp_path / "taken"
    target.write_text("a file")
    found = problems(
        make_config(
            f'model.pretrained="{tmp_path / "no-model"}"',
            f'data.path="{tmp_path / "no-data"}"',
            output=target,
        )
    )
    assert len(found) == 3, found
    assert found[0].startswith("output_dir = ")
    assert any(p.startswith("model.pretrained") for p in found)
    assert any("no-data" in p for p in found)


def test_a_refused_start_is_reported_with_the_other_problems(make_config, tmp_path, no_model_load):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-000002").mkdir(parents=True)  # a fresh start is refused here
    found = problems(make_config('lora.target_modules=["no_such_layer"]', output=out))
    assert len(found) == 2, found
    assert any("checkpoints" in p for p in found) and any("no_such_layer" in p for p in found)


def test_output_dir_under_a_file(make_config, tmp_path, no_model_load):
    (tmp_path / "taken").write_text("a file")
    (problem,) = problems(make_config(output=tmp_path / "taken" / "run"))
    assert "cannot be created" in problem and "is a file" in problem


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_dir_that_is_not_writable(make_config, tmp_path, no_model_load):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    (problem,) = problems(make_config(output=locked / "run"))
    assert "cannot write into it" in problem


# ---------------------------------------------------------------- absurd input


def test_an_absurd_run_length_is_refused(make_config):
    with pytest.raises(ConfigError, match=r"train.max_steps: 1,000,000,000,000 updates is beyond"):
        make_config("train.max_steps=1000000000000")


def test_empty_validation_prompts_are_refused(make_config):
    with pytest.raises(ConfigError, match=r"validation.prompts\[1\]: empty prompt"):
        make_config('validation.prompts=["a red circle", "  "]')


def make_data(tmp_path: Path, tiny_data: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    return data


def test_a_huge_caption_file_is_bad_input_not_a_memory_blowup(
    make_config, tiny_data, tmp_path, no_model_load
):
    data = make_data(tmp_path, tiny_data)
    (data / "img_000.txt").write_text("red " * 2_500_000)  # 10 MB
    # Data problems are reported with the config's, in the same block.
    with pytest.raises(ConfigError) as err:
        loop.run(make_config(f'data.path="{data}"'))
    assert "img_000.txt: 10,000,000 bytes is not a caption" in str(err.value)


def test_a_long_caption_is_cut_with_one_warning(make_config, tiny_data, tmp_path, caplog):
    data = make_data(tmp_path, tiny_data)
    (data / "img_000.txt").write_text("a red circle " * 40)
    with caplog.at_level("WARNING", logger="sdlora"):
        loop.run(make_config(f'data.path="{data}"', "train.max_steps=1"))
    lines = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
    # ...and the tokenizer's own warning about the same captions is not a second line.
    assert len(lines) == 1 and lines[0].startswith("1 caption(s) are longer than the text")


def test_a_data_folder_linked_into_itself_is_read_once(make_config, tiny_data, tmp_path, caplog):
    from trainer.data.feed import checked_examples

    data = make_data(tmp_path, tiny_data)
    (data / "again").symlink_to(data, target_is_directory=True)
    with caplog.at_level("WARNING", logger="sdlora"):
        prepared, _ = checked_examples(make_config(f'data.path="{data}"'))
    assert len(prepared.examples) == 16
    assert "already read" in caplog.text


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_broken_image_links_are_reported_by_name(make_config, tiny_data, tmp_path, kind):
    from trainer.data.feed import checked_examples

    data = make_data(tmp_path, tiny_data)
    link = data / "broken.png"
    (data / "broken.txt").write_text("a caption")
    link.symlink_to(data / "moved-away.png" if kind == "dangling" else link)
    with pytest.raises(DataError) as err:
        checked_examples(make_config(f'data.path="{data}"'))
    expected = "which does not exist" if kind == "dangling" else "a symbolic link loop"
    assert f"{link}: " in str(err.value) and expected in str(err.value)


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares a size without the pixels (what a header reader sees)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_a_huge_image_is_called_too_large_not_corrupt(make_config, tiny_data, tmp_path):
    from trainer.data.feed import checked_examples

    data = make_data(tmp_path, tiny_data)
    png_header_only(data / "img_000.png", 20000, 20000)
    with pytest.raises(DataError) as err:
        checked_examples(make_config(f'data.path="{data}"'))
    message = str(err.value)
    assert "img_000.png: 400 megapixels, beyond the" in message and "corrupt" not in message


# ---------------------------------------------------------------- no tracebacks


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (['lora.target_modules=["nope"]'], "lora.target_modules"),
        (["train.max_steps=1000000000000"], "train.max_steps"),
        (['validation.prompts=[""]'], "validation.prompts[0]"),
        (["train.max_steps=0", "train.batch_size=64"], "train.batch_size"),
    ],
)
def test_cli_prints_one_error_block_and_exits_2(
    overrides, expected, tiny_model, tiny_data, tmp_path, capsys
):
    sets = [f'model.pretrained="{tiny_model}"', f'data.path="{tiny_data}"']
    sets += [f'output_dir="{tmp_path / "out"}"', *overrides]
    args = ["train", "--config", str(REPO / "configs" / "tiny.toml")]
    code = cli.main([*args, *[x for s in sets for x in ("--set", s)]])
    err = capsys.readouterr().err
    assert code == 2 and "\nerror: " in f"\n{err}" and expected in err


@pytest.mark.slow
@pytest.mark.parametrize(
    "make_overrides, expected",
    [
        (lambda tmp: ['lora.target_modules=["nope"]'], "lora.target_modules"),
        (lambda tmp: [f'output_dir="{tmp / "file"}"'], "is a file, not a folder"),
    ],
    ids=["target", "output_dir"],
)
def test_train_py_refuses_without_a_traceback(
    make_overrides, expected, tiny_model, tiny_data, tmp_path
):
    (tmp_path / "file").write_text("x")
    sets = [f'model.pretrained="{tiny_model}"', f'data.path="{tiny_data}"']
    sets += [f'output_dir="{tmp_path / "out"}"', *make_overrides(tmp_path)]
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.toml"]
    cmd += [x for s in sets for x in ("--set", s)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and expected in done.stderr


def test_images_alone_in_a_bucket_smaller_than_a_batch_are_named_in_a_warning(
    make_config, tiny_data, tmp_path
):
    from PIL import Image

    from trainer.run import preflight

    data = make_data(tmp_path, tiny_data)
    Image.new("RGB", (160, 64), "red").save(data / "wide.png")
    (data / "wide.txt").write_text("a wide red image")
    cfg = make_config(f'data.path="{data}"', "data.buckets=true", "data.bucket_step=8")
    checked = preflight.check(cfg, num_processes=1, show_progress=False)
    (warning,) = checked.warnings
    assert warning.startswith("1 image(s) sit in 1 aspect bucket(s) holding fewer than one batch")
