"""Mixed precision and attention kernels on a CUDA GPU: skipped on machines without one.

Run on a GPU machine with ``pytest -m cuda`` (or ``pytest tests/test_cuda.py``). Every test
trains the session's tiny model through the public path only (``config.load``,
``loop.run``) and reads what a run writes (``metrics.jsonl`` and the checkpoint files named in
docs/resume.md), so the loop's internals may change freely.

What is pinned down here:
- fp16 trains with a GradScaler whose state (``scaler.json``) goes through a checkpoint
  exactly, every field, and is the live state when saved again;
- an update the GradScaler skips for an fp16 overflow still advances the LR schedule: the LR
  is a function of the loop's own update counter, which counts skipped updates too (see
  docs/gpu.md); and a resumed run does the same;
- the trainable LoRA parameters stay fp32 under fp16 autocast;
- bf16 trains without a scaler;
- xformers and SDPA give the same loss, and xformers' kernel runs at all.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# cuBLAS needs this before its first handle for deterministic matmuls; collection runs before
# any test, so setting it at import is early enough.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# The file layout docs/resume.md and docs/outputs.md document for checkpoints and outputs.
WEIGHTS = "pytorch_lora_weights.safetensors"
SCALER = "scaler.json"
SCALER_KEYS = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}

FP16_CONSTANT = (
    'train.mixed_precision="fp16"',
    "train.gradient_accumulation_steps=1",
    'lr_scheduler.name="constant"',
    "lr_scheduler.warmup_steps=0",
    "checkpoint.every_n_steps=1",
    'lora.save_dtype="fp32"',
)


@pytest.fixture(autouse=True)
def deterministic():
    """Deterministic kernels where CUDA has them, so two runs can be compared closely."""
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def train(make_config, output: Path, *overrides: str) -> Path:
    from trainer.run import loop

    config = make_config(*overrides, output=output)
    result = loop.run(config)
    assert result.updates == config.train.max_steps
    return output


def checkpoint(output: Path, update: int) -> Path:
    return output / "checkpoints" / f"step-{update:06d}"


def lora(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict) -> None:
    """``a`` and ``b`` trained on from ``start`` the same way, up to kernel nondeterminism.

    Some CUDA backward kernels add in a varying order even in deterministic mode, and Adam
    turns a tiny gradient difference near zero into a full-size step, so bitwise equality
    (what the CPU tests check) is not the criterion here. A wrong resume (fresh optimizer
    state, another data position) moves the weights as far as the updates themselves do;
    rounding differences stay below 1% of that distance.
    """
    assert a.keys() == b.keys() == start.keys()

    def norm(x: dict, y: dict) -> float:
        return math.sqrt(sum(float((x[k].double() - y[k].double()).square().sum()) for k in x))

    moved = norm(b, start)
    assert moved > 0, "the resumed updates did not change the weights"
    assert norm(a, b) <= 1e-2 * moved, f"{norm(a, b)} apart after moving {moved}"


def scaler(folder: Path) -> dict:
    return json.loads((folder / SCALER).read_text())


def metrics(output: Path) -> list[dict]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def next_scaler(state: dict, skipped: bool) -> dict:
    """GradScaler's documented update rule, written out as a reference: a skipped (overflowed)
    update multiplies the scale by ``backoff_factor`` and restarts the count of good updates;
    ``growth_interval`` good updates in a row multiply it by ``growth_factor``."""
    state = dict(state)
    if skipped:
        state["scale"] *= state["backoff_factor"]
        state["_growth_tracker"] = 0
    else:
        state["_growth_tracker"] += 1
        if state["_growth_tracker"] == state["growth_interval"]:
            state["scale"] *= state["growth_factor"]
            state["_growth_tracker"] = 0
    return state


def resume_from(folder: Path, where: Path, scaler_state: dict | None = None) -> Path:
    """A copy of a checkpoint (optionally with another scaler state) to resume from."""
    shutil.copytree(folder, where)
    if scaler_state is not None:
        (where / SCALER).write_text(json.dumps(scaler_state))
    return where


def test_fp16_trains_with_a_scaler_and_fp32_lora_parameters(make_config, tmp_path):
    out = train(make_config, tmp_path / "out", *FP16_CONSTANT, "train.max_steps=4")
    assert all(math.isfinite(r["loss"]) for r in metrics(out))
    states = [scaler(checkpoint(out, k)) for k in range(1, 5)]
    for state in states:
        assert set(state) == SCALER_KEYS
        assert isinstance(state["scale"], float) and isinstance(state["_growth_tracker"], int)
    # The optimizer's moment buffers take their parameters' dtype: fp32 means fp32 adapters.
    optimizer = torch.load(checkpoint(out, 4) / "optimizer.pt", weights_only=True)
    moments = [s["exp_avg"] for s in optimizer["state"].values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)


def test_lora_updates_below_fp16_resolution_are_kept(make_config, tmp_path):
    """With fp16 adapters an update smaller than fp16's spacing would round away. At LR 1e-6
    the Gaussian-initialised A matrices (std 1/rank) move by about 1e-6, far below the fp16
    spacing near 0.25 (2.4e-4), and the move must still be there."""
    overrides = (*FP16_CONSTANT, "train.max_steps=3", "train.learning_rate=1e-6")
    out = train(make_config, tmp_path / "out", *overrides)
    kept = 0
    for update in (2, 3):
        before, after = lora(checkpoint(out, update - 1)), lora(checkpoint(out, update))
        if scaler(checkpoint(out, update))["scale"] < scaler(checkpoint(out, update - 1))["scale"]:
            continue  # an overflow skipped this update: nothing moved
        for key in before:
            moved = before[key] != after[key]
            invisible_in_fp16 = before[key].half() == after[key].half()
            kept += int((moved & invisible_in_fp16).sum())
    assert kept > 0, "no sub-fp16 update survived: are the LoRA parameters fp16?"


def test_scaler_state_round_trips_exactly_through_a_checkpoint(make_config, tmp_path):
    overrides = (*FP16_CONSTANT, "train.max_steps=3")
    first = train(make_config, tmp_path / "first", *overrides)
    # Values no default has, so a state that was not loaded (or not saved back) shows.
    odd = {
        "scale": 3072.0,
        "growth_factor": 1.5,
        "backoff_factor": 0.25,
        "growth_interval": 3,
        "_growth_tracker": 1,
    }
    start = resume_from(checkpoint(first, 1), tmp_path / "start", odd)
    resumed = train(make_config, tmp_path / "resumed", *overrides, f'checkpoint.resume="{start}"')
    expected, previous = odd, lora(start)
    for update in (2, 3):
        now = lora(checkpoint(resumed, update))
        expected = next_scaler(expected, skipped=same(previous, now))
        assert scaler(checkpoint(resumed, update)) == expected, f"update {update}"
        previous = now
    # The saved state goes back in exactly too: resuming the resumed run at 2 reproduces 3.
    again = resume_from(checkpoint(resumed, 2), tmp_path / "again")
    third = train(make_config, tmp_path / "third", *overrides, f'checkpoint.resume="{again}"')
    assert scaler(checkpoint(third, 3)) == scaler(checkpoint(resumed, 3))
    close(lora(checkpoint(third, 3)), lora(checkpoint(resumed, 3)), lora(again))


def test_an_update_skipped_by_fp16_overflow_still_advances_the_lr_schedule(make_config, tmp_path):
    base_lr, total = 1e-4, 6
    overrides = (
        *FP16_CONSTANT,
        'lr_scheduler.name="linear"',
        f"train.learning_rate={base_lr}",
        f"train.max_steps={total}",
    )
    plain = train(make_config, tmp_path / "plain", *overrides)
    # From update 2's checkpoint, a scale so large that update 3 must overflow, and a backoff
    # that brings it to 2^10 in one step, so update 4 trains again.
    forced_state = {**scaler(checkpoint(plain, 2)), "scale": 2.0**60, "backoff_factor": 2.0**-50}
    forced = resume_from(checkpoint(plain, 2), tmp_path / "forced", forced_state)
    skipped = train(make_config, tmp_path / "skipped", *overrides, f'checkpoint.resume="{forced}"')

    assert same(lora(checkpoint(skipped, 3)), lora(forced)), "update 3 was not skipped"
    assert scaler(checkpoint(skipped, 3))["scale"] == 2.0**10
    assert not same(lora(checkpoint(skipped, 4)), lora(checkpoint(skipped, 3)))
    optimizer_steps = [
        torch.load(folder / "optimizer.pt", weights_only=True)["state"][0]["step"].item()
        for folder in (forced, checkpoint(skipped, 3), checkpoint(skipped, 4))
    ]
    assert optimizer_steps == [2, 2, 3], "the skipped update must not step AdamW"

    # The LR of update N is the schedule at N - 1, skipped or not: linear, no warmup.
    expected = {n: base_lr * (total - (n - 1)) / total for n in range(1, total + 1)}
    records = metrics(skipped)
    assert [r["step"] for r in records] == [3, 4, 5, 6]
    for record in records:
        assert record["lr"] == [pytest.approx(expected[record["step"]], rel=1e-12)]
    assert [r["lr"] for r in records] == [r["lr"] for r in metrics(plain)[2:]]
    state = json.loads((skipped / "lr_scheduler.json").read_text())
    assert state["step"] == total

    # Resumed right after the skipped update, the run continues exactly as it did.
    after = resume_from(checkpoint(skipped, 3), tmp_path / "after")
    resumed = train(make_config, tmp_path / "resumed", *overrides, f'checkpoint.resume="{after}"')
    assert [r["lr"] for r in metrics(resumed)] == [r["lr"] for r in records[1:]]
    assert scaler(checkpoint(resumed, total)) == scaler(checkpoint(skipped, total))
    close(lora(resumed), lora(skipped), lora(after))


def test_bf16_trains_without_a_scaler_close_to_fp32(make_config, tmp_path):
    common = ("train.gradient_accumulation_steps=1", "train.max_steps=2")
    common += ("checkpoint.every_n_steps=1", 'lr_scheduler.name="constant"')
    bf16 = train(make_config, tmp_path / "bf16", *common, 'train.mixed_precision="bf16"')
    fp32 = train(make_config, tmp_path / "fp32", *common, 'train.mixed_precision="no"')
    assert not (checkpoint(bf16, 2) / SCALER).exists()
    # The first loss is computed from identical weights and noise: only rounding differs.
    assert metrics(bf16)[0]["loss"] == pytest.approx(metrics(fp32)[0]["loss"], rel=3e-2)
    assert all(math.isfinite(r["loss"]) for r in metrics(bf16))
    optimizer = torch.load(checkpoint(bf16, 2) / "optimizer.pt", weights_only=True)
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer["state"].values())


def test_fp16_first_loss_matches_fp32(make_config, tmp_path):
    common = ("train.gradient_accumulation_steps=1", "train.max_steps=1")
    fp16 = train(make_config, tmp_path / "fp16", *common, 'train.mixed_precision="fp16"')
    fp32 = train(make_config, tmp_path / "fp32", *common, 'train.mixed_precision="no"')
    assert metrics(fp16)[0]["loss"] == pytest.approx(metrics(fp32)[0]["loss"], rel=1e-2)


def test_xformers_kernel_runs_and_matches_sdpa():
    xops = pytest.importorskip("xformers.ops")
    gen = torch.Generator("cuda").manual_seed(0)
    # (batch, tokens, heads, head dim): a 64×64 latent's self-attention in SD-1.5's first block.
    q, k, v = (
        torch.randn(2, 4096, 8, 40, device="cuda", dtype=torch.float16, generator=gen)
        for _ in range(3)
    )
    out = xops.memory_efficient_attention(q, k, v)
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)
    torch.testing.assert_close(out, reference, rtol=2e-3, atol=2e-3)


def test_xformers_and_sdpa_give_the_same_loss(make_config, tmp_path, monkeypatch):
    xops = pytest.importorskip("xformers.ops")
    calls = {"n": 0}
    original = xops.memory_efficient_attention

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    # diffusers' xformers processor looks the function up on xformers.ops at every call.
    monkeypatch.setattr(xops, "memory_efficient_attention", counted)
    common = (*FP16_CONSTANT, "train.max_steps=3")
    sdpa = train(make_config, tmp_path / "sdpa", *common, "train.xformers=false")
    assert calls["n"] == 0
    xformers = train(make_config, tmp_path / "xformers", *common, "train.xformers=true")
    assert calls["n"] > 0, "train.xformers = true fell back to SDPA: the install is broken"
    losses = [(a["loss"], b["loss"]) for a, b in zip(metrics(sdpa), metrics(xformers), strict=True)]
    # Same weights and noise at the first update; later ones differ by the kernels' rounding.
    assert losses[0][1] == pytest.approx(losses[0][0], rel=5e-3)
    for ours, theirs in losses[1:]:
        assert theirs == pytest.approx(ours, rel=2e-2)


def _overflowing_vae(tiny_sdxl: Path, folder: Path) -> Path:
    """The tiny SDXL's VAE, saved without force_upcast and with a first layer whose fp16 sums
    pass 65504 on bright pixels: an fp16 VAE that overflows, named as if it were fixed."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    vae.register_to_config(force_upcast=False)
    with torch.no_grad():
        vae.encoder.conv_in.weight.fill_(2e4)
    vae.save_pretrained(folder)
    return folder


def test_sdxl_vae_in_fp16_is_upcast_never_nan(sdxl_config, tiny_sdxl, tmp_path, caplog):
    """SDXL's own VAE runs in fp32 (force_upcast); a named fp16 VAE that still overflows has
    its batches encoded in fp32; either way every loss is finite."""
    import logging

    from trainer.run import loop

    common = (*FP16_CONSTANT, "train.max_steps=2", 'data.cache_latents="off"')
    with caplog.at_level(logging.DEBUG, logger="sdlora"):
        loop.run(sdxl_config(tmp_path / "own", *common))
    assert "vae: the model's own, float32 (force_upcast" in caplog.text
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path / "own"))

    caplog.clear()
    named = _overflowing_vae(tiny_sdxl, tmp_path / "fp16-vae")
    with caplog.at_level(logging.DEBUG, logger="sdlora"):
        loop.run(sdxl_config(tmp_path / "named", *common, f'model.vae="{named}"'))
    assert "vae: fp16-vae, float16" in caplog.text
    assert "the VAE overflowed in fp16" in caplog.text
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path / "named"))
