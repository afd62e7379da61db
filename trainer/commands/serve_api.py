"""What ``sdlora serve`` answers, without the web stack: a request's JSON in, the LRs out.

``POST /lr_schedule`` takes one JSON object in one of two forms:

- **a schedule table**, as in a config file, with the run's length and base LRs::

      {"lr_scheduler": {"name": "cosine", "warmup_steps": 100}, "total_steps": 1000,
       "base_lr": 1e-4, "step": 500}

  (``base_lrs``: one per param group; ``steps``: a list of updates);
- **a whole run config**, TOML text or the same tables as JSON, with optional ``set``
  overrides (``--set``'s ``table.key=value``): the run length and base LRs come from it as
  ``sdlora lr-plot`` derives them. A run measured in epochs needs the dataset's size, which the
  service does not read: ``examples`` gives it (``lr-plot --examples``), else the answer says so.

Updates are numbered from 1 to ``total_steps``, as in lr-plot's CSV, ``metrics.jsonl`` and the
checkpoints' ``step-NNNNNN``: update N's LRs are ``Schedule.lrs(N - 1, total, base_lrs)``, the
call the loop makes, so each answer equals lr-plot's CSV row to the last bit (JSON writes a
float as Python's ``repr``, which reads back as the same double).

Every problem is found at once and named as the config loader names it (the loader's own
checks run: they are this module's checks); :class:`RequestError` carries them with an HTTP
status. A schedule or optimizer ``name`` that is an import path is refused: a request never
makes the server import a module.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

import tomllib

import schedulers
from schedulers import config as schedule_config
from trainer.commands import lr_plot
from trainer.config import deprecated
from trainer.config.load import (
    ConfigError,
    LoggingConfig,
    RunConfig,
    apply_overrides,
    build,
    cross_checks,
)
from trainer.config.schema import MAX_UPDATES
from trainer.errors import UserError
from trainer.optimizers import config as optimizer_config
from typedtables import doc
from typedtables.fields import field_types, type_name
from typedtables.tables import build_table, class_summary, unknown_key_hint

# The largest body read, and the most updates (times param groups) one request evaluates: a
# run config is a few KB and 100,000 updates a ~0.7 MB list; beyond, split the request.
MAX_BODY_BYTES = 1_048_576
MAX_STEPS = 100_000
MAX_GROUPS = 8  # param groups: a run has one to three
SOURCE = "request"
# The keys besides LRRequest's fields: which of the two forms the request takes.
FORMS = ("lr_scheduler", "config")
LONGEST_MESSAGE = 600  # a problem quoting a huge value is cut, not echoed whole


class RequestError(UserError):
    """What is wrong with a request: every problem, and the HTTP status that says so."""

    def __init__(self, status: int, problems: Sequence[str], source: str = SOURCE) -> None:
        self.status = status
        self.problems = [
            p if len(p) <= LONGEST_MESSAGE else p[:LONGEST_MESSAGE] + "…" for p in problems
        ]
        self.source = source
        super().__init__(f"{len(self.problems)} problem(s) in {source}")

    def body(self) -> dict[str, Any]:
        """The JSON error: a summary, and one message per problem as the config loader says it."""
        return {"error": str(self), "problems": self.problems}


@dataclass(frozen=True)
class LRRequest:
    """The request's own keys (``lr_scheduler`` or ``config`` is the rest)."""

    total_steps: int = doc("Optimizer updates in the run (with lr_scheduler)", 0)
    base_lr: float = doc("Base LR of a single param group (with lr_scheduler)", 0.0)
    base_lrs: tuple[float, ...] = doc("Base LR of each param group (with lr_scheduler)", ())
    step: int = doc("The update to answer, from 1 (lr-plot's CSV numbering)", 0)
    steps: tuple[int, ...] = doc(f"Updates to answer, at most {MAX_STEPS:,}", ())
    set: tuple[str, ...] = doc("Overrides of the config, as --set's table.key=value", ())
    processes: int = doc("Processes the run will use (with config)", 1)
    examples: int = doc("Dataset size to assume when the run is in epochs (with config)", 0)


@dataclass(frozen=True)
class Run:
    """What the LRs depend on: the schedule, the run length and the base LRs."""

    schedule: schedulers.Schedule
    total: int
    base_lrs: list[float]
    warnings: list[str] = field(default_factory=list)  # the config loader's, for a config


@dataclass(frozen=True)
class Answer:
    """A request's LRs, and what the service's metrics count."""

    body: dict[str, Any]
    lr_scheduler: str  # the schedule's registered name
    evaluations: int  # Schedule.lrs calls made


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; NaN and Infinity are refused (JSON has neither)."""

    def refuse(name: str) -> float:
        raise ValueError(f"{name} is not a JSON number")

    try:
        data = json.loads(body, parse_constant=refuse)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(400, [f"the body is not valid JSON: {err}"]) from err
    if not isinstance(data, dict):
        raise RequestError(
            400, [f"the body must be a JSON object of keys, got a {type(data).__name__}"]
        )
    return data


def answer(data: Mapping[str, Any]) -> Answer:
    """Every param group's LR at the requested updates, or a :class:`RequestError`."""
    problems: list[str] = []
    request = _request_keys(data, problems)
    if problems:  # as in a config table: the checks of values run once every key is typed
        if isinstance(data.get("lr_scheduler"), Mapping):
            problems += _schedule_table(data["lr_scheduler"])[1]
        raise RequestError(422, problems)
    forms = [key for key in FORMS if key in data]
    if len(forms) != 1:
        shown = "both" if forms else "neither"
        problems.append(
            f"{SOURCE}: give lr_scheduler (a schedule table, with total_steps and base_lr or "
            f"base_lrs) or config (a whole run config); {shown} given"
        )
        raise RequestError(422, problems)
    if forms == ["config"]:
        run = _from_config(data["config"], data, request, problems)
    else:
        run = _from_table(data["lr_scheduler"], data, request, problems)
    steps = _steps(data, request, run.total if run else 0, problems)
    if problems or run is None:
        raise RequestError(422, problems)
    # The loop's call (trainer/run/loop.py apply_lr_schedule), at the 0-based update index.
    rows = [run.schedule.lrs(step - 1, run.total, run.base_lrs) for step in steps]
    body: dict[str, Any] = {
        "lr_scheduler": {"name": run.schedule.name, **run.schedule.params()},
        "total_steps": run.total,
        "base_lrs": run.base_lrs,
    }
    if "step" in data:
        body.update(step=steps[0], lrs=rows[0])
    else:
        body.update(steps=steps, lrs=rows)
    if run.warnings:
        body["warnings"] = run.warnings
    return Answer(body, run.schedule.name, len(steps))


def _request_keys(data: Mapping[str, Any], problems: list[str]) -> LRRequest:
    """The typed request keys (``steps`` checked here, without echoing a long list)."""
    names = [*field_types(LRRequest), *FORMS]

    def unknown(cls: type, key: str, where: str) -> str:
        return f"{where}.{key}: unknown key{unknown_key_hint(key, names)}"

    table = {k: v for k, v in data.items() if k != "steps"}
    request = build_table(LRRequest, table, SOURCE, problems, unknown=unknown, skip=FORMS)
    if "steps" not in data:
        return request
    raw = data["steps"]
    if not isinstance(raw, list):
        problems.append(f"{SOURCE}.steps: expected a list of updates, got {type(raw).__name__}")
        return request
    wrong = next((s for s in raw if isinstance(s, bool) or not isinstance(s, int)), None)
    if wrong is not None:
        problems.append(f"{SOURCE}.steps: expected ints (updates), got {wrong!r} among them")
        return request
    return replace(request, steps=tuple(raw))


def _not_here(data: Mapping[str, Any], keys: Sequence[str], why: str) -> list[str]:
    return [f"{SOURCE}.{key}: {why}" for key in keys if key in data]


def _from_table(
    table: Any, data: Mapping[str, Any], request: LRRequest, problems: list[str]
) -> Run | None:
    """A schedule table, with the run length and base LRs the request gives."""
    problems += _not_here(
        data, ("set", "processes", "examples"), "goes with config, not lr_scheduler; drop it"
    )
    schedule, found = _schedule_table(table)
    problems += found
    total = request.total_steps
    if "total_steps" not in data:
        problems.append(f"{SOURCE}.total_steps: required with lr_scheduler: updates in the run")
    elif not 1 <= total <= MAX_UPDATES:
        problems.append(f"{SOURCE}.total_steps: {total} must be in 1..{MAX_UPDATES:,}")
    lrs = _table_base_lrs(data, request, problems)
    if schedule is None or found or problems:
        return None
    problems += schedule.check(total, "lr_scheduler", base_lrs=lrs)
    return Run(schedule, total, lrs)


def _schedule_table(table: Any) -> tuple[schedulers.Schedule | None, list[str]]:
    """The ``[lr_scheduler]`` table built as the config loader builds it, and its problems
    (an import path is refused before anything is imported)."""
    refused = _import_path(table, "lr_scheduler")
    if refused:
        return None, refused
    found: list[str] = []
    schedule = schedule_config.build(table, "lr_scheduler", found)
    return schedule, found


def _table_base_lrs(
    data: Mapping[str, Any], request: LRRequest, problems: list[str]
) -> list[float]:
    given = [key for key in ("base_lr", "base_lrs") if key in data]
    if len(given) != 1:
        problems.append(
            f"{SOURCE}.base_lr: give base_lr (one param group) or base_lrs (one per group); "
            f"{'both' if given else 'neither'} given"
        )
        return []
    lrs = [request.base_lr] if given == ["base_lr"] else list(request.base_lrs)
    key = given[0]
    if not 1 <= len(lrs) <= MAX_GROUPS:
        problems.append(f"{SOURCE}.{key}: {len(lrs)} param groups; give 1 to {MAX_GROUPS}")
    for lr in lrs:
        if lr <= 0:
            problems.append(f"{SOURCE}.{key}: {lr} must be > 0 (as train.learning_rate)")
            break
    return lrs


def _import_path(table: Any, where: str) -> list[str]:
    """A ``"package.module:Class"`` name would make the server import that module: refused."""
    name = table.get("name") if isinstance(table, Mapping) else None
    if not (isinstance(name, str) and ":" in name):
        return []
    return [
        f"{where}.name: {name!r} is an import path, and the service imports no module a request "
        "names; it knows the registered names (GET /schedules); install a plug-in through its "
        "entry point to add one (docs/schedules.md)"
    ]


def _from_config(
    raw: Any, data: Mapping[str, Any], request: LRRequest, problems: list[str]
) -> Run | None:
    """A whole run config: the run length and base LRs derived as ``lr-plot`` derives them."""
    problems += _not_here(
        data,
        ("total_steps", "base_lr", "base_lrs"),
        "comes from the config (train.max_steps or train.epochs; train.learning_rate...); "
        'drop it, or override the config: "set": ["train.max_steps=2000"]',
    )
    if request.processes < 1:
        problems.append(f"{SOURCE}.processes: {request.processes} must be >= 1")
    if request.examples < 0:
        problems.append(f"{SOURCE}.examples: {request.examples} must be >= 0")
    tables = _tables(raw, request, problems)
    config = None if tables is None or problems else _build_here(tables, problems)
    if tables is None or config is None or problems:
        return None
    lrs = config.base_lrs()
    train = config.train
    if not train.max_steps and not request.examples:
        problems.append(
            f"train.max_steps: 0, so the run lasts train.epochs = {train.epochs} epoch(s) of the "
            'dataset, which the service does not read; send "examples" (the number of images, '
            'as lr-plot --examples) or set the length: "set": ["train.max_steps=2000"]'
        )
        return None
    try:
        total = lr_plot.total_updates(config, request.processes, request.examples or None)
    except ConfigError as err:
        problems += err.problems
        return None
    problems += config.lr_scheduler.check(total, base_lrs=lrs)
    return Run(config.lr_scheduler, total, lrs, config_warnings(tables, config))


def config_warnings(tables: Mapping[str, Any], config: RunConfig) -> list[str]:
    """What the loader would warn of (deprecated keys, risky combinations): the server's log
    is not the client's, so they go into the answer."""
    warnings: list[str] = []
    deprecated.upgrade(tables, [], warnings)
    cross_checks(config, warnings)
    return warnings


def _tables(raw: Any, request: LRRequest, problems: list[str]) -> dict[str, Any] | None:
    """The config's tables with the ``set`` overrides, as ``config.load`` reads a file and
    ``--set`` flags."""
    if isinstance(raw, str):
        try:
            tables: Any = tomllib.loads(raw)
        except tomllib.TOMLDecodeError as err:
            problems.append(f"config: not valid TOML: {err}")
            return None
    elif isinstance(raw, dict):
        tables = raw
    else:
        problems.append(
            f"config: expected TOML text or a JSON object of tables, got {type(raw).__name__}"
        )
        return None
    try:
        tables = apply_overrides(tables, request.set)
    except ConfigError as err:
        problems += err.problems
        return None
    for where in ("lr_scheduler", "optimizer"):
        problems += _import_path(tables.get(where), where)
    return tables


def _build_here(tables: dict[str, Any], problems: list[str]) -> RunConfig | None:
    """``config.build``, less what only this server's missing packages make a problem.

    A tracker or optimizer extra the server lacks says nothing about the LRs a run applies:
    when those are the only problems, the config is rebuilt without the two tables they are
    in (neither shapes the curve; the schedule's rules with the optimizer passed already).
    """
    try:
        return build(tables, source="config")
    except ConfigError as err:
        local = _package_problems(tables)
        left = [p for p in err.problems if p not in local]
        if left or not local:
            problems += left or err.problems
            return None
    return build({**tables, "logging": {}, "optimizer": {}}, source="config")


def _package_problems(tables: Mapping[str, Any]) -> list[str]:
    """The config's problems that come from packages this environment lacks."""
    tables = deprecated.upgrade(tables, [], [])  # the optimizer keys [train] used to hold
    logging_table = build_table(LoggingConfig, tables.get("logging", {}), "logging", [])
    optimizer = optimizer_config.build(tables.get("optimizer", {}), "optimizer", [])
    return logging_table.package_problems("logging") + optimizer.package_problems("optimizer")


def _steps(
    data: Mapping[str, Any], request: LRRequest, total: int, problems: list[str]
) -> list[int]:
    """The updates asked for, each in 1..total."""
    given = [key for key in ("step", "steps") if key in data]
    if len(given) != 1:
        problems.append(
            f"{SOURCE}.step: give step (one update) or steps (a list), numbered from 1 as in "
            f"lr-plot's CSV; {'both' if given else 'neither'} given"
        )
        return []
    steps = [request.step] if given == ["step"] else list(request.steps)
    key = given[0]
    if not steps:
        problems.append(f"{SOURCE}.steps: empty; give at least one update")
    elif len(steps) > MAX_STEPS:
        problems.append(
            f"{SOURCE}.steps: {len(steps):,} updates in one request; at most {MAX_STEPS:,} "
            "(MAX_STEPS): split it into several requests"
        )
    elif total >= 1:
        outside = [s for s in steps if not 1 <= s <= total]
        if outside:
            more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
            problems.append(
                f"{SOURCE}.{key}: update {outside[0]}{more} is out of range: a run of {total} "
                f"updates has updates 1..{total} (numbered as lr-plot's CSV and metrics.jsonl)"
            )
    return steps


# ---------------------------------------------------------------- the registry


def schedule_list() -> dict[str, Any]:
    """Every schedule's name and one-line summary, as ``sdlora schedules`` lists them."""
    return {
        "schedules": [
            {"name": name, "summary": class_summary(schedulers.get(name))}
            for name in schedulers.available()
        ]
    }


def schedule_info(name: str) -> dict[str, Any]:
    """One schedule's description, formula and keys, as ``sdlora schedules NAME`` shows them.

    Raises:
        RequestError: 404 for an unknown name (with the closest one) or an import path.
    """
    problems = _import_path({"name": name}, "lr_scheduler")
    if problems:
        raise RequestError(404, problems)
    try:
        cls = schedulers.get(name)
    except schedulers.UnknownScheduleError as err:
        raise RequestError(404, [str(err)]) from err
    types = field_types(cls)
    keys = []
    for f in fields(cls):
        default = None if f.default is MISSING else f.default
        keys.append(
            {
                "name": f.name,
                "type": type_name(types[f.name]),
                "default": list(default) if isinstance(default, tuple) else default,
                "doc": f.metadata["doc"],
            }
        )
    return {
        "name": cls.name,
        "summary": class_summary(cls),
        "doc": inspect.getdoc(cls) or "",
        "keys": keys,
        "text": schedulers.describe(name),
    }
