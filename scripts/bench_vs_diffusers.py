"""Our trainer against the diffusers example ``train_text_to_image_lora.py``, in one invocation.

Both train the same tiny SD model (written by ``make_tiny_sd.py``, SD-proportioned: VAE factor
8) on the same imagefolder dataset, with the same resolution, batch, accumulation, LoRA rank
and targets, AdamW settings, constant LR and number of updates, each in its own
``accelerate launch`` process with the same thread count. The diffusers script is not
vendored: pass its path (it lives at examples/text_to_image/ in the diffusers repository).

Reported per trainer:
- steady-state optimizer updates/s: (N_long − N_short) / (t_long − t_short), which cancels
  start-up, model loading and cache filling;
- whole-process wall time of the long run (everything included);
- peak RSS of the training process (the largest process of the launch).

Usage:
    python scripts/bench_vs_diffusers.py --diffusers-script PATH/train_text_to_image_lora.py
        [--resolution 128] [--batch 4] [--accum 2] [--updates 10 30] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measured(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``cmd`` in a fresh wrapper process; return its wall seconds and peak RSS (MB)."""
    wrapper = [sys.executable, __file__, "--_measure", json.dumps(cmd)]
    done = subprocess.run(wrapper, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure(cmd_json: str) -> None:
    cmd = json.loads(cmd_json)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-2000:] + done.stderr[-4000:])
        sys.exit(done.returncode)
    # ru_maxrss of reaped descendants: the largest process of the launch, in KB on Linux.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "peak_rss_mb": peak}))


def launcher(threads: int) -> list[str]:
    """``accelerate launch`` with every setting explicit, so neither run reads a config file."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(threads),
    ]  # fmt: skip


def diffusers_cmd(script: Path, model: Path, data: Path, out: Path, n: int, args) -> list[str]:
    """The diffusers example with settings equal to ours."""
    return [
        *launcher(args.threads), str(script),
        "--pretrained_model_name_or_path", str(model),
        "--train_data_dir", str(data),
        "--resolution", str(args.resolution), "--center_crop",
        "--train_batch_size", str(args.batch),
        "--gradient_accumulation_steps", str(args.accum),
        "--max_train_steps", str(n),
        "--learning_rate", str(args.lr),
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--rank", str(args.rank), "--seed", "0",
        "--dataloader_num_workers", "0", "--mixed_precision", "no",
        "--checkpointing_steps", "1000000",
        "--output_dir", str(out),
    ]  # fmt: skip


def ours_cmd(model: Path, data: Path, out: Path, n: int, args, caches: bool) -> list[str]:
    """Our trainer with the same settings; ``caches`` False turns the latent/text caches off."""
    sets = [
        f'model.pretrained="{model}"',
        f'data.path="{data}"',
        f'output_dir="{out}"',
        f"data.resolution={args.resolution}",
        "data.center_crop=true",
        "data.random_flip=false",
        f"train.batch_size={args.batch}",
        f"train.gradient_accumulation_steps={args.accum}",
        f"train.max_steps={n}",
        f"train.learning_rate={args.lr}",
        "train.seed=0",
        f"lora.rank={args.rank}",
        f"lora.alpha={float(args.rank)}",  # diffusers' script sets lora_alpha = rank
        'lora.save_dtype="fp32"',
        'lr_scheduler.name="constant"',
        "lr_scheduler.warmup_steps=0",
        'logging.tracker="tensorboard"',
    ]
    if not caches:
        sets += ['data.cache_latents="off"', 'data.cache_text="off"']
    cmd = [*launcher(args.threads), str(REPO / "train.py"), "--config", "configs/tiny.toml"]
    return cmd + [x for s in sets for x in ("--set", s)]


def bench(name: str, make_cmd, work: Path, args, env) -> dict[str, float]:
    """Short and long run of one trainer; steady-state rate and the long run's totals."""
    short, long = args.updates
    runs = {}
    for n in (short, long):
        out = work / f"{name}-{n}"
        shutil.rmtree(out, ignore_errors=True)
        runs[n] = measured(make_cmd(out, n), env)
    rate = (long - short) / (runs[long]["wall_s"] - runs[short]["wall_s"])
    result = {
        "updates_per_s": rate,
        "wall_s": runs[long]["wall_s"],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs.values()),
    }
    print(
        f"{name:18} {rate:7.3f} updates/s   wall {result['wall_s']:7.1f} s   "
        f"peak RSS {result['peak_rss_mb']:7.0f} MB",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--diffusers-script", type=Path)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--updates", type=int, nargs=2, default=[10, 30])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        return _measure(args._measure)
    if not args.diffusers_script or not args.diffusers_script.is_file():
        parser.error("--diffusers-script must point to train_text_to_image_lora.py")

    sys.path[:0] = [str(REPO / "scripts")]
    from make_tiny_dataset import make_tiny_dataset
    from make_tiny_sd import make_tiny_sd

    work = Path(tempfile.mkdtemp(prefix="bench_vs_diffusers_"))
    model = make_tiny_sd(work / "model")
    data = make_tiny_dataset(work / "data", args.images, args.resolution, layout="imagefolder")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    os.chdir(REPO)

    results = {
        "diffusers": bench(
            "diffusers script",
            lambda out, n: diffusers_cmd(args.diffusers_script, model, data, out, n, args),
            work, args, env,
        ),
        "ours_caches_off": bench(
            "ours, caches off",
            lambda out, n: ours_cmd(model, data, out, n, args, caches=False),
            work, args, env,
        ),
        "ours_default": bench(
            "ours, defaults",
            lambda out, n: ours_cmd(model, data, out, n, args, caches=True),
            work, args, env,
        ),
    }  # fmt: skip
    base = results["diffusers"]
    print("\nratios against the diffusers script (higher speed, lower wall/RSS is better):")
    for key in ("ours_caches_off", "ours_default"):
        r = results[key]
        r["speed_ratio"] = r["updates_per_s"] / base["updates_per_s"]
        r["wall_ratio"] = r["wall_s"] / base["wall_s"]
        r["rss_ratio"] = r["peak_rss_mb"] / base["peak_rss_mb"]
        print(
            f"  {key:16} updates/s ×{r['speed_ratio']:.2f}   wall ×{r['wall_ratio']:.2f}   "
            f"peak RSS ×{r['rss_ratio']:.2f}"
        )
    if args.json:
        import torch

        meta = {
            "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads",
            **{k: getattr(args, k) for k in ("resolution", "batch", "accum", "rank", "images")},
            "updates": args.updates,
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
