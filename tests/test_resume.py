"""Exact resume: a run stopped anywhere and resumed ends with the same LoRA, bit for bit.

The reference is always another run: the same config trained without interruption.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import without_clock
from safetensors.torch import load_file

from trainer import files
from trainer.config.load import ConfigError, build
from trainer.lora.files import WEIGHTS_NAME
from trainer.models import load as models
from trainer.report.tracking import read_metrics
from trainer.run import checkpoint as ckpt
from trainer.run import loop, preflight
from trainer.run.resume import check_resumable, comparable_config, data_change

# Every source of randomness on: random crops, flips, caption dropout, LoRA dropout, noise
# offset. 16 images / batch 2 = 8 micro-batches per epoch; accumulation 3 makes updates
# straddle epochs, so checkpoints land mid-epoch and mid-way through an accumulation cycle.
EXACT = (
    "train.max_steps=8",
    "train.batch_size=2",
    "train.gradient_accumulation_steps=3",
    "train.noise_offset=0.05",
    "data.center_crop=false",
    "data.random_flip=true",
    "data.caption_dropout=0.2",
    "lora.dropout=0.1",
    'lora.save_dtype="fp32"',
    "checkpoint.every_n_steps=3",
)


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS_NAME)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.fixture(scope="module")
def reference(tiny_config, tmp_path_factory):
    """The uninterrupted run: 8 updates with checkpoints at 3 and 6 (and 8 at the end)."""
    out = tmp_path_factory.mktemp("reference")
    loop.run(tiny_config(out, *EXACT))
    return out


def test_checkpoints_hold_the_documented_files(reference):
    folders = ckpt.list_checkpoints(reference)
    assert [f.name for f in folders] == ["step-000003", "step-000006", "step-000008"]
    names = {p.name for p in folders[0].iterdir()}
    assert {
        WEIGHTS_NAME,
        "lr_scheduler.json",
        "trainer_state.json",
        "optimizer.pt",
        "config.toml",
    } <= names
    state = json.loads((folders[0] / "trainer_state.json").read_text())
    # update 3 ends after micro-batch 9 = epoch 1, position 1 (8 micro-batches per epoch)
    assert (state["global_step"], state["epoch"], state["position_in_epoch"]) == (3, 1, 1)
    assert state["samples_seen"] == 18
    lr_state = json.loads((folders[0] / "lr_scheduler.json").read_text())
    assert lr_state["step"] == 3 and lr_state["total_steps"] == 8
    metrics = read_metrics(reference)
    assert lr_state["last_lrs"] == metrics[2]["lr"]
    assert (reference / "lr_scheduler.json").is_file()


def test_resume_mid_epoch_with_accumulation_is_bitwise_exact(reference, make_config, tmp_path):
    out = tmp_path / "resumed"
    start = ckpt.step_dir(reference, 3)
    loop.run(make_config(*EXACT, f'checkpoint.resume="{start}"', output=out))
    assert_bitwise_equal(weights(out), weights(reference))
    ours, theirs = without_clock(read_metrics(out)), without_clock(read_metrics(reference))
    assert [r["step"] for r in ours] == [4, 5, 6, 7, 8]
    assert ours == theirs[3:]  # same losses and LRs at every update, to the bit


def test_resuming_a_resumed_run_counts_from_the_true_global_step(reference, make_config, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    loop.run(
        make_config(*EXACT, f'checkpoint.resume="{ckpt.step_dir(reference, 3)}"', output=first)
    )
    # `first` wrote its own step-6 checkpoint; resume from it in a third output folder.
    state = json.loads((ckpt.step_dir(first, 6) / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    loop.run(make_config(*EXACT, f'checkpoint.resume="{ckpt.step_dir(first, 6)}"', output=second))
    assert_bitwise_equal(weights(second), weights(reference))
    assert without_clock(read_metrics(second)) == without_clock(read_metrics(reference))[6:]


def test_crash_during_save_keeps_the_last_good_checkpoint(
    reference, make_config, tmp_path, monkeypatch
):
    out = tmp_path / "crashy"
    real_save = ckpt.save_tensors_state
    calls = []

    def dies_on_second_save(path, state):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing the step-6 checkpoint")
        real_save(path, state)

    monkeypatch.setattr(ckpt, "save_tensors_state", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        loop.run(make_config(*EXACT, output=out))
    monkeypatch.setattr(ckpt, "save_tensors_state", real_save)
    assert (out / "checkpoints" / "step-000006.tmp").is_dir()
    assert ckpt.find_latest(out) == ckpt.step_dir(out, 3)

    loop.run(make_config(*EXACT, 'checkpoint.resume="latest"', output=out))
    assert not (out / "checkpoints" / "step-000006.tmp").exists()
    assert_bitwise_equal(weights(out), weights(reference))
    assert without_clock(read_metrics(out)) == without_clock(read_metrics(reference))


def test_changed_schedule_is_refused_with_a_diff(reference, make_config, tmp_path):
    start = ckpt.step_dir(reference, 3)
    cfg = make_config(
        *EXACT, 'lr_scheduler.name="linear"', f'checkpoint.resume="{start}"', output=tmp_path / "x"
    )
    with pytest.raises(ConfigError) as err:
        loop.run(cfg)
    text = str(err.value)
    assert "lr_scheduler.name: 'cosine' (checkpoint) → 'linear' (now)" in text
    assert "--allow-change" in text


def test_allowed_schedule_change_continues_on_the_new_curve_at_the_true_step(
    reference, make_config, tmp_path
):
    out = tmp_path / "changed"
    start = ckpt.step_dir(reference, 3)
    cfg = make_config(
        *EXACT,
        'lr_scheduler.name="linear"',
        f'checkpoint.resume="{start}"',
        'checkpoint.allow_change=["lr_scheduler"]',
        output=out,
    )
    loop.run(cfg)
    lrs = [r["lr"][0] for r in read_metrics(out)]
    # Update k (1-based) applies schedule index k-1: the curve is not restarted from 0.
    expected = [cfg.lr_scheduler.lr(k - 1, 8, cfg.train.learning_rate) for k in range(4, 9)]
    assert lrs == expected


def test_raising_max_steps_continues_without_restarting_warmup(reference, make_config, tmp_path):
    out = tmp_path / "longer"
    done = ckpt.step_dir(reference, 8)
    # Resuming the finished run unchanged trains nothing: it only writes the final outputs.
    result = loop.run(make_config(*EXACT, f'checkpoint.resume="{done}"', output=out))
    assert result.already_complete and result.updates == 8
    assert_bitwise_equal(weights(out), weights(reference))
    more = [*EXACT[1:], "train.max_steps=12", f'checkpoint.resume="{done}"']
    cfg = make_config(*more, 'checkpoint.allow_change=["max_steps"]', output=out)
    loop.run(cfg)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [9, 10, 11, 12]
    expected = [cfg.lr_scheduler.lr(k - 1, 12, cfg.train.learning_rate) for k in range(9, 13)]
    assert [r["lr"][0] for r in records] == expected
    assert all(lr > 0 for lr in expected[:-1])


# [lora] changes that make the checkpoint's tensors not fit the adapters built now (each one,
# let through, failed after the models loaded: a shape or key-set mismatch in lora.load_into).
ADAPTER_CHANGES = {
    "lora.rank": ("lora.rank=8", "4 (checkpoint) → 8 (now)"),
    "lora.type": ('lora.type="dora"', "'lora' (checkpoint) → 'dora' (now)"),
    "lora.target_modules": (
        'lora.target_modules=["to_q","to_k"]',
        "(checkpoint) → ['to_q', 'to_k']",
    ),
    "lora.train_text_encoder": ("lora.train_text_encoder=true", "False (checkpoint) → True (now)"),
}


@pytest.fixture
def no_model_load(monkeypatch):
    """Make any model load fail, so a test proves none happened."""

    def refuse(*args, **kwargs):
        raise AssertionError("the models were loaded")

    monkeypatch.setattr(models, "load_components", refuse)


@pytest.mark.parametrize("key", list(ADAPTER_CHANGES))
def test_an_adapter_shape_change_is_refused_before_any_model_loads_even_when_allowed(
    reference, make_config, tmp_path, no_model_load, key
):
    change, shown = ADAPTER_CHANGES[key]
    start = ckpt.step_dir(reference, 3)
    allow = f'checkpoint.allow_change=["{key}"]'
    cfg = make_config(*EXACT, change, f'checkpoint.resume="{start}"', allow, output=tmp_path / "x")
    with pytest.raises(ConfigError) as err:
        loop.run(cfg)
    text = str(err.value)
    assert f"{key}: " in text and shown in text
    assert "cannot change on resume, not even with --allow-change" in text
    assert "start a new run" in text and "--overwrite" in text and "output_dir" in text
    assert "accept the change with" not in text


def test_harmless_lora_changes_stay_allowed_and_resume(reference, make_config, tmp_path):
    # alpha only scales the update, and the same targets in another order get the same
    # adapters: both resume (the weights load), as they did before.
    start = ckpt.step_dir(reference, 6)
    changes = ["lora.alpha=8.0", 'lora.target_modules=["to_out.0","to_v","to_k","to_q"]']
    allow = 'checkpoint.allow_change=["lora.alpha","lora.target_modules"]'
    out = tmp_path / "x"
    result = loop.run(
        make_config(*EXACT, *changes, f'checkpoint.resume="{start}"', allow, output=out)
    )
    assert result.updates == 8 and [r["step"] for r in read_metrics(out)] == [7, 8]


MINIMAL = {"model": {"pretrained": "m"}, "data": {"path": "d"}}


def lora_config(lora: dict) -> dict:
    """A resumable config with this [lora] table (output.* is free to differ on resume)."""
    # Only diffusers reads a DoRA with dora_axis = "output"; only kohya reads LoHa/LoKr.
    written = "diffusers" if lora.get("dora_axis") == "output" else "both"
    return comparable_config(
        build({**MINIMAL, "lora": lora, "output": {"format": written}}).to_dict(), 1
    )


@pytest.mark.parametrize(
    ("before", "after", "refused"),
    [
        ({"type": "dora"}, {"type": "dora", "dora_axis": "output"}, True),
        ({"type": "lokr"}, {"type": "lokr", "factor": 2}, True),
        ({"type": "lokr"}, {"type": "lokr", "decompose_both": True}, True),
        ({"type": "loha"}, {"type": "loha", "conv_tucker": True}, True),
        (
            {"train_text_encoder": True},
            {"train_text_encoder": True, "text_encoder_target_modules": ["q_proj"]},
            True,
        ),
        # no text encoder trained on either side: its target list shapes nothing
        ({}, {"text_encoder_target_modules": ["q_proj"]}, False),
        ({"type": "loha"}, {"type": "loha", "rank_dropout": 0.1}, False),
        ({}, {"dropout": 0.1}, False),
    ],
)
def test_which_lora_keys_can_never_change_on_resume(before, after, refused):
    old, new = lora_config(before), lora_config(after)
    changed = [f"lora.{k}" for k in after if after[k] != before.get(k)]
    if refused:
        with pytest.raises(ConfigError, match="not even with --allow-change"):
            check_resumable(old, new, ["lora"], "ckpt")
    else:
        assert [d[0] for d in check_resumable(old, new, ["lora"], "ckpt")] == changed


# ---------------------------------------------------------------- the images changed


def grown_copy(tiny_data, folder, added: int):
    """A copy of the dataset with ``added`` more images (copies under new names)."""
    shutil.copytree(tiny_data, folder)
    for i, png in enumerate(sorted(folder.glob("*.png"))[:added]):
        shutil.copy(png, folder / f"extra_{i}.png")
        shutil.copy(png.with_suffix(".txt"), folder / f"extra_{i}.txt")
    return folder


def test_images_added_since_the_checkpoint_are_named_and_refused_unless_allowed(
    reference, make_config, tiny_data, tmp_path, no_model_load
):
    data = grown_copy(tiny_data, tmp_path / "data", added=4)
    before, now = len(list(tiny_data.glob("*.png"))), len(list(data.glob("*.png")))
    start = ckpt.step_dir(reference, 3)
    resume = (*EXACT, f'data.path="{data}"', f'checkpoint.resume="{start}"')
    allow = 'checkpoint.allow_change=["data.path"]'  # the folder moved: allowed
    with pytest.raises(ConfigError) as err:
        loop.run(make_config(*resume, allow, output=tmp_path / "x"))
    text = str(err.value)
    assert (
        f"data.path now has {now} training images, the checkpoint was trained on {before}" in text
    )
    assert "From update 3 on, the data order differs" in text and "not bitwise" in text
    assert "--allow-change data.images" in text

    both = 'checkpoint.allow_change=["data.path","data.images"]'
    checked = preflight.check(make_config(*resume, both, output=tmp_path / "y"), 1)
    assert checked.resume_from == start
    warned = "\n".join(checked.warnings)
    assert f"now has {now} training images" in warned and "(allowed)" in warned


def test_changed_captions_with_the_same_count_are_named(
    reference, make_config, tiny_data, tmp_path
):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    caption = sorted(data.glob("*.txt"))[0]
    caption.write_text(caption.read_text() + ", new tag")
    start = ckpt.step_dir(reference, 3)
    cfg = make_config(*EXACT, f'data.path="{data}"', f'checkpoint.resume="{start}"',
                      'checkpoint.allow_change=["data.path"]', output=tmp_path / "x")  # fmt: skip
    with pytest.raises(ConfigError, match="images or captions changed"):
        preflight.check(cfg, 1)
    # Unchanged data in a moved folder resumes without a word about it.
    caption.write_text(caption.read_text().removesuffix(", new tag"))
    checked = preflight.check(cfg, 1)
    assert checked.warnings == [
        f"resume: data.path changed from {str(tiny_data)!r} to {str(data)!r} (allowed)"
    ]


def test_a_resume_on_allowed_new_images_records_them_in_its_checkpoints(
    reference, make_config, tiny_data, tmp_path
):
    data = grown_copy(tiny_data, tmp_path / "data", added=4)
    out = tmp_path / "grown"
    allow = 'checkpoint.allow_change=["data"]'  # the whole table: path and images
    start = ckpt.step_dir(reference, 6)
    loop.run(
        make_config(
            *EXACT, f'data.path="{data}"', f'checkpoint.resume="{start}"', allow, output=out
        )
    )
    state = json.loads((ckpt.step_dir(out, 8) / ckpt.TRAINER_STATE).read_text())
    assert state["data"]["examples"] == len(list(data.glob("*.png")))
    # Resuming that checkpoint on the same grown folder is an ordinary resume again.
    cfg = make_config(*EXACT, f'data.path="{data}"', f'checkpoint.resume="{ckpt.step_dir(out, 8)}"',
                      output=out)  # fmt: skip
    assert preflight.check(cfg, 1).complete


def test_a_checkpoint_from_before_data_records_is_compared_by_its_image_count(
    reference, make_config, tiny_data, tmp_path
):
    old = tmp_path / "old" / ckpt.CHECKPOINTS / "step-000003"
    shutil.copytree(ckpt.step_dir(reference, 3), old)
    state = json.loads((old / ckpt.TRAINER_STATE).read_text())
    del state["data"]  # as written before checkpoints recorded their data
    (old / ckpt.TRAINER_STATE).write_text(json.dumps(state))
    data = grown_copy(tiny_data, tmp_path / "data", added=2)
    cfg = make_config(*EXACT, f'data.path="{data}"', f'checkpoint.resume="{old}"',
                      'checkpoint.allow_change=["data.path"]', output=tmp_path / "x")  # fmt: skip
    with pytest.raises(ConfigError, match=f"trained on {state['run_facts']['image_count']}"):
        preflight.check(cfg, 1)


def test_a_resumed_run_keeps_the_checkpoint_it_resumed_from(reference, make_config, tmp_path):
    out = tmp_path / "pruned"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    shutil.rmtree(ckpt.step_dir(out, 6))
    shutil.rmtree(ckpt.step_dir(out, 8))
    cfg = make_config(*EXACT, "checkpoint.keep_last=1", 'checkpoint.resume="latest"', output=out)
    loop.run(cfg)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000003", "step-000008"]


def test_fresh_start_into_a_folder_with_checkpoints_is_refused(reference, make_config):
    # Another config into the finished run's folder: its checkpoints are not touched.
    with pytest.raises(ConfigError, match="--resume latest"):
        loop.run(make_config(*EXACT, "train.seed=1", output=reference))


def test_checkpoint_with_a_pickle_payload_is_refused(reference, make_config, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this would have run arbitrary code",))

    bad = tmp_path / "bad" / "step-000003"
    shutil.copytree(ckpt.step_dir(reference, 3), bad)
    torch.save({"state": {}, "param_groups": [], "evil": Payload()}, bad / "optimizer.pt")
    # A tampered checkpoint can carry matching records; the safe load must still refuse it.
    state = json.loads((bad / "trainer_state.json").read_text())
    state["files"]["optimizer.pt"] = ckpt.file_record(bad / "optimizer.pt")
    (bad / "trainer_state.json").write_text(json.dumps(state))
    cfg = make_config(*EXACT, f'checkpoint.resume="{bad}"', output=tmp_path / "out")
    with pytest.raises(ckpt.CheckpointError, match="refused to load"):
        loop.run(cfg)


def test_keep_last_prunes_but_never_the_checkpoint_being_resumed(tmp_path):
    for step in (1, 2, 3, 4):
        files.write_folder_atomic(
            ckpt.step_dir(tmp_path, step), lambda d: (d / "trainer_state.json").write_text("{}")
        )
    protect = [ckpt.step_dir(tmp_path, 1)]
    removed = ckpt.prune(tmp_path, keep_last=2, protect=protect)
    assert [p.name for p in removed] == ["step-000002"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "step-000001",
        "step-000003",
        "step-000004",
    ]


def test_a_run_length_derived_from_the_data_says_that_it_changed_too():
    state = {"global_step": 5, "total_updates": 20, "data": {"examples": 16, "sha256": "a"}}
    message = data_change(state, {"examples": 20, "sha256": "b"}, total_updates=25)
    assert "now has 20 training images, the checkpoint was trained on 16" in message
    assert "25 updates now, 20 before" in message
    assert data_change(state, {"examples": 16, "sha256": "a"}, total_updates=20) is None
