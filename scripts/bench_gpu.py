"""Throughput, MFU and peak memory of our trainer against the diffusers example, on one device.

Made for an H100 at real scale (``--preset sd15-shape``: the SD-1.5 shapes, random weights,
no download), and runnable on CPU at tiny scale so a test can drive it end to end.

Every run is its own process, so memory peaks and ``torch.compile`` caches never leak between
runs. Our trainer runs through its public API (``trainer.config.load.load`` and
``trainer.run.loop.run``), with the settings ``bench_vs_diffusers.ours_cmd`` gives it; the diffusers
script ``train_text_to_image_lora.py`` runs unmodified with ``bench_vs_diffusers.diffusers_cmd``'s
equal settings (``bench_runs.py`` is what each process runs). ``bench_probe.Probe`` times both
from outside their loops:

- steady state: the updates after ``--warmup-updates``, from the end of the last warm-up
  update to the end of the last update; updates/s, images/s (updates/s × batch × accumulation);
- start-up: process start to the end of the first update, less one steady update (imports,
  model loading, cache filling, compilation), and the cache fill alone (VAE and text-encoder
  time before the first update, when latents are cached);
- peak memory: CUDA ``max_memory_allocated`` over the whole run and over the steady window;
- MFU: FLOPs per image (``FlopCounterMode``: UNet forward and backward, plus the VAE encode and
  text encoder when they run each step) × images/s ÷ the device's measured bf16 matmul peak.

Usage (GPU):
    python scripts/bench_gpu.py --preset sd15-shape --diffusers-script PATH \\
        --precisions fp16 bf16 --attention sdpa xformers --json bench_gpu.json \\
        --markdown bench_gpu.md
Smoke test (CPU):
    python scripts/bench_gpu.py --device cpu --preset tiny --resolution 64 --batch-sizes 1 \\
        --precisions no --warmup-updates 1 --updates 2 --images 4 --peak-size 256
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the heavy imports: start-up counts from here

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
RESULT = "BENCH_RESULT "  # prefix of the one stdout line a child process answers with

from bench_report import compare, markdown, targets  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Variant:
    """One training run of the matrix."""

    trainer: str  # "ours" or "diffusers"
    batch: int
    latents: str  # "cached" or "uncached" (the diffusers script always encodes)
    precision: str  # "no", "fp16" or "bf16"
    attention: str  # "sdpa" or "xformers"
    checkpointing: bool
    compile: bool = False
    channels_last: bool = False

    def name(self) -> str:
        flags = [f"b{self.batch}", self.latents, self.precision, self.attention]
        flags += ["gc"] * self.checkpointing + ["compile"] * self.compile
        flags += ["cl"] * self.channels_last
        return "-".join([self.trainer, *flags])


def matrix(args: argparse.Namespace) -> list[Variant]:
    """Our runs (every combination asked for), then the peer's (no cache, compile or
    channels_last: the diffusers script offers none of them)."""
    on = {"on": True, "off": False}
    ours = [
        Variant("ours", b, lat, p, att, on[gc], on[comp], on[cl])
        for b, lat, p, att, gc, comp, cl in itertools.product(
            args.batch_sizes,
            args.latents,
            args.precisions,
            args.attention,
            args.checkpointing,
            args.compile,
            args.channels_last,
        )
    ]
    peer = []
    if args.diffusers_script:
        peer = [
            Variant("diffusers", b, "uncached", p, att, on[gc])
            for b, p, att, gc in itertools.product(
                args.batch_sizes, args.precisions, args.attention, args.checkpointing
            )
        ]
    return ours + peer


# ---------------------------------------------------------------- child processes


def launch(spec: dict, log: Path, timeout: float) -> dict[str, Any]:
    """Run ``spec`` in a fresh process; its result, or ``{"error": ...}`` when it failed."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)  # one process: our loop refuses a world it did not set up
    if spec["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if spec.get("compile_cache"):
        env["TORCHINDUCTOR_CACHE_DIR"] = spec["compile_cache"]
        env["TRITON_CACHE_DIR"] = str(Path(spec["compile_cache"]) / "triton")
    cmd = [sys.executable, __file__, "--_child", json.dumps(spec)]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as err:
        log.write_text(f"{err.stdout or ''}\n{err.stderr or ''}")
        return {"error": f"timed out after {timeout:.0f} s (log: {log})"}
    wall = time.perf_counter() - start
    log.write_text(done.stdout + "\n" + done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: {' | '.join(tail)} (log: {log})"}
    result = json.loads(lines[-1][len(RESULT) :])
    result["process_wall_s"] = wall
    return result


# ---------------------------------------------------------------- the parent


def prepare_inputs(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The model folder (built once per preset, or ``--model``) and the imagefolder dataset."""
    from make_tiny_dataset import make_tiny_dataset
    from make_tiny_sd import make_sd

    if args.model:
        model = Path(args.model)
    else:
        model = work / f"model-{args.arch}-{args.preset}"
        if not (model / "model_index.json").is_file():
            print(f"building the {args.preset} model in {model} ...", flush=True)
            make_sd(model, args.arch, args.preset)
    data = work / f"data-{args.resolution}px-{args.images}"
    if not (data / "metadata.jsonl").is_file():
        make_tiny_dataset(data, args.images, args.resolution, layout="imagefolder")
    return model, data


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Calibrate, run the matrix, and assemble the report."""
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_gpu_"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    model, data = prepare_inputs(args, work)
    common = {
        "device": args.device,
        "model": str(model),
        "data": str(data),
        "resolution": args.resolution,
        "accum": args.accum,
        "rank": args.rank,
        "lr": args.lr,
        "threads": args.threads,
        "warmup": args.warmup_updates,
        "updates": args.updates,
        "num_workers": args.num_workers,
        "tf32": args.tf32,
        "diffusers_script": str(args.diffusers_script or ""),
        "targets": ["to_q", "to_k", "to_v", "to_out.0"],  # ours_cmd's and the script's default
        "peak_size": args.peak_size,
        "peak_seconds": args.peak_seconds,
    }
    cal = launch({**common, "kind": "calibrate"}, work / "logs" / "calibrate.log", args.timeout)
    if "error" in cal:
        raise SystemExit(f"calibration failed: {cal['error']}")
    runs = []
    for variant in matrix(args):
        out = work / "runs" / variant.name()
        spec = {**common, "kind": "train", "variant": dataclasses.asdict(variant), "out": str(out)}
        if variant.compile:
            # Compiling takes a few updates (the backward graph compiles on first use), and a
            # fresh compile cache per run makes start-up the cold compile a user pays.
            spec["warmup"] = args.compile_warmup_updates
            spec["compile_cache"] = str(work / "compile-cache" / variant.name())
            shutil.rmtree(spec["compile_cache"], ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)  # an output_dir holding checkpoints is refused
        print(f"{variant.name():60} ...", end=" ", flush=True)
        measured = launch(spec, work / "logs" / f"{variant.name()}.log", args.timeout)
        row = {**dataclasses.asdict(variant), "warmup_updates": spec["warmup"], **measured}
        runs.append(finish_row(row, cal, args))
        print(row.get("error") or f"{row['images_per_s']:.2f} images/s", flush=True)
    meta = {
        **cal["facts"],
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "commit": _git_commit(),
        "model": args.model or f"{args.arch} {args.preset} (make_tiny_sd.py, random weights)",
        **{k: common[k] for k in ("resolution", "accum", "rank", "warmup", "updates", "tf32")},
        "compile_warmup": args.compile_warmup_updates,
        "images": args.images,
        "num_workers": args.num_workers,
    }
    report = {
        "meta": meta,
        "peak": cal["peak"],
        "flops_per_image": cal["flops_per_image"],
        "runs": runs,
    }
    report["comparisons"] = compare(runs)
    report["targets"] = targets(report)
    return report


def finish_row(row: dict, cal: dict, args: argparse.Namespace) -> dict:
    """Add images/s, the FLOPs the row's work costs per image, and MFU."""
    if "error" in row:
        return row
    flops = cal["flops_per_image"]
    per_image = flops["unet_train"]
    if row["latents"] == "uncached":  # the VAE and the text encoder run every step
        per_image += flops["vae_encode"] + flops["text_encode"]
    row["images_per_s"] = row["updates_per_s"] * row["batch"] * args.accum
    row["flops_per_image"] = per_image
    row["mfu"] = per_image * row["images_per_s"] / cal["peak"]["flop_per_s"]
    row["cache_fill_s"] = (
        row["encode_before_first_update_s"] if row["latents"] == "cached" else None
    )
    row["xformers_used"] = row["xformers_calls"] > 0 if row["attention"] == "xformers" else None
    return row


def _git_commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--arch", default="sd15", help="make_tiny_sd.py architecture")
    p.add_argument("--preset", default="sd15-shape", help="make_tiny_sd.py preset")
    p.add_argument("--model", help="use this diffusers folder instead of building a preset")
    p.add_argument("--work", help="folder for the model, data, runs and logs (default: a tmp)")
    p.add_argument(
        "--diffusers-script", type=Path, help="train_text_to_image_lora.py; no peer if unset"
    )
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument(
        "--latents", nargs="+", default=["cached", "uncached"], choices=["cached", "uncached"]
    )
    p.add_argument("--precisions", nargs="+", default=["fp16"], choices=["no", "fp16", "bf16"])
    p.add_argument("--attention", nargs="+", default=["sdpa"], choices=["sdpa", "xformers"])
    p.add_argument("--checkpointing", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument("--channels-last", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument(
        "--accum", type=int, default=1, help="gradient accumulation (images/update = batch × accum)"
    )
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--images", type=int, default=64, help="dataset size (cache fill scales with it)"
    )
    p.add_argument("--warmup-updates", type=int, default=5)
    p.add_argument(
        "--compile-warmup-updates", type=int, default=10, help="warm-up of torch.compile runs"
    )
    p.add_argument("--updates", type=int, default=20, help="steady-state updates measured")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers, both trainers")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls in both trainers")
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (--device cpu)"
    )
    p.add_argument(
        "--peak-size", type=int, help="matmul side for the peak (default 8192 CUDA, 1024 CPU)"
    )
    p.add_argument("--peak-seconds", type=float, default=2.0)
    p.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--markdown", type=Path, help="write the tables here")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.warmup_updates, args.compile_warmup_updates, args.updates) < 1:
        p.error(
            "--warmup-updates and --updates must be >= 1 (the steady window starts after warm-up)"
        )
    if args.peak_size is None:
        args.peak_size = 8192 if args.device == "cuda" else 1024
    if args.diffusers_script and not args.diffusers_script.is_file():
        p.error(f"--diffusers-script {args.diffusers_script}: no such file")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._child:
        from bench_runs import child

        print(RESULT + json.dumps(child(json.loads(args._child), STARTED)), flush=True)
        return
    report = run_all(args)
    text = markdown(report)
    print("\n" + text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    if any("error" in row for row in report["runs"]):
        sys.exit(1)  # the report is written; the exit status says some runs failed


if __name__ == "__main__":
    main()
