"""bench_gpu.py end to end on CPU at tiny scale, and the pieces it is built from.

The numbers of a CPU run mean nothing for a GPU; these tests check that the script runs both
trainers, that every figure it reports is a finite positive number, that the derived figures
follow from the measured ones, and that the FLOP count agrees with an independent count.
Nothing here asserts on a wall-clock value.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_probe import Probe, count_flops, finite_positive
from bench_report import compare, markdown, targets

REPO = Path(__file__).resolve().parents[1]

# A stand-in for diffusers' train_text_to_image_lora.py: it takes the same arguments, records
# them, and runs the asked-for number of optimizer updates on a small model.
FAKE_PEER = """
import argparse, json, pathlib, torch
p = argparse.ArgumentParser()
for name in ("pretrained_model_name_or_path", "train_data_dir", "output_dir", "mixed_precision",
             "lr_scheduler"):
    p.add_argument("--" + name)
for name in ("resolution", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
             "rank", "seed", "dataloader_num_workers", "checkpointing_steps", "lr_warmup_steps"):
    p.add_argument("--" + name, type=int)
p.add_argument("--learning_rate", type=float)
for flag in ("center_crop", "gradient_checkpointing", "allow_tf32",
             "enable_xformers_memory_efficient_attention"):
    p.add_argument("--" + flag, action="store_true")
args = p.parse_args()
out = pathlib.Path(args.output_dir)
out.mkdir(parents=True, exist_ok=True)
(out / "args.json").write_text(json.dumps(vars(args)))
model = torch.nn.Linear(16, 16)
optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
for _ in range(args.max_train_steps):
    model(torch.randn(args.train_batch_size, 16)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
"""

NUMBERS = (
    "updates_per_s",
    "images_per_s",
    "s_per_update",
    "s_per_update_median",
    "mfu",
    "flops_per_image",
    "peak_mem_mb",
    "to_first_update_s",
    "process_wall_s",
)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[dict, str, Path]:
    work = tmp_path_factory.mktemp("bench")
    peer = work / "train_text_to_image_lora.py"
    peer.write_text(FAKE_PEER)
    cmd = [
        sys.executable, str(REPO / "scripts" / "bench_gpu.py"),
        "--device", "cpu", "--preset", "tiny", "--resolution", "64", "--batch-sizes", "2",
        "--precisions", "no", "--latents", "cached", "uncached",
        "--warmup-updates", "1", "--updates", "2", "--images", "4", "--threads", "1",
        "--peak-size", "128", "--peak-seconds", "0.05", "--diffusers-script", str(peer),
        "--work", str(work), "--json", str(work / "out.json"), "--markdown", str(work / "out.md"),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((work / "out.json").read_text()), (work / "out.md").read_text(), work


def test_every_run_reports_finite_positive_figures(bench):
    report, _, _ = bench
    runs = report["runs"]
    kinds = [(r["trainer"], r["latents"]) for r in runs]
    assert kinds == [("ours", "cached"), ("ours", "uncached"), ("diffusers", "uncached")]
    for run in runs:
        assert "error" not in run, run
        for key in NUMBERS:
            assert finite_positive(run[key]), (run["trainer"], key, run[key])
        assert run["updates_seen"] == 3 and run["steady_updates"] == 2
        assert run["skipped_updates"] == 0 and run["mem_kind"] == "cpu_peak_rss"
        assert run["startup_s"] >= 0 and run["warmup_updates"] == 1
        assert len(run["update_intervals_s"]) == 2
        assert all(finite_positive(x) for x in run["update_intervals_s"])
    assert finite_positive(report["peak"]["flop_per_s"])
    assert all(finite_positive(v) for v in report["flops_per_image"].values())


def test_derived_figures_follow_from_the_measured_ones(bench):
    report, _, _ = bench
    flops, peak = report["flops_per_image"], report["peak"]["flop_per_s"]
    uncached = flops["unet_train"] + flops["vae_encode"] + flops["text_encode"]
    for run in report["runs"]:
        assert run["images_per_s"] == pytest.approx(run["updates_per_s"] * run["batch"])
        assert run["updates_per_s"] == pytest.approx(1 / run["s_per_update"])
        per_image = flops["unet_train"] if run["latents"] == "cached" else uncached
        assert run["flops_per_image"] == pytest.approx(per_image)
        assert run["mfu"] == pytest.approx(per_image * run["images_per_s"] / peak)
    ours_cached = report["runs"][0]
    # The latent cache is filled before the first update: VAE time was spent and is reported.
    assert finite_positive(ours_cached["cache_fill_s"])
    assert report["runs"][1]["cache_fill_s"] is None
    assert [c["latents"] for c in report["comparisons"]] == ["cached", "uncached"]
    for c in report["comparisons"]:
        assert c["images_per_s_ratio"] == pytest.approx(
            c["ours_images_per_s"] / c["diffusers_images_per_s"]
        )


def test_the_peer_got_our_settings(bench):
    report, _, work = bench
    args = json.loads((work / "runs" / "diffusers-b2-uncached-no-sdpa" / "args.json").read_text())
    assert args["train_batch_size"] == 2 and args["resolution"] == 64
    assert args["max_train_steps"] == 3 and args["mixed_precision"] == "no"
    assert args["lr_scheduler"] == "constant" and args["lr_warmup_steps"] == 0
    assert not args["enable_xformers_memory_efficient_attention"]
    assert report["meta"]["resolution"] == 64


def test_markdown_has_one_row_per_run_and_the_comparison(bench):
    report, text, _ = bench
    rows = [
        line for line in text.splitlines() if line.startswith("| ours") or "| diffusers |" in line
    ]
    assert len(rows) == len(report["runs"])
    assert "Against the diffusers script" in text and "best MFU" in text
    assert text == markdown(report)


def _analytic_unet_forward(model_dir: Path, resolution: int, rank: int) -> float:
    """Multiply-add count of one UNet forward from module shapes, independent of
    FlopCounterMode: 2·MACs for every conv and linear layer (LoRA's included), plus the two
    attention matmuls (QKᵀ and AV) of every attention module. An SDXL UNet gets its added
    conditioning (pooled embedding and six time ids), whose embedding layers count too."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k"]))
    total = 0.0

    def conv(module, inputs, output):
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels / module.groups
        total += 2 * output.numel() * k

    def linear(module, inputs, output):
        nonlocal total
        total += 2 * output.numel() * module.in_features

    def attention(module, args, kwargs, output):
        nonlocal total
        hidden = args[0]
        queries = hidden.shape[-1] * hidden.shape[-2] if hidden.ndim == 4 else hidden.shape[1]
        context = kwargs.get("encoder_hidden_states")
        keys = queries if context is None else context.shape[1]
        total += 2 * 2 * hidden.shape[0] * queries * keys * module.inner_dim

    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(conv)
        elif isinstance(module, torch.nn.Linear):
            module.register_forward_hook(linear)
        elif isinstance(module, Attention):
            module.register_forward_hook(attention, with_kwargs=True)
    side = resolution // 8
    added = None
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim
        pooled -= 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled), "time_ids": torch.ones(1, 6)}
    with torch.no_grad():
        unet(
            torch.randn(1, 4, side, side),
            torch.tensor([10]),
            torch.randn(1, 77, unet.config.cross_attention_dim),
            added_cond_kwargs=added,
        )
    return total


def test_flop_count_agrees_with_an_independent_count(tiny_model):
    counted = count_flops(str(tiny_model), 64, 4, ["to_q", "to_k"])
    expected = _analytic_unet_forward(tiny_model, 64, 4)
    assert counted["unet_forward"] == pytest.approx(expected, rel=1e-9)
    # Backward: input gradients through every layer but the first (about one forward), and
    # weight gradients only for the LoRA layers, so between 0.5 and 2 forwards.
    assert 0.5 * expected < counted["unet_backward"] < 2 * expected
    assert counted["unet_train"] == counted["unet_forward"] + counted["unet_backward"]
    assert counted["vae_encode"] > 0 and counted["text_encode"] > 0


def test_sdxl_flop_count_agrees_with_an_independent_count(tiny_sdxl):
    """SDXL: the UNet gets its added conditioning (it fails without), and the text encoders'
    FLOPs are both encoders' (each counted alone here as the reference)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    counted = count_flops(str(tiny_sdxl), 64, 4, ["to_q", "to_k"])
    assert counted["unet_forward"] == pytest.approx(
        _analytic_unet_forward(tiny_sdxl, 64, 4), rel=1e-9
    )
    ids = torch.zeros(1, 77, dtype=torch.long)
    each = []
    for name, kind in (
        ("text_encoder", CLIPTextModel),
        ("text_encoder_2", CLIPTextModelWithProjection),
    ):
        encoder = kind.from_pretrained(tiny_sdxl, subfolder=name)
        # The math kernel, as count_flops uses: the counter then sees attention's matmuls.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as flops:
            encoder(ids)
        each.append(flops.get_total_flops())
    assert min(each) > 0 and counted["text_encode"] == sum(each)


def test_probe_counts_updates_and_skips_under_a_grad_scaler():
    """A scaler that finds an overflow skips the optimizer step; the probe still sees the
    update end (GradScaler.update), and counts it as skipped."""
    probe = Probe("cpu", warmup=1, started=0.0).install()
    try:
        model = torch.nn.Linear(4, 4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        for value in (1.0, math.inf, 1.0):  # the second update overflows
            scaler.scale(model(torch.full((2, 4), value)).sum()).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        report = probe.report(3)
    finally:
        probe.remove()
    assert probe.scaler_mode
    assert report["updates_seen"] == 3 and report["skipped_updates"] == 1
    assert probe.optimizer_steps == 2


def test_probe_refuses_a_run_without_a_steady_window():
    probe = Probe("cpu", warmup=2, started=0.0)
    probe.ends = [1.0, 2.0]
    with pytest.raises(RuntimeError, match="saw 2 optimizer updates"):
        probe.report(2)


def test_targets_read_the_cached_runs_only():
    def run(trainer, latents, batch, images_per_s, mfu, mem):
        return {
            "trainer": trainer, "latents": latents, "batch": batch, "precision": "fp16",
            "attention": "sdpa", "checkpointing": False, "compile": False,
            "channels_last": False, "images_per_s": images_per_s, "mfu": mfu,
            "peak_mem_mb": mem, "s_per_update": batch / images_per_s,
        }  # fmt: skip

    runs = [
        run("ours", "cached", 1, 6.0, 0.30, 900),
        run("ours", "cached", 8, 40.0, 0.50, 5000),
        run("ours", "uncached", 8, 20.0, 0.60, 6000),
        run("diffusers", "uncached", 1, 5.0, 0.25, 1000),
        run("diffusers", "uncached", 8, 25.0, 0.40, 5500),
    ]
    report = {"runs": runs, "comparisons": compare(runs)}
    got = targets(report)
    assert got["best_mfu"] == 0.50 and got["mfu_met"]
    assert got["min_images_per_s_ratio"] == pytest.approx(6.0 / 5.0) and not got["speedup_met"]
    assert got["max_peak_mem_ratio"] == pytest.approx(5000 / 5500) and got["memory_met"]
    assert got["best_s_per_update_batch1"] == pytest.approx(1 / 6.0)
