"""Typed, frozen run configuration loaded from strict TOML.

Every table is a frozen dataclass (``trainer/schema.py``, re-exported here); every field
carries a one-line doc (``metadata["doc"]``), which is also what ``sdlora config-help``
prints. Fields are declared and type-checked with the same helpers as the LR schedules'
fields (``schedulers.fields``). Loading checks every key against the schema and reports
**all** problems at once, each naming its TOML path and, for a typo, the closest valid key.
Nothing is silently ignored.

The ``[lr_scheduler]`` table is validated by the schedule registry (``schedulers.from_table``),
because each schedule's dataclass is its own schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomllib

import schedulers
from schedulers import Schedule
from schedulers.fields import check_value, type_name
from trainer.schema import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    ValidationConfig,
    tables_hash,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "ValidationConfig",
    "build",
    "describe",
    "load",
    "read_toml",
    "tables_hash",
    "to_toml",
]


class ConfigError(ValueError):
    """Every problem found in a config, reported together."""

    def __init__(self, problems: Sequence[str], source: str = "config") -> None:
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")


# ---------------------------------------------------------------- loading and validation


def _closest(key: str, options: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(options)}"


def _check_value(value: Any, tp: Any, path: str) -> tuple[Any, str | None]:
    value, problem = check_value(value, tp)
    return value, (f"{path}: {problem}" if problem else None)


def _build_table(cls: type, table: Any, where: str, problems: list[str]) -> Any:
    """Build one frozen table, appending every problem found instead of raising."""
    if not isinstance(table, Mapping):
        problems.append(f"[{where}]: expected a table, got {type(table).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in table.items():
        path = f"{where}.{key}"
        if key not in names:
            problems.append(f"{path}: unknown key{_closest(key, names)}")
            continue
        value, problem = _check_value(value, hints[key], path)
        if problem:
            problems.append(problem)
        else:
            values[key] = value
    return cls(**values)


def build(data: Mapping[str, Any], source: str = "config") -> RunConfig:
    """Validate raw TOML data; return the frozen config or raise ConfigError with all problems."""
    problems: list[str] = []
    hints = typing.get_type_hints(RunConfig)
    names = [f.name for f in dataclasses.fields(RunConfig)]
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            kind = "table" if isinstance(value, Mapping) else "key"
            shown = f"[{key}]" if kind == "table" else key
            problems.append(f"{shown}: unknown top-level {kind}{_closest(key, names)}")
            continue
        tp = hints[key]
        if key == "lr_scheduler":
            values[key] = _build_schedule(value, problems)
        elif dataclasses.is_dataclass(tp):
            values[key] = _build_table(tp, value, key, problems)
        else:
            value, problem = _check_value(value, tp, key)
            if problem:
                problems.append(problem)
            else:
                values[key] = value
    config = RunConfig(**values)
    problems += cross_checks(config)
    if problems:
        raise ConfigError(problems, source)
    return config


def _build_schedule(table: Any, problems: list[str]) -> Schedule:
    if not isinstance(table, Mapping):
        problems.append(f"[lr_scheduler]: expected a table, got {type(table).__name__}")
        return schedulers.get("constant")()
    try:
        return schedulers.from_table(table, where="lr_scheduler")
    except schedulers.ScheduleConfigError as err:
        problems.extend(err.problems)
        return schedulers.get("constant")()


def cross_checks(config: RunConfig) -> list[str]:
    """Checks that involve more than one key, or ranges the type alone cannot express."""
    p: list[str] = []
    m, lora, data, train = config.model, config.lora, config.data, config.train
    if not m.pretrained:
        p.append("model.pretrained: required; a diffusers folder, hub id or .safetensors file")
    if not data.path:
        p.append("data.path: required; the folder holding your images and captions")
    if data.resolution < 8 or data.resolution % 8:
        p.append(f"data.resolution: {data.resolution} must be a positive multiple of 8")
    if not 0 <= data.caption_dropout <= 1:
        p.append(f"data.caption_dropout: {data.caption_dropout} must be in [0, 1]")
    if data.num_workers < 0:
        p.append("data.num_workers: must be >= 0")
    if data.bucket_step < 8 or data.bucket_step % 8:
        p.append(f"data.bucket_step: {data.bucket_step} must be a positive multiple of 8")
    if data.max_upscale < 1:
        p.append(f"data.max_upscale: {data.max_upscale} must be >= 1 (1 = never upscale)")
    if data.keep_tokens < 0:
        p.append("data.keep_tokens: must be >= 0")
    if data.cache_latents in ("memory", "disk") and not data.center_crop:
        p.append(
            f"data.cache_latents: {data.cache_latents!r} with data.center_crop = false would "
            "train every epoch on the first random crop; use 'auto' or 'off'"
        )
    if data.cache_text == "on" and (data.shuffle_tags or lora.train_text_encoder):
        why = "the text encoder is trained" if lora.train_text_encoder else "tags are shuffled"
        p.append(
            f"data.cache_text: 'on' while {why} would serve stale outputs; use 'auto' or 'off'"
        )
    if lora.rank < 1:
        p.append(f"lora.rank: {lora.rank} must be >= 1")
    if lora.alpha <= 0:
        p.append(f"lora.alpha: {lora.alpha} must be > 0")
    if not 0 <= lora.dropout < 1:
        p.append(f"lora.dropout: {lora.dropout} must be in [0, 1)")
    if not lora.target_modules:
        p.append("lora.target_modules: empty; name at least one module, e.g. 'to_q'")
    val = config.validation
    if not 0 <= val.fraction < 1:
        p.append(f"validation.fraction: {val.fraction} must be in [0, 1)")
    if val.fraction and val.path:
        p.append("validation.fraction / validation.path: set one, not both")
    if val.sample_steps < 1 or val.guidance_scale < 0:
        p.append("validation.sample_steps must be >= 1 and guidance_scale >= 0")
    if val.every_n_steps < 0 or val.timesteps < 1 or val.batch_size < 1:
        p.append("validation.every_n_steps must be >= 0; timesteps and batch_size >= 1")
    if config.checkpoint.every_n_steps < 0 or config.checkpoint.keep_last < 0:
        p.append("checkpoint.every_n_steps / checkpoint.keep_last: must be >= 0")
    for key in ("batch_size", "gradient_accumulation_steps"):
        if getattr(train, key) < 1:
            p.append(f"train.{key}: {getattr(train, key)} must be >= 1")
    if train.max_steps < 0:
        p.append(f"train.max_steps: {train.max_steps} must be >= 0 (0 uses train.epochs)")
    if train.max_steps == 0 and train.epochs < 1:
        p.append("train.epochs: must be >= 1 when train.max_steps is 0")
    if train.learning_rate <= 0:
        p.append(f"train.learning_rate: {train.learning_rate} must be > 0")
    for key in ("text_encoder_lr", "weight_decay", "max_grad_norm", "noise_offset", "snr_gamma"):
        if getattr(train, key) < 0:
            p.append(f"train.{key}: {getattr(train, key)} must be >= 0")
    if train.optimizer == "sgd" and train.optimizer_impl == "fused":
        p.append("train.optimizer_impl: 'fused' SGD is not offered; use 'default' or 'foreach'")
    if train.text_encoder_lr and not lora.train_text_encoder:
        p.append(
            "train.text_encoder_lr: set, but lora.train_text_encoder is false; "
            "enable it or drop the key"
        )
    if train.max_steps > 0:
        p += config.lr_scheduler.check(train.max_steps, base_lrs=config.base_lrs())
    return p


# ---------------------------------------------------------------- files and overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``table.key=value``; the value is TOML (``--set train.max_steps=10``), or a bare
    string when it is not valid TOML (``--set data.path=/data/cats``)."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected table.key=value"], "--set")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of raw TOML data with ``--set`` overrides applied (validated later)."""
    data = json.loads(json.dumps(data))  # deep copy of plain TOML data
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError([f"--set {text!r}: {k} is not a table"], "--set")
        node[keys[-1]] = value
    return data


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning a syntax error into a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: no such config file"], str(path))
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError([f"{path}: not valid TOML: {err}"], str(path)) from err


def load(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Load, override and validate a config file."""
    return build(apply_overrides(read_toml(path), overrides), source=str(path))


def to_toml(data: Mapping[str, Any]) -> str:
    """Write plain config data as TOML (scalars, lists and one level of tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)  # JSON string escapes are valid TOML basic strings
        if isinstance(v, float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return str(v)

    top = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    blocks = ["\n".join(top)] if top else []
    for name, table in data.items():
        if isinstance(table, Mapping):
            body = "\n".join(f"{k} = {value(v)}" for k, v in table.items())
            blocks.append(f"[{name}]\n{body}")
    return "\n\n".join(blocks) + "\n"


def describe() -> str:
    """Every table and key with its type, default and doc: the config reference."""
    lines = []
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"\n[{f.name}]")
            sub_hints = typing.get_type_hints(tp)
            for sub in dataclasses.fields(tp):
                default = sub.default
                lines.append(
                    f"  {sub.name} ({type_name(sub_hints[sub.name])}, default {default!r}): "
                    f"{sub.metadata['doc']}"
                )
        elif f.name == "lr_scheduler":
            lines.append("\n[lr_scheduler]")
            lines.append("  name + that schedule's fields; `sdlora schedules [NAME]` lists them")
        else:
            lines.append(f"{f.name} ({type_name(tp)}, default {f.default!r}): {f.metadata['doc']}")
    return "\n".join(lines).lstrip()
