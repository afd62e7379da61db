"""Typed, frozen run configuration loaded from strict TOML.

Every table is a frozen dataclass (``trainer/config/schema.py``, re-exported here) built by the one
table mechanism of the project, ``typedtables.build_table``, which the LR schedules use too:
every key is checked against the schema and **all** problems are reported at once, each
naming its TOML path and, for a typo, the closest valid key. Nothing is silently ignored.
Each table runs its own checks; :func:`cross_checks` holds the rules that span tables.

The ``[lr_scheduler]`` and ``[optimizer]`` tables are resolved through their registries
(``schedulers.config.build``, ``optimizers.config.build``), because each schedule's and each
optimizer's dataclass is its own schema. Keys that moved (the optimizer keys ``[train]`` used
to hold, ``lora.save_dtype``) are still read for a release, each with one warning per load
(``trainer/config/deprecated.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomllib

from schedulers import config as schedule_config
from trainer.config import adapter_formats, deprecated, sd3
from trainer.config.schema import (
    MAX_UPDATES,
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
from trainer.optimizers import BaseLR
from trainer.optimizers import config as optimizer_config
from typedtables import (
    ConfigError,
    build_table,
    check_value,
    describe_table,
    field_types,
    toml_value,
    unknown_key_hint,
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
    "flatten",
    "load",
    "read_toml",
    "tables_hash",
    "to_toml",
]

log = logging.getLogger("sdlora")


# ---------------------------------------------------------------- loading and validation


def build(data: Mapping[str, Any], source: str = "config") -> RunConfig:
    """Validate raw TOML data; return the frozen config or raise ConfigError with all problems.

    Warnings (a deprecated key, a combination that runs but is probably a mistake) are logged
    to the ``sdlora`` logger, once per call.
    """
    problems: list[str] = []
    warnings: list[str] = []
    data = deprecated.upgrade(data, problems, warnings)
    types = field_types(RunConfig)
    for key, value in data.items():
        if key not in types:
            kind = "table" if isinstance(value, Mapping) else "key"
            shown = f"[{key}]" if kind == "table" else key
            problems.append(
                f"{shown}: unknown top-level {kind}{unknown_key_hint(key, list(types))}"
            )
    values: dict[str, Any] = {}
    for key, tp in types.items():
        if key == "lr_scheduler":
            table = data.get(key, {"name": "constant"})
            values[key] = schedule_config.build(table, key, problems)
        elif key == "optimizer":
            values[key] = optimizer_config.build(data.get(key, {}), key, problems)
        elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
            # An absent table is built from {} so its required keys are still reported.
            unknown = deprecated.unknown_train_key if key == "train" else None
            values[key] = build_table(tp, data.get(key, {}), key, problems, unknown=unknown)
        elif key in data:
            value, problem = check_value(data[key], tp)
            if problem:
                problems.append(f"{key}: {problem}")
            else:
                values[key] = value
    config = RunConfig(**values)
    problems += [p for p in cross_checks(config, warnings) if p not in problems]
    for warning in warnings:
        log.warning("%s: %s", source, warning)
    if problems:
        raise ConfigError(problems, source)
    return config


def cross_checks(config: RunConfig, warnings: list[str] | None = None) -> list[str]:
    """The rules that involve more than one table (each table checks its own keys).

    Args:
        config: The config, every table built.
        warnings: Receives the combinations that may run but probably should not.

    Returns:
        The problems: combinations that must not run.
    """
    p: list[str] = []
    lora, data, train = config.lora, config.data, config.train
    if not config.output_dir.strip():
        p.append("output_dir: required; the folder the run writes into")
    text_trained = lora.train_text_encoder or lora.train_text_encoder_2
    if data.cache_text == "on" and (data.shuffle_tags or text_trained):
        why = "a text encoder is trained" if text_trained else "tags are shuffled"
        p.append(
            f"data.cache_text: 'on' while {why} would serve stale outputs; use 'auto' or 'off'"
        )
    if train.text_encoder_lr and not text_trained:
        p.append(
            "train.text_encoder_lr: set, but lora.train_text_encoder is false; "
            "enable it or drop the key"
        )
    if train.text_encoder_2_lr and not lora.train_text_encoder_2:
        p.append(
            "train.text_encoder_2_lr: set, but lora.train_text_encoder_2 is false; "
            "enable it or drop the key"
        )
    if lora.train_text_encoder_2 and config.model.arch in ("sd1", "sd2"):
        p.append(
            f"lora.train_text_encoder_2: model.arch = {config.model.arch!r} has one text "
            "encoder; the second exists only in SDXL"
        )
    p += sd3.family_problems(config, config.model.arch)  # again in preflight for "auto"
    if 0 < train.max_steps <= MAX_UPDATES:
        p += config.lr_scheduler.check(train.max_steps, base_lrs=config.base_lrs())
    p += optimizer_checks(config, [] if warnings is None else warnings)
    p += adapter_format_checks(config)
    return p


def adapter_format_checks(config: RunConfig) -> list[str]:
    """The adapter type against the files ``output.format`` asks for: the rule in
    ``trainer/config/adapter_formats.py`` (which ``sdlora export --format`` obeys too), then what
    diffusers cannot load into a text encoder (docs/adapters.md)."""
    lora, fmt = config.lora, config.output.format
    refused = adapter_formats.refusal(lora.type, lora.dora_axis, fmt)
    if refused:
        fix = "set output.format = " + " or ".join(repr(f) for f in refused.allowed)
        if lora.type == "dora":  # the other axis writes the other file
            fix += f", or lora.dora_axis = {'input' if lora.dora_axis == 'output' else 'output'!r}"
        label = adapter_formats.label(lora.type, lora.dora_axis)
        return [f"output.format: {fmt!r} with {label}: {refused.why}; {fix}"]
    if (
        lora.type == "dora"
        and lora.dora_axis == "output"
        and (lora.train_text_encoder or lora.train_text_encoder_2)
    ):
        return [
            "lora.dora_axis: 'output' with a text encoder trained: diffusers loads "
            "DoRA magnitudes into the UNet only (transformers' adapter loader drops the text "
            "encoder's, so it would run without them); train the UNet only, or use "
            "lora.dora_axis = 'input' with the kohya file"
        ]
    return []


def optimizer_checks(config: RunConfig, warnings: list[str]) -> list[str]:
    """The optimizer against the LR schedule and the param groups (docs/optimizers.md)."""
    p: list[str] = []
    lora, train, optimizer = config.lora, config.train, config.optimizer
    text_trained = lora.train_text_encoder or lora.train_text_encoder_2
    lrs = [BaseLR("train.learning_rate", train.learning_rate)]
    # Each base LR a param group uses, named by the key that sets it (the second text
    # encoder's falls back on text_encoder_lr).
    if text_trained and train.text_encoder_lr:
        lrs.append(BaseLR("train.text_encoder_lr", train.text_encoder_lr))
    if lora.train_text_encoder_2 and train.text_encoder_2_lr:
        lrs.append(BaseLR("train.text_encoder_2_lr", train.text_encoder_2_lr))
    found = optimizer.interplay(config.lr_scheduler, lrs)
    warnings += found.warnings
    p += found.errors
    if optimizer.text_encoder_weight_decay != "same" and not text_trained:
        p.append(
            "optimizer.text_encoder_weight_decay: set, but lora.train_text_encoder is false; "
            'enable it or drop the key (or set it to "same")'
        )
    return p


def flatten(data: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"train": {"seed": 1}}`` → ``{"train.seed": 1}`` (or ``train/seed`` with ``sep="/"``)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}{sep}", sep))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ---------------------------------------------------------------- files and overrides


# What a --set value opens with when it is meant as TOML: a string, an array or an inline
# table. One of these that does not parse is a mistake to report (an unclosed brace, quotes
# the shell ate), not a bare string to pass on and fail later in a key that blames the file.
TOML_OPENERS = {'"': "string", "'": "string", "[": "array", "{": "inline table"}
TOML_EXAMPLES = {
    "string": '"some text"',
    "array": '["a", "b"]',
    "inline table": '{name = "cosine"}',
}


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``table.key=value``; the value is TOML (``--set train.max_steps=10``), or a bare
    string when it is not valid TOML and does not open like a TOML string, array or table
    (``--set data.path=/data/cats``)."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected table.key=value"], "--set")
    key, raw = text.split("=", 1)
    prefix = "v = "
    try:
        value = tomllib.loads(prefix + raw)["v"]
    except tomllib.TOMLDecodeError as err:
        kind = TOML_OPENERS.get(raw.lstrip()[:1])
        if kind is None:
            return key.strip().split("."), raw
        # tomllib counts columns from the start of "v = ..."; say where in the value instead.
        reason = re.sub(
            r"\(at line 1, column (\d+)\)",
            lambda m: f"(at character {int(m[1]) - len(prefix)} of the value)",
            str(err),
        ).replace("(at end of document)", "(at the end of the value)")
        raise ConfigError(
            [
                f"--set {text!r}: the value opens like a TOML {kind} but is not valid TOML: "
                f"{reason[:1].lower()}{reason[1:]}; write it as in a config file and quote the "
                f"whole argument for your shell, e.g. --set '{key.strip()}="
                f"{TOML_EXAMPLES[kind]}'"
            ],
            "--set",
        ) from err
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of raw TOML data with ``--set`` overrides applied (validated later).

    Raises:
        ConfigError: Every ``--set`` that cannot be read or applied, all at once.
    """
    data = json.loads(json.dumps(data))  # deep copy of plain TOML data
    problems = []
    for text in overrides:
        try:
            keys, value = parse_override(text)
        except ConfigError as err:
            problems += err.problems
            continue
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                problems.append(f"--set {text!r}: {k} is not a table")
                break
        else:
            node[keys[-1]] = value
    if problems:
        raise ConfigError(problems, "--set")
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
    top = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    blocks = ["\n".join(top)] if top else []
    for name, table in data.items():
        if isinstance(table, Mapping):
            body = "\n".join(f"{k} = {toml_value(v)}" for k, v in table.items())
            blocks.append(f"[{name}]\n{body}")
    return "\n\n".join(blocks) + "\n"


RECIPE_NOTE = (
    "These are the built-in defaults. configs/lora.toml is a recipe, not this list: its values\n"
    "(e.g. buckets, caches, a cosine schedule) differ from the defaults on purpose."
)


def describe_optimizers() -> str:
    """The ``[optimizer]`` reference: ``name``, then the keys of every registered optimizer."""
    from trainer import optimizers

    lines = [
        "[optimizer]",
        f"  name (str, default {toml_value(optimizer_config.DEFAULT)}): the optimizer, one of "
        f'{", ".join(optimizers.available())} (or "package.module:Class"); each takes its '
        "own keys, listed below (docs/optimizers.md explains them)",
    ]
    for name in optimizers.available():
        cls = optimizers.get(name)
        lines += ["", f"  with name = {toml_value(name)}:"]
        lines.append(describe_table(cls, "", indent="    "))
    return "\n".join(lines)


def describe() -> str:
    """Every table and key with its type, TOML default and doc: the config reference."""
    lines = [RECIPE_NOTE, ""]
    types = field_types(RunConfig)
    for f in dataclasses.fields(RunConfig):
        tp = types[f.name]
        if f.name == "lr_scheduler":
            lines += [
                "",
                "[lr_scheduler]",
                '  name (str, default "constant"): the LR schedule; `sdlora schedules` lists '
                "them, and each takes its own keys: `sdlora schedules NAME` shows them",
            ]
        elif f.name == "optimizer":
            lines += ["", describe_optimizers()]
        elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
            lines += ["", describe_table(tp, f.name)]
        else:
            lines.append(
                f"{f.name} ({tp.__name__ if isinstance(tp, type) else tp}, "
                f"default {toml_value(f.default)}): {f.metadata['doc']}"
            )
    return "\n".join(lines)
