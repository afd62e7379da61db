"""What one ``bench_gpu.py`` process runs: a training run under the probe, or calibration.

A training run drives our trainer through its public API (``trainer.config.load.load`` and
``trainer.run.loop.run``) with the settings ``bench_vs_diffusers.ours_cmd`` gives it, or runs the
diffusers example script unmodified, in this process, with ``bench_vs_diffusers.diffusers_cmd``'s
equal settings. Calibration measures the device's matmul peak and counts the FLOPs per image.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench_vs_diffusers import diffusers_cmd, launcher, ours_cmd

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = "configs/tiny.toml"  # the base bench_vs_diffusers.ours_cmd builds on


def _settings(spec: dict) -> SimpleNamespace:
    """The attributes bench_vs_diffusers' command builders read."""
    return SimpleNamespace(
        threads=spec["threads"],
        resolution=spec["resolution"],
        batch=spec["variant"]["batch"],
        accum=spec["accum"],
        lr=spec["lr"],
        rank=spec["rank"],
    )


def run_ours(spec: dict, updates: int) -> None:
    """Our trainer in this process, through ``config.load`` and ``loop.run``."""

    from trainer.config import load as config
    from trainer.run import loop

    v = spec["variant"]
    cached = v["latents"] == "cached"
    cmd = ours_cmd(spec["model"], spec["data"], spec["out"], updates, _settings(spec), cached)
    sets = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--set"]
    sets += [
        f'train.mixed_precision="{v["precision"]}"',
        f"train.xformers={str(v['attention'] == 'xformers').lower()}",
        f"train.gradient_checkpointing={str(v['checkpointing']).lower()}",
        f"train.compile={str(v['compile']).lower()}",
        f"data.num_workers={spec['num_workers']}",
        f"train.channels_last={str(v['channels_last']).lower()}",
        f"train.tf32={str(bool(spec['tf32'])).lower()}",
    ]
    result = loop.run(config.load(REPO / BASE_CONFIG, sets))
    if result.updates != updates:
        raise RuntimeError(f"our trainer ran {result.updates} updates, not {updates}")


def run_diffusers(spec: dict, updates: int) -> None:
    """The diffusers example script in this process, with ``diffusers_cmd``'s settings."""
    import runpy

    v = spec["variant"]
    settings = _settings(spec)
    script = Path(spec["diffusers_script"])
    cmd = diffusers_cmd(script, spec["model"], spec["data"], spec["out"], updates, settings)
    argv = cmd[len(launcher(settings.threads)) :]  # [script, its arguments...]
    argv[argv.index("--mixed_precision") + 1] = v["precision"]
    argv[argv.index("--dataloader_num_workers") + 1] = str(spec["num_workers"])
    if v["attention"] == "xformers":
        argv.append("--enable_xformers_memory_efficient_attention")
    if v["checkpointing"]:
        argv.append("--gradient_checkpointing")
    if spec["tf32"]:
        argv.append("--allow_tf32")
    sys.argv = argv
    runpy.run_path(str(script), run_name="__main__")


def child(spec: dict, started: float) -> dict[str, Any]:
    """Run one job in this process and return its JSON-able result.

    Args:
        spec: The job, as ``bench_gpu.py`` wrote it.
        started: ``time.perf_counter()`` at process start, before the heavy imports.
    """
    import bench_probe
    import torch

    device = spec["device"]
    if device == "cpu":
        torch.set_num_threads(spec["threads"])
    elif not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: CUDA is not available in this process")
    if spec["kind"] == "calibrate":
        return calibrate(spec)
    if spec["kind"] == "build":
        return build(spec)
    updates = spec["warmup"] + spec["updates"]
    variant = spec["variant"]
    probe = bench_probe.Probe(device, spec["warmup"], started)
    probe.install(count_xformers=variant["attention"] == "xformers")
    if variant["trainer"] == "ours":
        run_ours(spec, updates)
    else:
        run_diffusers(spec, updates)
    return probe.report(updates)


def calibrate(spec: dict) -> dict[str, Any]:
    """Device facts, library versions, the matmul peak and the FLOPs per image."""
    import bench_probe
    import diffusers
    import torch
    import transformers

    device = spec["device"]
    facts: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device != "cpu" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    try:
        import xformers

        facts["xformers"] = xformers.__version__
        facts["xformers_extension_loaded"] = bool(getattr(xformers, "_has_cpp_library", False))
    except ImportError:
        facts["xformers"] = None
    # A peak measured earlier in the same sitting (bench_gpu.py --peak) is not measured again.
    peak = spec.get("peak") or bench_probe.measure_peak(
        device, spec["peak_size"], "bf16", spec["peak_seconds"]
    )
    counting_dtype = "bf16" if device != "cpu" else "no"
    flops = bench_probe.count_flops(
        spec["model"], spec["resolution"], spec["rank"], spec["targets"], device, counting_dtype
    )
    return {"facts": facts, "peak": peak, "flops_per_image": flops}


def build(spec: dict) -> dict[str, Any]:
    """Write the preset's random model (``make_tiny_sd.make_sd``, seeded) to ``spec["model"]``.

    On CUDA the weights are initialised on the GPU (``torch.device`` as the default device),
    which takes seconds where the CPU takes minutes for SDXL's 3.5 G parameters; the same
    seed then gives other (equally random) weights than a CPU build. A GPU build that fails
    falls back to the CPU.
    """
    import torch
    from make_tiny_sd import make_sd

    where = spec["device"]
    try:
        with torch.device(where):
            make_sd(spec["model"], spec["arch"], spec["preset"], seed=spec["seed"])
    except Exception as err:  # any failure: the CPU build is the reference
        if where == "cpu":
            raise
        print(f"building on {where} failed ({err!r}); building on the CPU", file=sys.stderr)
        where = "cpu"
        make_sd(spec["model"], spec["arch"], spec["preset"], seed=spec["seed"])
    size = sum(f.stat().st_size for f in Path(spec["model"]).rglob("*") if f.is_file())
    return {"built_on": where, "bytes": size}


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
