"""SD3 through the same commands as SD 1.5 and SDXL: the shipped configs/sd35.toml trains as
it is (only the model, the data and the run's length pointed at the tiny ones), its end
summary's commands work, and a run killed with SIGKILL resumes to the same bits.
"""

from __future__ import annotations

import io
import shlex
import signal
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from conftest import REPO
from diffusers import StableDiffusion3Pipeline
from PIL import Image
from safetensors import safe_open
from test_interrupt import assert_same_run, run_to_end, start_and_signal

from trainer.commands import cli
from trainer.lora.files import WEIGHTS_NAME
from trainer.report.tracking import read_metrics
from trainer.run.checkpoint import find_latest

pytestmark = pytest.mark.slow
SD35 = REPO / "configs" / "sd35.toml"


def sets(*overrides: str) -> list[str]:
    return [x for s in overrides for x in ("--set", s)]


def test_the_shipped_sd35_config_trains_and_its_summary_commands_work(
    tiny_sd3, tiny_data, tmp_path, monkeypatch
):
    """configs/sd35.toml as shipped (bf16, gradient checkpointing, buckets, disk latent cache,
    text cache with T5 freed, T5 at 256 tokens, SD3's default targets): only the model, the
    data, the resolution, the run length and the sample steps point at the tiny ones."""
    out = tmp_path / "run"
    overrides = sets(
        f'model.pretrained="{tiny_sd3}"',
        f'data.path="{tiny_data}"',
        f'output_dir="{out}"',
        "data.resolution=64",
        "train.max_steps=2",
        "validation.sample_steps=2",
        'logging.tracker="none"',
    )
    args = ["--config", str(SD35), *overrides]
    monkeypatch.setattr(sys, "argv", ["sdlora", "train", *args])
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert cli.main(["train", *args]) == 0
    text = printed.getvalue()
    summary = text[text.index("\ndone: ") + 1 :]
    assert summary.startswith("done: 2 updates in ")
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert "val_loss" in read_metrics(out)[-1]
    assert (out / "cache").is_dir() and any((out / "cache").iterdir())  # disk latent cache

    with safe_open(str(out / WEIGHTS_NAME), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert any(".add_q_proj." in k for k in keys) and any(".attn2.to_q." in k for k in keys)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.load_lora_weights(str(out))

    # The sample command the summary suggests draws the base and the LoRA with the SD3
    # pipeline (two steps here, to stay fast).
    sample = next(line for line in summary.splitlines() if line.strip().startswith("sdlora sample"))
    words = shlex.split(sample)
    grid = Path(words[words.index("--out") + 1])
    assert cli.main([*words[1:], "--steps", "2"]) == 0
    with Image.open(grid) as image:
        assert image.width >= 2 * 64


SETTINGS = (
    "train.max_steps=8",
    "train.batch_size=2",
    "train.gradient_accumulation_steps=2",
    "checkpoint.every_n_steps=2",
    "data.random_flip=true",
    'data.cache_latents="memory"',
    'data.cache_text="on"',
    "model.t5_max_length=16",
    'output.save_dtype="fp32"',
    'logging.tracker="none"',
)


def command(model: Path, data: Path, out: Path) -> list[str]:
    overrides = [f'model.pretrained="{model}"', f'data.path="{data}"', f'output_dir="{out}"']
    args = [sys.executable, "train.py", "--config", "configs/tiny.toml"]
    return args + sets(*overrides, *SETTINGS)


def test_sigkill_mid_epoch_then_resume_latest_is_bitwise_the_uninterrupted_run(
    tiny_sd3, tiny_data, tmp_path
):
    """Caches on: the resumed process encodes the latents, the text and T5's outputs again
    and frees T5 again, and must still continue to the same bits."""
    reference = tmp_path / "reference"
    run_to_end(command(tiny_sd3, tiny_data, reference))
    out = tmp_path / "killed"
    cmd = command(tiny_sd3, tiny_data, out)
    code, _ = start_and_signal(cmd, out, signal.SIGKILL, after_checkpoint=4)
    if code == 0:
        pytest.skip("the run finished before the kill landed (machine too fast)")
    assert code == -signal.SIGKILL and not (out / WEIGHTS_NAME).exists()
    assert find_latest(out) is not None
    run_to_end([*cmd, "--resume", "latest"])
    assert_same_run(out, reference)
    assert torch.equal(torch.tensor([r["step"] for r in read_metrics(out)]), torch.arange(1, 9))


@pytest.mark.parametrize("adapter", ["dora", "loha", "lokr"])
def test_every_adapter_type_trains_on_sd3_and_is_drawn_from_its_file(
    adapter, sd3_config, tiny_sd3, tmp_path
):
    """DoRA, LoHa and LoKr on the transformer: the kohya-style file holds each module's
    tensors under names ComfyUI maps for SD3, and `sdlora sample` draws the diffusers file
    (attached by peft as training did): scale 1 differs from the base image, and scale 0 is the
    base image (not for DoRA: `sdlora sample` scales its direction, and a trained magnitude
    stays)."""
    import client_rules as rules
    import numpy as np
    from safetensors.torch import load_file

    from trainer.commands.sample import SampleSettings, sample
    from trainer.run import loop

    out = tmp_path / adapter
    cfg = sd3_config(
        out,
        f'lora.type="{adapter}"',
        "model.t5_max_length=16",
        "train.max_steps=1",
        "train.learning_rate=5e-2",
        'output.name="a"',
    )
    loop.run(cfg)
    kohya = load_file(out / "a.safetensors")
    parts = rules.module_parts(kohya)
    assert sorted(set(parts) - rules.comfy_sd3_names(2, (2, 2))) == []
    assert all(p - {"alpha"} in rules.MODULE_PARTS[adapter] for p in parts.values()), parts
    settings = SampleSettings(
        prompts=("a red circle",), scales=(0.0, 1.0), steps=2, width=64, height=64
    )
    grid = sample(out / WEIGHTS_NAME, str(tiny_sd3), settings, tmp_path / "grid.png", device="cpu")
    with Image.open(grid) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    top = pixels.shape[0] - 64
    base, off, on = (pixels[top:, 64 * c : 64 * (c + 1)] for c in range(3))
    if adapter != "dora":
        assert np.array_equal(base, off)
    assert np.abs(on - base).max() > 4
