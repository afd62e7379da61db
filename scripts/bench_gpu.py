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

Runs come in pairs (ours, then the diffusers script at the same settings), and the report is
written again after every run, so a sitting cut short (``--budget-s``, or a kill) still leaves
every finished run and comparison on disk; runs that would start after ``--budget-s`` are
listed as not run. ``--variants`` names runs one by one instead of a product of lists;
``--peak`` and ``--calibration`` reuse a peak or a whole calibration measured earlier in the
same sitting (scripts/gpu_check.sh does both).

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
import json  # noqa: E402
import math  # noqa: E402
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

from bench_matrix import matrix  # noqa: E402
from bench_report import compare, markdown, targets  # noqa: E402

from trainer import files  # noqa: E402

# ---------------------------------------------------------------- child processes


def launch(spec: dict, log: Path, timeout: float) -> dict[str, Any]:
    """Run ``spec`` in a fresh process; its result, or ``{"error": ...}`` when it failed."""
    # The repository first, then what the caller had (carried wheels, e.g. /tmp/site).
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=path)
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
        # What it printed before the kill (bytes in some Python versions, even with text=True).
        said = [
            x.decode(errors="replace") if isinstance(x, bytes) else x or ""
            for x in (err.output, err.stderr)
        ]
        log.write_text("\n".join(said))
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


def prepare_inputs(args: argparse.Namespace, work: Path) -> tuple[Path, Path, str]:
    """The model folder (built once per preset, or ``--model``), the imagefolder dataset, and
    where the model was built (``--model``: "given")."""
    from make_tiny_dataset import make_tiny_dataset

    built = "given"
    if args.model:
        model = Path(args.model)
    else:
        model = work / f"model-{args.arch}-{args.preset}"
        marker = work / f"{model.name}.built_on"  # written last: a cut-short build is redone
        if not marker.is_file():
            print(f"building the {args.preset} model in {model} ...", flush=True)
            shutil.rmtree(model, ignore_errors=True)
            spec = {"kind": "build", "device": args.device, "model": str(model)}
            spec.update(arch=args.arch, preset=args.preset, seed=0)
            if args.device == "cpu":  # no CUDA context to keep out of this process
                from bench_runs import build

                done = build(spec)
            else:
                done = launch(spec, work / "logs" / "build.log", args.timeout)
            if "error" in done:
                raise SystemExit(f"building the model failed: {done['error']}")
            marker.write_text(done["built_on"])
        built = marker.read_text().strip()
    data = work / f"data-{args.resolution}px-{args.images}"
    if not (data / "metadata.jsonl").is_file():
        make_tiny_dataset(data, args.images, args.resolution, layout="imagefolder")
    return model, data, built


def calibration(args: argparse.Namespace, common: dict, work: Path) -> dict[str, Any]:
    """Device facts, peak and FLOPs per image: from ``--calibration`` when that report was
    measured on the same model, resolution and rank, else measured now (the peak taken from
    ``--peak`` when given)."""
    if args.calibration:
        earlier = json.loads(args.calibration.read_text())
        wanted = {k: common[k] for k in ("resolution", "rank")} | {"model_path": common["model"]}
        if all(earlier["meta"].get(k) == v for k, v in wanted.items()):
            facts = {k: earlier["meta"][k] for k in FACTS if k in earlier["meta"]}
            print(f"calibration from {args.calibration}", flush=True)
            return {"facts": facts, "peak": earlier["peak"], "flops": earlier["flops_per_image"]}
        print(f"{args.calibration} was measured on another model; calibrating", flush=True)
    spec = {**common, "kind": "calibrate"}
    if args.peak:
        spec["peak"] = json.loads(args.peak.read_text())
    cal = launch(spec, work / "logs" / "calibrate.log", args.timeout)
    if "error" in cal:
        raise SystemExit(f"calibration failed: {cal['error']}")
    return {"facts": cal["facts"], "peak": cal["peak"], "flops": cal["flops_per_image"]}


# What calibration reads off the device and the libraries (bench_runs.calibrate).
FACTS = (
    "device", "cpu_count", "torch", "cuda", "diffusers", "transformers", "python", "xformers",
    "xformers_extension_loaded",
)  # fmt: skip


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Calibrate, run the matrix, and assemble the report (written after every run)."""
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_gpu_"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    model, data, built = prepare_inputs(args, work)
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
    cal = calibration(args, common, work)
    described = f"{args.arch} {args.preset} (make_tiny_sd.py, random weights, seed 0, "
    described += f"built on {built})"
    meta = {
        **cal["facts"],
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "commit": _git_commit(),
        "model": args.model or described,
        "model_path": str(model),
        "arch": args.arch,
        **{k: common[k] for k in ("resolution", "accum", "rank", "warmup", "updates", "tf32")},
        "compile_warmup": args.compile_warmup_updates,
        "images": args.images,
        "num_workers": args.num_workers,
    }
    report: dict[str, Any] = {
        "meta": meta,
        "peak": cal["peak"],
        "flops_per_image": cal["flops"],
        "runs": [],
        "not_run": [],
    }
    save(args, report)
    longest = 0.0  # the longest run so far: a run is not started with less time left
    for variant in matrix(args):
        left = math.inf if args.budget_s is None else args.budget_s - _elapsed()
        if left < max(longest, 1.0):
            report["not_run"].append(variant.name())
            print(f"{variant.name():60} not run: out of --budget-s", flush=True)
            save(args, report)
            continue
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
        measured = launch(spec, _new_log(work, variant.name()), min(args.timeout, left))
        longest = max(longest, measured.get("process_wall_s", 0.0))
        row = {**dataclasses.asdict(variant), "warmup_updates": spec["warmup"], **measured}
        report["runs"].append(finish_row(row, cal, args))
        print(row.get("error") or f"{row['images_per_s']:.2f} images/s", flush=True)
        save(args, report)
    return report


def _elapsed() -> float:
    """Seconds since this process started (``--budget-s`` counts from there)."""
    return time.perf_counter() - STARTED


def _new_log(work: Path, name: str) -> Path:
    """``logs/NAME.log``, or ``NAME.2.log``, ... when an earlier run of this name left one."""
    log, n = work / "logs" / f"{name}.log", 1
    while log.exists():
        n += 1
        log = work / "logs" / f"{name}.{n}.log"
    return log


def save(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Derive the comparisons and targets, and write ``--json`` and ``--markdown`` atomically
    (a kill between two runs leaves the last complete report)."""
    report["comparisons"] = compare(report["runs"])
    report["targets"] = targets(report)
    if args.json:
        files.write_json(args.json, report)
    if args.markdown:
        files.write_text(args.markdown, markdown(report))


def finish_row(row: dict, cal: dict, args: argparse.Namespace) -> dict:
    """Add images/s, the FLOPs the row's work costs per image, and MFU."""
    if "error" in row:
        return row
    flops = cal["flops"]
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
    p.add_argument(
        "--budget-s",
        type=float,
        help="start no run after this many seconds (nor one the longest run so far would "
        "take past it); those are listed as not run",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME",
        help="exactly these runs, named as the report names them (ours-b16-cached-fp16-sdpa-gc), "
        "instead of the product of the lists above",
    )
    p.add_argument("--peak", type=Path, help="a peak measured earlier (bench_probe.py --json)")
    p.add_argument(
        "--calibration",
        type=Path,
        help="reuse the facts, peak and FLOPs of this earlier report when it was measured on "
        "the same model, resolution and rank",
    )
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
    if args.diffusers_script and args.arch != "sd15":
        p.error(
            "--diffusers-script: train_text_to_image_lora.py trains SD 1.x models only; "
            f"leave it out with --arch {args.arch}"
        )
    for path in (args.peak, args.calibration):
        if path and not path.is_file():
            p.error(f"{path}: no such file")
    if args.variants:
        from bench_matrix import parse_variant

        for name in args.variants:
            try:
                variant = parse_variant(name)
            except ValueError as err:
                p.error(f"--variants: {err}")
            if variant.trainer == "diffusers" and not args.diffusers_script:
                p.error(f"--variants {name}: a diffusers run needs --diffusers-script")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._child:
        from bench_runs import child

        print(RESULT + json.dumps(child(json.loads(args._child), STARTED)), flush=True)
        return
    report = run_all(args)  # writes --json and --markdown after every run
    print("\n" + markdown(report))
    if any("error" in row for row in report["runs"]):
        sys.exit(1)  # the report is written; the exit status says some runs failed


if __name__ == "__main__":
    main()
