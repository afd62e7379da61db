"""Turn ``bench_gpu.py``'s measured runs into comparisons, target checks and markdown tables.

Pure functions of the report dict, so they are tested without running anything.
"""

from __future__ import annotations

from typing import Any

# The targets, at 512 px on an SD-1.5-shaped model with cached latents.
TARGET_MFU = 0.45
TARGET_SPEEDUP = 1.5
# SimpleTuner's SD-1.x LoRA on an H100, as the issue quotes it: seconds per update at batch 1.
SIMPLETUNER_H100_S_PER_UPDATE = 0.18

_MATCH = ("batch", "precision", "attention", "checkpointing")


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each of our plain runs (no compile, no channels_last) against the diffusers run with the
    same batch, precision, attention and checkpointing; ratios are ours ÷ theirs."""
    peers = {tuple(r[k] for k in _MATCH): r for r in runs if _ok(r, "diffusers")}
    out = []
    for ours in runs:
        if not _ok(ours, "ours") or ours["compile"] or ours["channels_last"]:
            continue
        peer = peers.get(tuple(ours[k] for k in _MATCH))
        if peer is None:
            continue
        out.append(
            {
                **{k: ours[k] for k in _MATCH},
                "latents": ours["latents"],
                "ours_images_per_s": ours["images_per_s"],
                "diffusers_images_per_s": peer["images_per_s"],
                "images_per_s_ratio": ours["images_per_s"] / peer["images_per_s"],
                "ours_mfu": ours["mfu"],
                "diffusers_mfu": peer["mfu"],
                "ours_peak_mem_mb": ours["peak_mem_mb"],
                "diffusers_peak_mem_mb": peer["peak_mem_mb"],
                "peak_mem_ratio": ours["peak_mem_mb"] / peer["peak_mem_mb"],
            }
        )
    return out


def against_plain(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each of our runs with an option on (xformers, gradient checkpointing, compile,
    channels_last) against our plain run (SDPA, every option off) at the same batch, latents
    and precision; ratios are the option's ÷ plain."""
    plain = {
        (r["batch"], r["latents"], r["precision"]): r
        for r in runs
        if _ok(r, "ours") and not _options(r)
    }
    out = []
    for run in runs:
        base = plain.get((run["batch"], run["latents"], run["precision"]))
        if not _ok(run, "ours") or not _options(run) or base is None:
            continue
        out.append(
            {
                **{k: run[k] for k in ("batch", "latents", "precision")},
                "options": _options(run),
                "images_per_s": run["images_per_s"],
                "plain_images_per_s": base["images_per_s"],
                "images_per_s_ratio": run["images_per_s"] / base["images_per_s"],
                "peak_mem_mb": run["peak_mem_mb"],
                "plain_peak_mem_mb": base["peak_mem_mb"],
                "peak_mem_ratio": run["peak_mem_mb"] / base["peak_mem_mb"],
                "startup_s": run["startup_s"],
                "plain_startup_s": base["startup_s"],
            }
        )
    return out


def _options(run: dict[str, Any]) -> str:
    """The run's options that are on, as the run names spell them ("" for a plain run)."""
    on = ["xformers"] * (run["attention"] == "xformers") + ["gc"] * run["checkpointing"]
    on += ["compile"] * run["compile"] + ["cl"] * run["channels_last"]
    return "+".join(on)


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's three targets, read off the cached-latent runs (None: nothing to read)."""
    cached = [r for r in report["runs"] if _ok(r, "ours") and r["latents"] == "cached"]
    pairs = [c for c in report["comparisons"] if c["latents"] == "cached"]
    batch1 = [r["s_per_update"] for r in cached if r["batch"] == 1]
    best_mfu = max((r["mfu"] for r in cached), default=None)
    speedup = min((c["images_per_s_ratio"] for c in pairs), default=None)
    mem = max((c["peak_mem_ratio"] for c in pairs), default=None)
    return {
        "best_mfu": best_mfu,
        "mfu_met": None if best_mfu is None else best_mfu >= TARGET_MFU,
        "min_images_per_s_ratio": speedup,
        "speedup_met": None if speedup is None else speedup >= TARGET_SPEEDUP,
        "max_peak_mem_ratio": mem,
        "memory_met": None if mem is None else mem <= 1.0,
        "best_s_per_update_batch1": min(batch1, default=None),
    }


def _ok(row: dict[str, Any], trainer: str) -> bool:
    return row["trainer"] == trainer and "error" not in row


def _num(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _gb(mb: Any) -> str:
    return "—" if mb is None else f"{mb / 1024:.2f}"


def _yes(flag: bool) -> str:
    return "on" if flag else "off"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: the set-up, one row per run, the comparison and the targets."""
    meta, peak, flops = report["meta"], report["peak"], report["flops_per_image"]
    lines = [
        f"### {meta['device']}, {meta['date']}",
        "",
        f"- torch {meta['torch']} (CUDA {meta['cuda']}), diffusers {meta['diffusers']}, "
        f"transformers {meta['transformers']}, xformers {meta.get('xformers')}, "
        f"Python {meta['python']}; commit {meta['commit']}",
        f"- model: {meta['model']}; {meta['resolution']} px, LoRA rank {meta['rank']}, "
        f"accumulation {meta['accum']}, {meta['images']} images, DataLoader workers "
        f"{meta['num_workers']}, TF32 {'on' if meta['tf32'] else 'off'}",
        f"- steady state: {meta['updates']} updates after {meta['warmup']} warm-up updates "
        f"({meta.get('compile_warmup', '—')} with torch.compile, from a cold compile cache)",
        f"- peak: {peak['dtype']} matmul {peak['size']}³ = {peak['flop_per_s'] / 1e12:.1f} "
        f"TFLOP/s; FLOPs per image: UNet forward + backward "
        f"{flops['unet_train'] / 1e9:.1f} G, VAE encode {flops['vae_encode'] / 1e9:.1f} G, "
        f"text encoder {flops['text_encode'] / 1e9:.1f} G",
        f"- command: `{meta['command']}`",
        "",
        "| trainer | batch | latents | precision | attention | grad ckpt | compile | "
        "channels_last | s/update | images/s | MFU | peak mem (GB) | steady peak (GB) | "
        "start-up (s) | cache fill (s) |",
        "|" + "---|" * 15,
    ]
    for r in report["runs"]:
        head = (
            f"| {r['trainer']} | {r['batch']} | {r['latents']} | {r['precision']} | "
            f"{r['attention']} | {_yes(r['checkpointing'])} | {_yes(r['compile'])} | "
            f"{_yes(r['channels_last'])} |"
        )
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:120]} |" + " |" * 6)
            continue
        attention_note = " (fell back to SDPA)" if r.get("xformers_used") is False else ""
        lines.append(
            f"{head} {r['s_per_update']:.4f} | {r['images_per_s']:.2f}{attention_note} | "
            f"{r['mfu']:.1%} | {_gb(r['peak_mem_mb'])} | {_gb(r['peak_mem_steady_mb'])} | "
            f"{r['startup_s']:.1f} | {_num(r['cache_fill_s'], '.1f')} |"
        )
    kinds = {r.get("mem_kind") for r in report["runs"] if "error" not in r}
    lines += ["", f"Memory is {', '.join(sorted(k for k in kinds if k)) or '—'}."]
    if report.get("not_run"):
        lines += ["", f"Not run (time budget spent): {', '.join(report['not_run'])}."]
    if report["comparisons"]:
        lines += [
            "",
            "Against the diffusers script (ratios: ours ÷ theirs):",
            "",
            "| batch | precision | attention | grad ckpt | our latents | our images/s | "
            "their images/s | ratio | our MFU | their MFU | our peak (GB) | their peak (GB) | "
            "ratio |",
            "|" + "---|" * 13,
        ]
        for c in report["comparisons"]:
            lines.append(
                f"| {c['batch']} | {c['precision']} | {c['attention']} | "
                f"{_yes(c['checkpointing'])} | {c['latents']} | {c['ours_images_per_s']:.2f} | "
                f"{c['diffusers_images_per_s']:.2f} | ×{c['images_per_s_ratio']:.2f} | "
                f"{c['ours_mfu']:.1%} | {c['diffusers_mfu']:.1%} | "
                f"{_gb(c['ours_peak_mem_mb'])} | {_gb(c['diffusers_peak_mem_mb'])} | "
                f"×{c['peak_mem_ratio']:.2f} |"
            )
    lines += _plain_lines(against_plain(report["runs"]))
    if meta.get("arch", "sd15") != "sd15":
        return "\n".join(lines) + "\n"  # the targets are the issue's, for SD-1.5 shapes
    t = targets(report)
    lines += [
        "",
        "Targets (cached latents):",
        f"- best MFU {_num(t['best_mfu'], '.1%')} (target ≥ {TARGET_MFU:.0%})",
        f"- lowest images/s ratio against the diffusers script "
        f"{_num(t['min_images_per_s_ratio'], '.2f')} (target ≥ {TARGET_SPEEDUP})",
        f"- highest peak-memory ratio {_num(t['max_peak_mem_ratio'], '.2f')} (target ≤ 1)",
        f"- seconds per update at batch 1: {_num(t['best_s_per_update_batch1'], '.3f')} "
        f"(SimpleTuner's SD-1.x LoRA on an H100, as the issue quotes it: about "
        f"{SIMPLETUNER_H100_S_PER_UPDATE})",
    ]
    return "\n".join(lines) + "\n"


def _plain_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The table of :func:`against_plain`, or nothing when no run had an option on."""
    if not rows:
        return []
    lines = [
        "",
        "Options against our plain run (SDPA, no checkpointing, compile or channels_last; "
        "ratios: option ÷ plain):",
        "",
        "| batch | latents | precision | options | images/s | plain images/s | ratio | "
        "peak (GB) | plain peak (GB) | ratio | start-up (s) | plain start-up (s) |",
        "|" + "---|" * 12,
    ]
    for c in rows:
        lines.append(
            f"| {c['batch']} | {c['latents']} | {c['precision']} | {c['options']} | "
            f"{c['images_per_s']:.2f} | {c['plain_images_per_s']:.2f} | "
            f"×{c['images_per_s_ratio']:.2f} | {_gb(c['peak_mem_mb'])} | "
            f"{_gb(c['plain_peak_mem_mb'])} | ×{c['peak_mem_ratio']:.2f} | "
            f"{c['startup_s']:.1f} | {c['plain_startup_s']:.1f} |"
        )
    return lines
