"""The measuring side of ``bench_gpu.py``: what runs inside each benchmark process.

Neither trainer is edited or instrumented from the inside. A :class:`Probe` is installed in the
training process before the run starts and sees it only through public hooks:

- the end of every optimizer update: PyTorch's global optimizer step post-hook, or, under fp16,
  ``GradScaler.update`` (it runs once per update, also on an update the scaler skipped for an
  overflow, when the optimizer step does not run);
- VAE and CLIP text-encoder time before the first update (the cache fill, when latents are
  cached), by wrapping ``AutoencoderKL.encode``, ``CLIPTextModel.forward`` and (SDXL's second
  encoder) ``CLIPTextModelWithProjection.forward``;
- whether xformers ran, by counting ``xformers.ops.memory_efficient_attention`` calls;
- peak memory: ``torch.cuda.max_memory_allocated``, reset when warm-up ends, or peak RSS on CPU.

On CUDA every timestamp is taken after ``torch.cuda.synchronize()``, so it marks finished GPU
work. Both trainers already wait for the GPU once per update (they read the loss), so the added
sync moves the wait, it does not add one.

Also here: the peak matmul rate of the device, the FLOPs of one training example counted with
``torch.utils.flop_counter.FlopCounterMode``, and a ``channels_last`` shim for our trainer.
"""

from __future__ import annotations

import functools
import itertools
import math
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch

DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Probe:
    """Timestamps of update ends, encode time before the first update, and peak memory.

    Args:
        device: ``cuda`` or ``cpu``; on CUDA every timestamp waits for the GPU.
        warmup: Updates that are not steady state (compilation, allocator and cuDNN warm-up);
            the steady window starts at the end of update ``warmup``, where the peak-memory
            counter is also reset.
        started: ``time.perf_counter()`` when the process started, before heavy imports.
    """

    def __init__(self, device: str, warmup: int, started: float) -> None:
        self.cuda = device.startswith("cuda")
        self.warmup = warmup
        self.started = started
        self.ends: list[float] = []  # perf_counter at the end of each optimizer update
        self.optimizer_steps = 0  # optimizer.step() calls that ran (fp16 skips some)
        self.scaler_mode = False  # a GradScaler is enabled: its update() ends an update
        self.encode_before_first_s = 0.0
        self.xformers_calls = 0  # calls after the first update: xformers really trained
        self.startup_peak_bytes = 0
        self._undo: list[Callable[[], None]] = []

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _update_ended(self) -> None:
        self._sync()
        self.ends.append(time.perf_counter())
        if self.cuda and len(self.ends) == self.warmup:
            self.startup_peak_bytes = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def install(self, count_xformers: bool = False) -> Probe:
        """Install every hook; returns self. :meth:`remove` takes them out again."""
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def on_step(optimizer, args, kwargs) -> None:
            if sum(len(g["params"]) for g in optimizer.param_groups) <= 1:
                return  # a one-tensor probe (the trainer checks kernels that way), not training
            self.optimizer_steps += 1
            if not self.scaler_mode:
                self._update_ended()

        handle = register_optimizer_step_post_hook(on_step)
        self._undo.append(handle.remove)
        scaler = torch.amp.GradScaler
        self._wrap(scaler, "__init__", self._after_scaler_init)
        self._wrap(scaler, "update", self._after_scaler_update)
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        self._wrap(AutoencoderKL, "encode", self._timed_before_first_update)
        self._wrap(CLIPTextModel, "forward", self._timed_before_first_update)
        # SDXL's second text encoder: its cache fill counts too.
        self._wrap(CLIPTextModelWithProjection, "forward", self._timed_before_first_update)
        if count_xformers:
            import xformers.ops

            self._wrap(xformers.ops, "memory_efficient_attention", self._count_xformers)
        return self

    def remove(self) -> None:
        """Undo :meth:`install`."""
        while self._undo:
            self._undo.pop()()

    def _wrap(self, owner: type | ModuleType, name: str, make: Callable) -> None:
        original = getattr(owner, name)
        setattr(owner, name, functools.wraps(original)(make(original)))
        self._undo.append(lambda: setattr(owner, name, original))

    def _after_scaler_init(self, original: Callable) -> Callable:
        def init(scaler, *args, **kwargs):
            original(scaler, *args, **kwargs)
            self.scaler_mode = self.scaler_mode or scaler.is_enabled()

        return init

    def _after_scaler_update(self, original: Callable) -> Callable:
        def update(scaler, *args, **kwargs):
            out = original(scaler, *args, **kwargs)
            if scaler.is_enabled():
                self._update_ended()
            return out

        return update

    def _timed_before_first_update(self, original: Callable) -> Callable:
        def timed(*args, **kwargs):
            if self.ends:
                return original(*args, **kwargs)
            self._sync()
            start = time.perf_counter()
            out = original(*args, **kwargs)
            self._sync()
            self.encode_before_first_s += time.perf_counter() - start
            return out

        return timed

    def _count_xformers(self, original: Callable) -> Callable:
        def counted(*args, **kwargs):
            if self.ends:
                self.xformers_calls += 1
            return original(*args, **kwargs)

        return counted

    def report(self, expected_updates: int) -> dict[str, Any]:
        """Steady-state and start-up figures of the finished run.

        Raises:
            RuntimeError: when fewer update ends were seen than the warm-up plus one.
        """
        ends, warm = self.ends, self.warmup
        if len(ends) <= warm:
            raise RuntimeError(
                f"saw {len(ends)} optimizer updates of {expected_updates}; the steady window "
                f"needs more than the {warm} warm-up updates"
            )
        window = ends[warm - 1 :]
        intervals = [b - a for a, b in itertools.pairwise(window)]
        s_per_update = (window[-1] - window[0]) / len(intervals)
        to_first = ends[0] - self.started
        out: dict[str, Any] = {
            "updates_seen": len(ends),
            "skipped_updates": len(ends) - self.optimizer_steps if self.scaler_mode else 0,
            "steady_updates": len(intervals),
            "s_per_update": s_per_update,
            "s_per_update_median": statistics.median(intervals),
            "updates_per_s": 1.0 / s_per_update,
            "to_first_update_s": to_first,
            # What the run cost before it reached steady speed, beyond one steady update.
            "startup_s": to_first - s_per_update,
            "warmup_extra_s": (ends[warm - 1] - ends[0]) - (warm - 1) * s_per_update,
            "encode_before_first_update_s": self.encode_before_first_s,
            "xformers_calls": self.xformers_calls,
            # Every update's duration, warm-up included, to see where steady state begins.
            "update_intervals_s": [b - a for a, b in itertools.pairwise(ends)],
        }
        out.update(self.memory())
        return out

    def memory(self) -> dict[str, Any]:
        """Peak memory: CUDA allocator figures, or the process's peak RSS on CPU (MB)."""
        if self.cuda:
            steady = torch.cuda.max_memory_allocated()
            return {
                "mem_kind": "cuda_max_memory_allocated",
                "peak_mem_mb": max(steady, self.startup_peak_bytes) / 2**20,
                "peak_mem_steady_mb": steady / 2**20,
                "peak_mem_reserved_mb": torch.cuda.max_memory_reserved() / 2**20,
            }
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
        return {
            "mem_kind": "cpu_peak_rss",
            "peak_mem_mb": rss,
            "peak_mem_steady_mb": None,
            "peak_mem_reserved_mb": None,
        }


def measure_peak(device: str, size: int, dtype: str = "bf16", seconds: float = 2.0) -> dict:
    """FLOP/s of a large square matmul on ``device``: the peak that MFU is measured against.

    Args:
        device: ``cuda`` or ``cpu``.
        size: Side of the square matrices (8192 saturates an H100's tensor cores).
        dtype: ``bf16`` (the issue's reference), ``fp16`` or ``fp32``.
        seconds: Measure for at least this long, after warm-up.
    """
    torch.manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=DTYPES[dtype])
    b = torch.randn(size, size, device=device, dtype=DTYPES[dtype])
    c = torch.empty_like(a)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        torch.mm(a, b, out=c)
    sync()
    done, start = 0, time.perf_counter()
    while True:
        for _ in range(10):
            torch.mm(a, b, out=c)
        done += 10
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    return {"dtype": dtype, "size": size, "flop_per_s": 2 * size**3 * done / elapsed}


def count_flops(
    model_dir: str,
    resolution: int,
    rank: int,
    targets: Sequence[str],
    device: str = "cpu",
    dtype: str = "no",
) -> dict[str, float]:
    """FLOPs of one training example at ``resolution``, counted by ``FlopCounterMode``.

    Model FLOPs, the MFU convention: the UNet forward and backward with LoRA adapters on
    ``targets`` (weight gradients only where parameters train), the VAE encode and the text
    encoder forward (SDXL: both text encoders, and the UNet gets its added conditioning, the
    pooled text embedding and six time ids). Recomputation by gradient checkpointing is not
    counted. Attention runs through SDPA's math path here, so the counter sees its matmuls on
    every device.

    Returns:
        ``unet_forward``, ``unet_backward``, ``unet_train`` (their sum), ``vae_encode``,
        ``text_encode``; FLOPs for a batch of one.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    weights = DTYPES[dtype]
    autocast = torch.autocast(device.split(":")[0], dtype=weights, enabled=weights != torch.float32)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=weights)
    unet.to(device).requires_grad_(False)
    adapters = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets))
    unet.add_adapter(adapters)
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=weights).to(device)
    encoders = _text_encoders(model_dir, weights, device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = resolution // factor
    tokens = encoders[0].config.max_position_embeddings
    gen = torch.Generator(device).manual_seed(0)
    latents = torch.randn(1, unet.config.in_channels, side, side, generator=gen, device=device)
    hidden = torch.randn(1, tokens, unet.config.cross_attention_dim, generator=gen, device=device)
    timestep = torch.tensor([500], device=device)
    added = _added_conditioning(unet.config, resolution, weights, gen, device)
    counted: dict[str, float] = {}
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd, autocast:
            prediction = unet(
                latents.to(weights), timestep, hidden.to(weights), added_cond_kwargs=added
            ).sample
        with FlopCounterMode(display=False) as bwd:
            torch.nn.functional.mse_loss(prediction.float(), latents).backward()
        counted["unet_forward"] = fwd.get_total_flops()
        counted["unet_backward"] = bwd.get_total_flops()
        pixels = torch.zeros(1, 3, resolution, resolution, device=device, dtype=weights)
        ids = torch.zeros(1, tokens, dtype=torch.long, device=device)
        with torch.no_grad(), autocast:
            with FlopCounterMode(display=False) as enc:
                vae.encode(pixels)
            with FlopCounterMode(display=False) as txt:
                for encoder in encoders:
                    encoder(ids)
        counted["vae_encode"] = enc.get_total_flops()
        counted["text_encode"] = txt.get_total_flops()
    counted["unet_train"] = counted["unet_forward"] + counted["unet_backward"]
    return {k: float(v) for k, v in counted.items()}


def _text_encoders(model_dir: str, weights: torch.dtype, device: str) -> list:
    """The model's text encoders: SD's one ``CLIPTextModel``, SDXL's two."""
    from pathlib import Path

    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    kinds = [("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)]
    return [
        # transformers' decorated from_pretrained confuses mypy about its first argument
        kind.from_pretrained(model_dir, subfolder=name, torch_dtype=weights).to(device)  # type: ignore[arg-type]
        for name, kind in kinds
        if (Path(model_dir) / name / "config.json").is_file()
    ]


def _added_conditioning(config, resolution: int, weights, gen, device: str) -> dict | None:
    """SDXL's ``added_cond_kwargs`` for one example (None for a UNet without ``text_time``):
    a pooled text embedding and the six size/crop ids, kept fp32 as the trainer keeps them."""
    if config.get("addition_embed_type") != "text_time":
        return None
    time_dims = 6 * config["addition_time_embed_dim"]
    pooled = config["projection_class_embeddings_input_dim"] - time_dims
    text_embeds = torch.randn(1, pooled, generator=gen, device=device).to(weights)
    size = float(resolution)
    time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=device)
    return {"text_embeds": text_embeds, "time_ids": time_ids}


def finite_positive(value: Any) -> bool:
    """True for a finite number above zero (bools are not numbers here)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python scripts/bench_probe.py --device cuda --json peak.json``: the matmul peak alone,
    as ``bench_gpu.py --peak peak.json`` reads it (scripts/gpu_check.sh's peak step)."""
    import argparse
    import json
    from pathlib import Path

    p = argparse.ArgumentParser(description="The device's matmul peak (FLOP/s).")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--size", type=int, default=8192, help="matrix side (8192 fills an H100)")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--json", type=Path, help="write the result here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    peak = measure_peak(args.device, args.size, args.dtype, args.seconds)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak["device"] = name
    print(f"{name}: {args.dtype} matmul {args.size}³ at {peak['flop_per_s'] / 1e12:.1f} TFLOP/s")
    if args.json:
        args.json.write_text(json.dumps(peak, indent=2) + "\n")


if __name__ == "__main__":
    main()
