"""Dataset formats, the bad-input matrix, buckets, and tag shuffling."""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.config.load import DataConfig
from trainer.data import buckets, images
from trainer.data import dataset as data


def png(path: Path, size=(64, 64), colour=(200, 30, 30), mode="RGB") -> Path:
    Image.new(mode, size, colour).save(path)
    return path


def kohya(folder: Path, n: int = 3, size=(64, 64)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        png(folder / f"{i}.png", size)
        (folder / f"{i}.txt").write_text(f"caption {i}")
    return folder


def cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), resolution=64, **kw)


def problems(folder: Path, **kw) -> str:
    config = cfg(folder, **kw)
    with pytest.raises(data.DataError) as err:
        data.prepare(data.find_records(config), config, show_progress=False)
    return str(err.value)


# ---------------------------------------------------------------- formats


def test_kohya_layout_with_repeat_folders_and_caption_extension(tmp_path):
    kohya(tmp_path / "ds", 2)
    sub = kohya(tmp_path / "ds" / "3_cats", 1)
    (sub / "0.txt").rename(sub / "0.caption")
    records = data.find_records(cfg(tmp_path / "ds"))
    assert [r.caption for r in records] == ["caption 0", "caption 1"] + ["caption 0"] * 3
    assert records[-1].path == sub / "0.png"


def test_imagefolder_jsonl_and_csv(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    png(folder / "a.png")
    png(folder / "b.png")
    rows = [{"file_name": "a.png", "text": "an apple"}, {"file_name": "b.png", "text": "a bee"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = [(r.path.name, r.caption) for r in data.find_records(cfg(folder))]
    assert got == [("a.png", "an apple"), ("b.png", "a bee")]
    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_text("file_name,text\na.png,an apple\nb.png,a bee\n")
    assert [(r.path.name, r.caption) for r in data.find_records(cfg(folder))] == got


def test_tiny_dataset_script_writes_both_layouts(tmp_path):
    from make_tiny_dataset import make_tiny_dataset

    for layout in ("kohya", "imagefolder"):
        folder = make_tiny_dataset(tmp_path / layout, count=4, layout=layout)
        records = data.find_records(cfg(folder))
        assert len(records) == 4 and all(r.caption.startswith("a ") for r in records)


# ---------------------------------------------------------------- the bad-input matrix


@pytest.fixture
def good(tmp_path) -> Path:
    return kohya(tmp_path / "ds", 2)


def add(folder: Path, name: str, payload: bytes | None = None, caption: bytes | None = b"x"):
    path = folder / name
    if payload is not None:
        path.write_bytes(payload)
    if caption is not None:
        path.with_suffix(".txt").write_bytes(caption)
    return path


def png_bytes(size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_truncated_image_is_named(good):
    bad = add(good, "cut.png", png_bytes()[:400])
    message = problems(good)
    assert str(bad) in message and "truncated" in message


def test_corrupt_image_is_named(good):
    payload = bytearray(png_bytes())
    payload[100:160] = b"\x00" * 60  # a damaged chunk inside a valid PNG header
    bad = add(good, "corrupt.png", bytes(payload))
    message = problems(good)
    assert str(bad) in message and "corrupt" in message


def test_zero_byte_file_is_named(good):
    bad = add(good, "empty.png", b"")
    message = problems(good)
    assert str(bad) in message and "0 bytes" in message


def test_non_image_with_image_extension_is_named(good):
    bad = add(good, "notes.jpg", b"these are my notes, not a photo\n")
    message = problems(good)
    assert str(bad) in message and "not an image" in message


def test_image_smaller_than_the_resolution_is_named(good):
    bad = png(good / "small.png", (40, 40))
    (good / "small.txt").write_text("small")
    message = problems(good)
    assert str(bad) in message and "smaller than the training size 64×64" in message
    assert "data.max_upscale" in message
    # allowed when upscaling is allowed
    config = cfg(good, max_upscale=2.0)
    assert len(data.prepare(data.find_records(config), config, show_progress=False).examples) == 3


def test_missing_caption_is_named(good):
    bad = png(good / "uncaptioned.png")
    message = problems(good)
    assert str(bad) in message and "no caption file" in message


def test_empty_caption_is_named(good):
    add(good, "blank.png", png_bytes(), caption=b"  \n")
    message = problems(good)
    assert str(good / "blank.txt") in message and "empty caption" in message


def test_non_utf8_caption_is_named(good):
    add(good, "latin1.png", png_bytes(), caption="café".encode("latin-1"))
    message = problems(good)
    assert str(good / "latin1.txt") in message and "UTF-8" in message


def test_empty_folder_and_folder_without_images(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataError, match="is empty"):
        data.find_records(cfg(empty))
    (empty / "readme.txt").write_text("no pictures here")
    with pytest.raises(data.DataError, match="holds no images"):
        data.find_records(cfg(empty))
    with pytest.raises(data.DataError, match="not a folder"):
        data.find_records(cfg(tmp_path / "missing"))


def test_error_policy_lists_every_bad_file_at_once(good):
    names = [add(good, "a.png", b""), add(good, "b.jpg", b"text"), png(good / "c.png")]
    message = problems(good)
    assert "3 unusable file(s)" in message and 'on_bad_image = "skip"' in message
    assert all(str(p) in message for p in names)


def test_skip_policy_trains_without_bad_files(good):
    add(good, "a.png", b"")
    config = cfg(good, on_bad_image="skip")
    prepared = data.prepare(data.find_records(config), config, show_progress=False)
    assert len(prepared.examples) == 2
    assert len(prepared.skipped) == 1 and "a.png" in prepared.skipped[0]


def test_skip_policy_run_writes_the_skipped_list(make_config, tiny_data, tmp_path):
    from trainer.run import loop

    folder = tmp_path / "data"
    shutil.copytree(tiny_data, folder)
    add(folder, "broken.png", b"")
    out = tmp_path / "out"
    loop.run(
        make_config(
            f'data.path="{folder}"', 'data.on_bad_image="skip"', "train.max_steps=1", output=out
        )
    )
    assert "broken.png" in (out / "skipped_images.txt").read_text()


def test_cli_reports_bad_data_without_a_traceback(tiny_model, tiny_data, tmp_path, capsys):
    from trainer.commands.cli import main

    folder = tmp_path / "data"
    shutil.copytree(tiny_data, folder)
    add(folder, "broken.png", b"")
    code = main(
        [
            "train",
            "--config",
            "configs/tiny.toml",
            "--set",
            f'model.pretrained="{tiny_model}"',
            "--set",
            f'data.path="{folder}"',
            "--set",
            f'output_dir="{tmp_path / "out"}"',
            "--set",
            'logging.tracker="none"',
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "broken.png" in err and "Traceback" not in err


# ---------------------------------------------------------------- odd but valid images


def test_rgba_is_composited_onto_white(tmp_path):
    path = tmp_path / "alpha.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(path)  # fully transparent red
    image, note = images.open_rgb(path)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)
    assert "alpha" in note


def test_palette_with_transparency_and_plain_palette(tmp_path):
    plain = tmp_path / "p.png"
    Image.new("RGB", (8, 8), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(plain)
    image, note = images.open_rgb(plain)
    assert image.getpixel((0, 0)) == (10, 200, 30) and "palette" in note
    transparent = tmp_path / "pt.png"
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0] * 256)
    p.save(transparent, transparency=0)
    assert images.open_rgb(transparent)[0].getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    array = np.full((8, 8), 32768, dtype=np.uint16)
    Image.fromarray(array).save(path)
    image, note = images.open_rgb(path)
    assert image.getpixel((0, 0)) == (128, 128, 128) and "8-bit" in note


def test_cmyk_jpeg_is_converted(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    image, note = images.open_rgb(path)
    r, g, b = image.getpixel((4, 4))
    assert image.mode == "RGB" and r > 200 and g < 50 and b < 50 and "CMYK" in note


def test_exif_rotation_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.new("RGB", (40, 20), (0, 0, 255)).save(path, exif=exif)
    image, note = images.open_rgb(path)
    assert image.size == (20, 40) and "EXIF" in note


# ---------------------------------------------------------------- buckets and tags


def test_bucket_sizes_respect_area_grid_and_limits():
    sizes = buckets.bucket_sizes(512, 64, 256, 1024)
    assert (512, 512) in sizes
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in sizes)
    assert all(256 <= s <= 1024 for size in sizes for s in size)
    # Every grid size, not only the largest per aspect ratio: an image just under 512 px
    # needs the smaller 448×448 square, or it would be cut to a non-square bucket.
    assert (448, 448) in sizes and (256, 256) in sizes
    assert len(sizes) == sum(
        1 for w in range(256, 1025, 64) for h in range(256, 1025, 64) if w * h <= 512 * 512
    )


def test_assign_picks_the_closest_aspect_without_upscaling():
    sizes = buckets.bucket_sizes(512, 64, 256, 1024)
    assert buckets.assign((1024, 1024), sizes, 1.0) == (512, 512)
    w, h = buckets.assign((1200, 800), sizes, 1.0)
    assert w > h and abs(w / h - 1.5) < 0.15
    assert buckets.assign((100, 100), sizes, 1.0) is None


def test_buckets_group_a_dataset_deterministically(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    shapes = [(96, 64), (64, 96), (64, 64), (96, 64), (64, 96), (64, 64)]
    for i, size in enumerate(shapes):
        png(folder / f"{i}.png", size)
        (folder / f"{i}.txt").write_text("x")
    config = DataConfig(path=str(folder), resolution=64, buckets=True, bucket_step=8)
    first = data.prepare(data.find_records(config), config, show_progress=False)
    again = data.prepare(data.find_records(config), config, show_progress=False)
    assert first.groups == again.groups and first.sizes == again.sizes
    by_index = {i: first.sizes[g] for g, group in enumerate(first.groups) for i in group}
    assert by_index[0] == by_index[3] and by_index[0][0] > by_index[0][1]
    assert by_index[1] == by_index[4] and by_index[1][0] < by_index[1][1]
    assert by_index[2] == by_index[5] == (64, 64)


def test_shuffle_tags_keeps_the_leading_tokens():
    caption = "sks dog, red, sitting, grass, sunny"
    shuffled = {data.shuffle_tags(caption, 1, random.Random(s)) for s in range(20)}
    assert all(s.startswith("sks dog, ") for s in shuffled)
    assert len(shuffled) > 1
    assert all(sorted(s.split(", ")) == sorted(caption.split(", ")) for s in shuffled)
