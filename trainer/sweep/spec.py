"""The sweep file (``configs/sweeps/*.toml``): read strictly, every problem reported at once.

Paths: ``base`` is relative to the sweep file's own folder, so a sweep file and the config it
names work together from any directory. Every other path (``output_dir`` here, and the paths
inside the run configs) is relative to the directory you run from, as everywhere in sdlora.

A sweep varies its trials in one of three ways: ``[[trials]]`` (a list of override tables),
``[grid]`` (every combination of the values listed per key) or ``[search]`` (ranges that
Optuna's TPE sampler explores for ``n_trials`` configurations). ``seeds`` repeats each
configuration once per seed (``[set] "train.seed" = 7`` without ``seeds`` means ``seeds =
[7]``; nothing else may set the seed). ``[set]`` overrides every trial, ``[pruner]`` stops
clearly worse trials early. See docs/sweeps.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeGuard

from trainer.config.load import read_toml
from trainer.sweep.objectives import OBJECTIVES, Objective, objective_problems
from trainer.sweep.overrides import Assignment, assignments, key_label, label
from typedtables import ConfigError, build_table, doc

TABLES = ("set", "grid", "trials", "search", "pruner")
RANGE_KEYS = ("low", "high", "log", "step")
# The [pruner] names and Optuna's pruner class of each (in optuna.pruners).
PRUNERS = {
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "threshold": "ThresholdPruner",
}
SEED_KEY = "train.seed"  # set per run from ``seeds``; see _seed_problems


@dataclass(frozen=True)
class SweepFile:
    """The sweep file's own keys (its tables are read beside them)."""

    base: str = doc(
        "The run config every trial starts from; relative to the sweep file's folder (required)",
        "",
    )
    name: str = doc("The Optuna study name; empty = the sweep file's name without .toml", "")
    output_dir: str = doc(
        "The sweep folder (trials, journal, report); empty = output/sweeps/NAME; relative to "
        "the directory you run from",
        "",
    )
    seeds: tuple[int, ...] = doc(
        "Every configuration trains once per seed (train.seed); left out = [set]'s train.seed, "
        "else the base config's seed",
        [],
    )
    launch: tuple[str, ...] = doc(
        "accelerate launch flags of every trial, e.g. ['--num_processes', '2']; "
        "--launch on the command line replaces them",
        [],
    )
    n_trials: int = doc("With [search]: how many configurations the sampler tries", 0)
    sampler_seed: int = doc(
        "With [search]: the TPE sampler's seed (reproducible with one worker); -1 = random", -1
    )
    share_cache: bool = doc(
        "Trials that would encode the same latents (or text-encoder outputs) read one cache in "
        "the sweep folder, filled once (cache/)",
        True,
    )
    share_prefixes: bool = doc(
        "Train once the updates that trials with the same config but for the LR schedule and "
        "run length share (the same LRs), then fork each trial from a checkpoint (stems/)",
        True,
    )
    warm_workers: bool = doc(
        "A worker runs each single-process trial (and stem) in its own process, keeping the "
        "libraries loaded; false starts a training process per trial",
        True,
    )
    heartbeat_seconds: int = doc(
        "With --storage (an RDB): seconds between a running trial's heartbeats; a trial "
        "silent for 3 times this is taken over by another worker",
        60,
    )
    objective: tuple[str, ...] = doc(
        "What the verdict compares: 'final' (the final validation loss), 'best' (the lowest "
        "validation loss of the run), or an image score of validation.scores ('clip_t', "
        "'clip_i', 'dino'); a list of two makes an Optuna multi-objective study",
        ["final"],
    )

    def problems(self, where: str) -> list[str]:
        """Checks of these keys alone."""
        p = []
        if not self.base.strip():
            p.append("base: required; the run config the trials start from, e.g. '../tiny.toml'")
        if len(set(self.seeds)) != len(self.seeds):
            p.append(f"seeds: {list(self.seeds)} repeats a seed")
        if self.heartbeat_seconds < 1:
            p.append("heartbeat_seconds: must be >= 1")
        return p + objective_problems(self.objective)


def param_value(value: Any) -> Any:
    """A value as an Optuna parameter: scalars as they are; a table or a list by its label,
    because Optuna's categorical values must be plain scalars."""
    return label(value) if isinstance(value, (Mapping, list, tuple)) else value


@dataclass(frozen=True)
class Point:
    """One configuration of a grid or a trial list, before seeds."""

    label: str
    params: dict[str, Any]  # what Optuna records for it (and the dashboard shows)
    settings: tuple[Assignment, ...]


@dataclass(frozen=True)
class SearchParam:
    """One key the TPE sampler explores: a range (``low``/``high``) or ``choices``."""

    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def bounds(self) -> tuple[float, float]:
        """``(low, high)`` of a range (``int`` ones when :attr:`is_int`)."""
        if self.low is None or self.high is None:
            raise ValueError(f"{self.key}: a choice among values, not a range")
        return self.low, self.high

    def choice_labels(self) -> list[Any]:
        """Categorical values as Optuna stores them: scalars as they are, tables by label."""
        return [param_value(c) for c in self.choices]

    def value(self, param: Any) -> Any:
        """The override value for a sampled parameter (a choice label maps back to its table)."""
        if self.choices:
            return self.choices[self.choice_labels().index(param)]
        return param


@dataclass(frozen=True)
class Spec:
    """A parsed sweep file."""

    path: Path
    file: SweepFile
    name: str
    base: Path
    sweep_dir: Path
    common: tuple[Assignment, ...]
    mode: str  # "grid", "trials" or "search"
    points: tuple[Point, ...] = ()
    search: tuple[SearchParam, ...] = ()
    pruner: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def objectives(self) -> tuple[Objective, ...]:
        """The sweep's objectives, in the file's order (unknown names were reported)."""
        return tuple(OBJECTIVES[n] for n in self.file.objective if n in OBJECTIVES)

    def search_point(self, params: Mapping[str, Any]) -> Point:
        """The configuration a [search] trial's sampled parameters stand for."""
        settings: list[Assignment] = []
        parts = []
        for p in self.search:
            value = p.value(params[p.key])
            settings += assignments(p.key, value)
            parts.append(key_label(p.key, value))
        return Point(", ".join(parts), dict(params), tuple(settings))


def load(path: str | Path, output_dir: str | None = None) -> Spec:
    """Read and check a sweep file.

    Args:
        path: The sweep file.
        output_dir: The sweep folder, replacing the file's ``output_dir``.

    Raises:
        ConfigError: every problem at once, each naming its key.
    """
    spec, problems = read(path, output_dir)
    if problems:
        raise ConfigError(problems, str(spec.path))
    return spec


def read(path: str | Path, output_dir: str | None = None) -> tuple[Spec, list[str]]:
    """Read a sweep file, returning its problems instead of raising on them.

    The spec is the best reading of a file with problems (a bad value is left out), so that
    ``expand.check`` can expand it and report the problems of its runs in the same list.

    Raises:
        ConfigError: the file is missing or is not TOML (nothing else can be read then).
    """
    path = Path(path)
    data = read_toml(path)
    problems: list[str] = []
    if isinstance(data.get("objective"), str):  # one objective may be given bare
        data = {**data, "objective": [data["objective"]]}
    file = build_table(SweepFile, data, "", problems, skip=TABLES)
    problems = [p.lstrip(".") for p in problems]
    if "seeds" in data and data["seeds"] == []:
        problems.append(
            "seeds: an empty list trains nothing; give at least one seed (seeds = [0, 1, 2]), "
            "or leave seeds out to train once with the base config's train.seed"
        )
    name = file.name or path.stem
    base = (path.parent / file.base).resolve() if file.base else path
    if file.base and not base.is_file():
        problems.append(f"base: {file.base!r} is not a file (looked for {base})")
    sweep_dir = Path(output_dir or file.output_dir or f"output/sweeps/{name}")
    common = _settings(data.get("set", {}), "set", problems)
    file, common = _set_seed(file, "seeds" in data, common, problems)
    modes = [t for t in ("grid", "trials", "search") if t in data]
    if len(modes) != 1:
        problems.append(
            "[grid], [[trials]] or [search]: give exactly one"
            + (f" (found {', '.join(modes)})" if modes else "")
        )
    mode = modes[0] if modes else "trials"
    points: list[Point] = []
    search: list[SearchParam] = []
    if mode == "grid":
        points = _grid(data["grid"], problems)
    elif mode == "trials":
        points = _trials(data.get("trials", []), problems)
    else:
        search = _search(data["search"], problems)
    problems += _seed_problems(mode, points, search)
    if mode == "search" and file.n_trials < 1:
        problems.append("n_trials: with [search], set how many configurations to try (>= 1)")
    if mode != "search" and (file.n_trials or file.sampler_seed != -1):
        problems.append(
            "n_trials / sampler_seed: only for [search]; a grid or trial list is run whole"
        )
    pruner = _pruner(data.get("pruner"), problems)
    if pruner is not None and len(file.objective) > 1:
        problems.append(
            "pruner: Optuna prunes on one objective's intermediate values; with two "
            "objectives drop [pruner] (or keep one objective)"
        )
    # Repeated seeds are reported above; expanding them once keeps that the only report.
    file = replace(file, seeds=tuple(dict.fromkeys(file.seeds)))
    return Spec(
        path, file, name, base, sweep_dir, tuple(common), mode, tuple(points), tuple(search),
        pruner,
    ), problems  # fmt: skip


def _settings(table: Any, where: str, problems: list[str]) -> list[Assignment]:
    if not isinstance(table, Mapping):
        problems.append(f"{where}: expected a table of config keys, got {table!r}")
        return []
    out: list[Assignment] = []
    for key, value in table.items():
        out += assignments(key, value)
    return out


def _set_seed(
    file: SweepFile, seeds_given: bool, common: list[Assignment], problems: list[str]
) -> tuple[SweepFile, list[Assignment]]:
    """``[set] "train.seed" = 7`` without ``seeds`` means ``seeds = [7]``: every run's seed is
    set from ``seeds``, after all overrides, so a seed left in [set] would be overridden."""
    given = [value for key, value in common if key == SEED_KEY]
    if not given:
        return file, common
    value = given[-1]
    if seeds_given:
        problems.append(
            f"set.{SEED_KEY}: the seeds are given by seeds = {list(file.seeds)}; drop "
            f"{SEED_KEY} from [set] (or list it in seeds)"
        )
    elif not isinstance(value, int) or isinstance(value, bool):
        problems.append(f"set.{SEED_KEY}: expected an integer seed, got {value!r}")
    else:
        file = replace(file, seeds=(value,))
    return file, [a for a in common if a[0] != SEED_KEY]


def _seed_problems(mode: str, points: list[Point], search: list[SearchParam]) -> list[str]:
    """A grid, trial list or search that varies train.seed: each run's seed comes from
    ``seeds`` (which the verdict compares over), so a varied seed would be overridden."""
    keys: list[str] = []
    for i, point in enumerate(points):
        if any(k == SEED_KEY for k, _ in point.settings):
            keys.append(f"trials[{i}].{SEED_KEY}" if mode == "trials" else f"grid.{SEED_KEY}")
    for p in search:
        values = p.choices or (None,)
        if any(k == SEED_KEY for v in values for k, _ in assignments(p.key, v)):
            keys.append(f"search.{p.key}")
    text = "the seed is not varied per configuration; list the seeds in seeds = [0, 1, 2] and "
    return [f"{k}: {text}every configuration trains once per seed" for k in dict.fromkeys(keys)]


def _axes(table: Mapping, prefix: str, problems: list[str]) -> list[tuple[str, list]]:
    """Grid keys and their value lists; bare dotted keys arrive as nested tables."""
    axes = []
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, list):
            if not value:
                problems.append(f"grid.{full}: an empty list leaves nothing to try")
            axes.append((full, value))
        elif isinstance(value, Mapping):
            axes += _axes(value, full, problems)
        else:
            problems.append(
                f"grid.{full}: expected a list of values to try, got {value!r}; "
                "a single value belongs in [set]"
            )
    return axes


def _grid(table: Any, problems: list[str]) -> list[Point]:
    import itertools

    if not isinstance(table, Mapping) or not table:
        problems.append("grid: expected a table of keys, each with a list of values to try")
        return []
    axes = _axes(table, "", problems)
    for key, values in axes:
        labels = [label(v) for v in values]
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated:
            problems.append(f"grid.{key}: the value {repeated[0]!r} is listed twice")
    # Whole tables are applied before single keys (overrides.ordered), so the order of the
    # axes in the file only decides the order of the trials.
    points = []
    for combo in itertools.product(*(values for _, values in axes)):
        settings: list[Assignment] = []
        parts, params = [], {}
        for (key, _), value in zip(axes, combo, strict=True):
            settings += assignments(key, value)
            parts.append(key_label(key, value))
            params[key] = param_value(value)
        points.append(Point(", ".join(parts), params, tuple(settings)))
    return points


def _trials(items: Any, problems: list[str]) -> list[Point]:
    if not isinstance(items, list) or not items:
        problems.append("trials: expected [[trials]] tables, one per configuration")
        return []
    points, seen = [], set()
    for i, item in enumerate(items):
        where = f"trials[{i}]"
        if not isinstance(item, Mapping):
            problems.append(f"{where}: expected a table of overrides, got {item!r}")
            continue
        overrides = {k: v for k, v in item.items() if k != "name"}
        settings: list[Assignment] = []
        for key, value in overrides.items():
            settings += assignments(key, value)
        if not settings:
            problems.append(f"{where}: overrides nothing; give at least one key")
        name = item.get("name", "")
        if not isinstance(name, str):
            problems.append(f"{where}.name: expected a string label, got {name!r}")
            name = ""
        name = name or ", ".join(key_label(k, v) for k, v in overrides.items())
        if name in seen:
            problems.append(f"{where}.name: {name!r} names two trials; give each its own name")
        seen.add(name)
        points.append(Point(name, {"trial": name}, tuple(settings)))
    return points


def _search(table: Any, problems: list[str], prefix: str = "") -> list[SearchParam]:
    if not isinstance(table, Mapping) or not table:
        problems.append("search: expected keys with {low, high} ranges or {choices = [...]}")
        return []
    params = []
    for key, spec in table.items():
        full = f"{prefix}.{key}" if prefix else key
        where = f"search.{full}"
        if not isinstance(spec, Mapping):
            problems.append(f"{where}: expected {{low = ..., high = ...}} or {{choices = [...]}}")
        elif "choices" in spec or "low" in spec or "high" in spec:
            param = _search_param(full, spec, where, problems)
            if param:
                params.append(param)
        else:
            params += _search(spec, problems, full)
    return params


def _search_param(key: str, spec: Mapping, where: str, problems: list[str]) -> SearchParam | None:
    if "choices" in spec:
        extra = sorted(set(spec) - {"choices"})
        choices = spec["choices"]
        if extra or not isinstance(choices, list) or not choices:
            problems.append(
                f"{where}: give only a non-empty 'choices' list (not {extra or choices})"
            )
            return None
        return SearchParam(key, choices=tuple(choices))
    unknown = sorted(set(spec) - set(RANGE_KEYS))
    if unknown:
        problems.append(f"{where}: unknown key(s) {unknown}; a range takes {', '.join(RANGE_KEYS)}")
    low, high = spec.get("low"), spec.get("high")
    if not (_number(low) and _number(high)) or not low < high:
        problems.append(f"{where}: needs numbers low < high (got low={low!r}, high={high!r})")
        return None
    log, step = bool(spec.get("log", False)), spec.get("step")
    if log and low <= 0:
        problems.append(f"{where}: log = true needs low > 0")
    if log and step is not None:
        problems.append(f"{where}: give log or step, not both")
    return SearchParam(key, low, high, log, step)


def _number(value: object) -> TypeGuard[int | float]:
    """An int or a float; not a bool, which Python counts as an int."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def pruner_class(name: str) -> type:
    """Optuna's pruner of that name (the sweep file's ``[pruner] name``)."""
    import optuna

    return getattr(optuna.pruners, PRUNERS[name])


def _pruner(table: Any, problems: list[str]) -> dict[str, Any] | None:
    if table is None:
        return None
    if not isinstance(table, Mapping) or table.get("name") not in (*PRUNERS, "none"):
        problems.append(f"pruner.name: one of {', '.join(PRUNERS)} (or 'none')")
        return None
    if table["name"] == "none":
        return None
    import inspect

    params = inspect.signature(pruner_class(table["name"])).parameters
    for key in table:
        if key != "name" and key not in params:
            problems.append(
                f"pruner.{key}: not a setting of Optuna's {table['name']} pruner; "
                f"it takes {', '.join(params)}"
            )
    return dict(table)
