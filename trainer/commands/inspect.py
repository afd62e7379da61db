"""``sdlora inspect FILE [--against MODEL]``: what is inside any LoRA file, and what would load.

It reports the format (kohya, LyCORIS, diffusers/PEFT), the base-model family, rank and alpha
of every adapted module, the targets, whether a text encoder is included, the header metadata
and whether the stored hashes match the file.

With ``--against`` a diffusers model folder, every key is matched against that model's modules
under the naming the clients use (``trainer/lora/keys.py``), and every key that names no
module, or a module of another shape, is listed: exactly what ComfyUI ("lora key not loaded"),
A1111 (silently) or kohya (silently) would drop. The model is built from its configs on the
meta device, so no weights are read.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.lora import hashes as lora_hashes
from trainer.lora import keys as lora_keys
from trainer.lora.files import Header, LoraFileError, load_tensors, read_header
from trainer.lora.formats import Parsed, alpha_keys, parse
from trainer.models import family as model_family

_LONG_VALUE = 300  # metadata values longer than this are shortened in the text report


@dataclass
class Report:
    """Everything ``sdlora inspect`` says about a file."""

    path: Path
    size: int
    format: str
    adapter_type: str
    architecture: str
    architecture_source: str
    modules: list[dict[str, Any]]
    text_encoder: bool
    targets: dict[str, list[str]]
    metadata: dict[str, str]
    hashes: dict[str, bool]
    stray_keys: list[str] = field(default_factory=list)
    against: str | None = None
    unmatched: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON data."""
        data = dict(self.__dict__)
        data["path"] = str(self.path)
        return data


# ---------------------------------------------------------------- reading


def _not_a_lora(header: Header) -> LoraFileError:
    keys = list(header.tensors)
    sample = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys):
        kind = "a full Stable Diffusion checkpoint"
    elif any(k.startswith(("conv_in.", "down_blocks.", "encoder.", "decoder.")) for k in keys):
        kind = "a diffusers model component"
    elif 0 < len(keys) <= 4 and any(k in ("emb_params", "clip_l", "clip_g") for k in keys):
        kind = "a textual-inversion embedding"
    else:
        kind = "not a LoRA"
    return LoraFileError(
        f"{header.path}: holds no LoRA tensors ({len(keys)} tensors: {sample}); this looks "
        f"like {kind}; sdlora inspect reads kohya, LyCORIS and diffusers/PEFT LoRA files"
    )


def _module_rows(parsed: Parsed) -> list[dict[str, Any]]:
    return [
        {
            "name": m.name,
            "component": m.component,
            "kind": m.kind,
            "rank": m.rank,
            "alpha": m.alpha,
        }
        for m in sorted(parsed.modules.values(), key=lambda m: m.name)
    ]


# Module paths end with the adapted layer after the last numbered block ("…blocks.0.attn1.to_q",
# "…layers.3.self_attn.q_proj"); kohya names are the same with "_" for ".".
_NUMBERED = re.compile(r"[._]\d+[._]")


def _targets(parsed: Parsed) -> dict[str, list[str]]:
    """Per component, the distinct layers adapted (the path after the last numbered block)."""
    found: dict[str, set[str]] = {}
    for module in parsed.modules.values():
        leaf = _NUMBERED.split(module.name)[-1]
        found.setdefault(module.component, set()).add(leaf)
    return {k: sorted(v) for k, v in sorted(found.items())}


def inspect(path: str | Path, against: str | Path | None = None) -> Report:
    """Read a LoRA file (and optionally match it against a model); return the report.

    Raises:
        LoraFileError: the file is missing, truncated, not safetensors or not a LoRA, or
            ``against`` is not a diffusers model folder.
    """
    header = read_header(path)
    alphas = {k: float(v) for k, v in load_tensors(header, alpha_keys(header)).items()}
    parsed = parse(header, alphas)
    if parsed is None:
        raise _not_a_lora(header)
    widths = {name: module.in_features for name, module in parsed.modules.items()}
    family = model_family.from_lora(header.metadata, parsed.components, widths)
    arch, source = family.name, family.evidence
    hashes = lora_hashes.verify(header.path, header.metadata)
    report = Report(
        path=header.path,
        size=header.size,
        format=parsed.format,
        adapter_type=parsed.adapter_type,
        architecture=arch,
        architecture_source=source,
        modules=_module_rows(parsed),
        text_encoder=any(lora_keys.is_text_component(c) for c in parsed.components),
        targets=_targets(parsed),
        metadata=dict(sorted(header.metadata.items())),
        hashes=hashes,
        stray_keys=parsed.stray_keys,
    )
    if against is not None:
        from trainer.lora.match import match_against

        report.against = str(against)
        report.unmatched, report.wrong_shape = match_against(parsed, against)
    return report


# ---------------------------------------------------------------- printing


def _rank_alpha_lines(rows: list[dict[str, Any]]) -> list[str]:
    groups = Counter((r["component"], r["kind"], r["rank"], r["alpha"]) for r in rows)
    lines = []
    for (component, kind, rank, alpha), count in sorted(groups.items(), key=str):
        shown_alpha = "not stored (clients use alpha = rank)" if alpha is None else f"{alpha:g}"
        lines.append(f"  {component}: {count} {kind} module(s), rank {rank}, alpha {shown_alpha}")
    return lines


def _short(value: str) -> str:
    if len(value) <= _LONG_VALUE:
        return value
    return value[:_LONG_VALUE] + f"... ({len(value)} characters)"


def format_report(report: Report, list_modules: bool = False) -> str:
    """The report as text for a terminal."""
    lines = [
        f"file:          {report.path} ({report.size:,} bytes)",
        f"format:        {report.format}",
        f"adapter type:  {report.adapter_type}",
        f"architecture:  {report.architecture} (from {report.architecture_source})",
        f"modules:       {len(report.modules)}",
        *_rank_alpha_lines(report.modules),
        f"text encoder:  {'included' if report.text_encoder else 'not included'}",
        "targets:",
        *(f"  {c}: {', '.join(t)}" for c, t in report.targets.items()),
    ]
    if report.hashes:
        verdicts = [
            f"{k} {'verifies' if ok else 'DOES NOT MATCH the file'}"
            for k, ok in report.hashes.items()
        ]
        lines.append("hash:          " + "; ".join(verdicts))
    else:
        lines.append("hash:          none stored")
    if report.stray_keys:
        lines.append(f"other keys:    {len(report.stray_keys)} tensors belong to no LoRA module:")
        lines += [f"  {k}" for k in report.stray_keys]
    if list_modules:
        lines.append("rank  alpha  module")
        for row in report.modules:
            alpha = "-" if row["alpha"] is None else f"{row['alpha']:g}"
            lines.append(f"{row['rank'] or '-':>4}  {alpha:>5}  {row['name']}")
    lines.append(f"metadata:      {len(report.metadata)} key(s)")
    lines += [f"  {k}: {_short(v)}" for k, v in report.metadata.items()]
    if report.against is not None:
        lines += _against_lines(report)
    return "\n".join(lines)


def _against_lines(report: Report) -> list[str]:
    total = sum(1 for _ in report.modules)
    if not report.unmatched and not report.wrong_shape:
        return [f"against {report.against}: all {total} modules match; no key would be dropped"]
    lines = [f"against {report.against}:"]
    if report.unmatched:
        lines.append(
            f"  {len(report.unmatched)} key(s) name no module of this model; clients drop them "
            "(ComfyUI warns 'lora key not loaded', A1111 and kohya say nothing):"
        )
        lines += [f"    {k}" for k in report.unmatched]
    if report.wrong_shape:
        lines.append(
            f"  {len(report.wrong_shape)} key(s) name a module of another shape (a LoRA made "
            "for another base model?):"
        )
        lines += [f"    {k}" for k in report.wrong_shape]
    return lines
