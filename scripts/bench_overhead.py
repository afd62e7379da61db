"""Our training loop against a bare PyTorch loop doing only the UNet work, in one process.

The bare loop is the bound on this machine: the same tiny SD model with the same LoRA, fed
pre-encoded latents and text states, doing noise, UNet forward, MSE, backward, clipping and
AdamW with the same batch and accumulation, and nothing else. Ours runs the real trainer
(``trainer.run.loop.run``) from its caches. Both are timed as the difference between a long and a
short run, which cancels the one-time setup (model load, cache fill) and leaves the
steady-state seconds per optimizer update.

Usage:
    python scripts/bench_overhead.py [--resolution 128] [--batch 4] [--accum 2]
        [--updates 10 30] [--repeats 3] [--variants default,fused,compile] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from make_tiny_dataset import make_tiny_dataset  # noqa: E402
from make_tiny_sd import make_tiny_sd  # noqa: E402


def our_seconds(model: Path, data: Path, out: Path, args, updates: int, variant: str) -> float:
    """Wall seconds of one run of the real trainer (setup included; differencing removes it)."""
    from trainer.config import load as config
    from trainer.run import loop

    sets = [
        f'model.pretrained="{model}"',
        f'data.path="{data}"',
        f'output_dir="{out}"',
        f"data.resolution={args.resolution}",
        "data.random_flip=false",
        f"train.batch_size={args.batch}",
        f"train.gradient_accumulation_steps={args.accum}",
        f"train.max_steps={updates}",
        'lr_scheduler.name="constant"',
        "lr_scheduler.warmup_steps=0",
        'logging.tracker="none"',
        f'optimizer.impl="{"fused" if variant == "fused" else "default"}"',
        f"train.compile={'true' if variant == 'compile' else 'false'}",
    ]
    cfg = config.load(REPO / "configs" / "tiny.toml", sets)
    start = time.perf_counter()
    loop.run(cfg)
    return time.perf_counter() - start


def bare_seconds(model: Path, args, updates: int, variant: str) -> float:
    """Wall seconds of the bare loop: UNet forward/backward/optimizer on pre-encoded batches."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from trainer.config.load import LoraConfig
    from trainer.lora import adapters as lora

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet.requires_grad_(False)
    lora.attach(unet, None, LoraConfig())
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    params = [p for p in unet.parameters() if p.requires_grad]
    kwargs = {"fused": True} if variant == "fused" else {}
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, **kwargs)
    forward = torch.compile(unet) if variant == "compile" else unet
    side = args.resolution // 8
    latents = torch.randn(args.batch, 4, side, side)
    hidden = torch.randn(args.batch, 77, unet.config.cross_attention_dim)
    start = time.perf_counter()
    for _ in range(updates):
        for _ in range(args.accum):
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (args.batch,))
            noisy = noise_scheduler.add_noise(latents, noise, t)
            pred = forward(noisy, t, hidden, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred, noise) / args.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(kind: str, variant: str, updates: int, work: Path, args) -> float:
    """Seconds of one run in a fresh process (torch.compile caches never leak between runs)."""
    cmd = [sys.executable, __file__, "--_measure", kind, "--_variant", variant]
    cmd += ["--_work", str(work), "--_n", str(updates), "--resolution", str(args.resolution)]
    cmd += ["--batch", str(args.batch), "--accum", str(args.accum), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return float(done.stdout.strip().splitlines()[-1])


def per_update(kind: str, variant: str, work: Path, args) -> float:
    """Median over repeats of (t(long) − t(short)) / (long − short)."""
    short, long = args.updates
    samples = []
    for _ in range(args.repeats):
        t_long = measure(kind, variant, long, work, args)
        t_short = measure(kind, variant, short, work, args)
        samples.append((t_long - t_short) / (long - short))
    return statistics.median(samples)


def _child(args) -> None:
    work = Path(args._work)
    if args._measure == "bare":
        seconds = bare_seconds(work / "model", args, args._n, args._variant)
    else:
        out = Path(tempfile.mkdtemp(prefix="out_", dir=work))
        seconds = our_seconds(work / "model", work / "data", out, args, args._n, args._variant)
    print(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--updates", type=int, nargs=2, default=[10, 30])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="default,fused")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    parser.add_argument("--_variant", help=argparse.SUPPRESS)
    parser.add_argument("--_work", help=argparse.SUPPRESS)
    parser.add_argument("--_n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args._measure:
        return _child(args)

    work = Path(tempfile.mkdtemp(prefix="bench_overhead_"))
    make_tiny_sd(work / "model")
    make_tiny_dataset(work / "data", count=32, size=args.resolution, layout="kohya")
    results = {}
    for variant in args.variants.split(","):
        ours_s = per_update("ours", variant, work, args)
        bare_s = per_update("bare", variant, work, args)
        results[variant] = {
            "ours_s_per_update": ours_s,
            "bare_s_per_update": bare_s,
            "overhead_percent": 100 * (ours_s / bare_s - 1),
        }
        print(
            f"{variant:8} ours {ours_s:.4f} s/update   bare {bare_s:.4f} s/update   "
            f"overhead {results[variant]['overhead_percent']:+.1f}%",
            flush=True,
        )
    meta = {
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, threads {args.threads}",
        "resolution": args.resolution,
        "batch": args.batch,
        "accumulation": args.accum,
        "updates": args.updates,
        "repeats": args.repeats,
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
