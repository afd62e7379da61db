"""From a sweep file to runs: every configuration × seed as a full, validated run config.

A *run* is one ordinary training run (one configuration, one seed, one folder). Its folder
name is deterministic, ``<label>-seed<N>-<hash>``, the hash taken over every config key that
can change the trained weights, so a retried or resumed trial always finds its own
checkpoints, and a changed configuration never reuses another's folder.

Every run is checked before the first one starts (:func:`check`), and all problems come back
at once, each naming the trial, the seed and the key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import load as run_config
from trainer.config.load import ConfigError, RunConfig
from trainer.run.resume import FREE_KEYS
from trainer.sweep.engine import grid_problems
from trainer.sweep.engine import seeds as sweep_seeds
from trainer.sweep.overrides import ordered, set_flags, slug, toml_text
from trainer.sweep.spec import Point, Spec

TRIALS_DIR = "trials"
# output_dir is set per run at launch; any value does while checking (it is not hashed).
PLACEHOLDER_DIR = "sweep-run"


@dataclass(frozen=True)
class Run:
    """One configuration trained with one seed, in its own folder."""

    point: Point
    seed: int
    key: str  # the folder name under <sweep>/trials/
    flags: tuple[str, ...]  # --set values, output_dir not included
    config: RunConfig

    @property
    def name(self) -> str:
        """How the run is named in messages and reports."""
        return f"{self.point.label} · seed {self.seed}"

    @property
    def params(self) -> dict[str, Any]:
        """The Optuna parameters of a grid or trial-list run."""
        return {**self.point.params, "seed": self.seed}

    def folder(self, spec: Spec) -> Path:
        return spec.sweep_dir / TRIALS_DIR / self.key

    def launch_flags(self, spec: Spec) -> list[str]:
        """Every ``--set`` of the run's command, its own output_dir last."""
        return [*self.flags, f"output_dir={toml_text(str(self.folder(spec)))}"]


def weights_hash(config: RunConfig) -> str:
    """A short hash of every key that can change the trained weights."""
    flat = run_config.flatten(config.to_dict())
    kept = {k: v for k, v in flat.items() if not k.startswith(FREE_KEYS)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:8]


def build_runs(
    spec: Spec, points: Sequence[Point], problems: dict[str, list[str]] | None = None
) -> list[Run]:
    """Every point × seed, seed-major (all configurations once before any twice).

    Args:
        spec: The sweep.
        points: The configurations.
        problems: Collects config problems (problem → names of the runs it concerns); without
            it the first invalid run raises ConfigError.
    """
    base = run_config.read_toml(spec.base)
    runs = []
    for seed in sweep_seeds(spec):
        for point in points:
            settings = [*ordered([*spec.common, *point.settings]), ("train.seed", seed)]
            flags = tuple(set_flags(settings))
            name = f"trial {point.label!r} (seed {seed})"
            try:
                data = run_config.apply_overrides(base, [*flags, f"output_dir={PLACEHOLDER_DIR!r}"])
                cfg = run_config.build(data, source=name)
            except ConfigError as err:
                if problems is None:
                    raise
                for problem in err.problems:
                    problems.setdefault(problem, []).append(name)
                continue
            key = f"{slug(point.label)}-seed{seed}-{weights_hash(cfg)}"
            runs.append(Run(point, seed, key, flags, cfg))
    return runs


def launch_processes(launch: Sequence[str]) -> int:
    """The process count the launch flags ask for (``--num_processes``), else 1.

    Raises:
        ValueError: the count is not a whole number.
    """
    for i, arg in enumerate(launch):
        if arg == "--num_processes" and i + 1 < len(launch):
            return int(launch[i + 1])
        if arg.startswith("--num_processes="):
            return int(arg.split("=", 1)[1])
    return 1


def check(spec: Spec, launch: Sequence[str], found: Sequence[str] = ()) -> list[Run]:
    """Expand and check every run before any starts; raise ConfigError with every problem.

    Checked: each run's whole config (keys, types, ranges, cross-table rules), then the parts
    of preflight that need no model, once per distinct setting: the sweep folder is writable,
    the model source (and VAE) exists and has the LoRA target modules, the dataset and
    held-out set are usable, and the run length derived from them fits the schedule. The
    sweep's own needs: a validation set (the objective), validation during training when a
    pruner is on, no two configurations training the same thing, and grid values Optuna
    takes as parameters.

    Args:
        spec: The sweep, as ``spec.read`` gave it.
        launch: The trials' accelerate launch flags.
        found: Problems found already (the sweep file's own, the storage URL's), reported
            first in the same list.
    """
    problems: dict[str, list[str]] = {p: [] for p in found}
    try:
        processes = launch_processes(launch)
    except ValueError:
        problems[f"launch / --launch: --num_processes needs a whole number ({list(launch)})"] = []
        processes = 1
    runs: list[Run] = []
    try:
        # A missing or empty base is named among the sweep file's own problems.
        if spec.file.base and spec.base.is_file():
            run_config.read_toml(spec.base)
            runs = _check_runs(spec, processes, problems)
    except ConfigError as err:  # the base is not TOML: no run can be built from it
        problems.update({p: [] for p in err.problems})
    if problems:
        total = len(runs) or 1
        lines = []
        for problem, names in problems.items():
            who = "every trial" if len(names) >= total and total > 1 else ", ".join(names)
            lines.append(f"{who}: {problem}" if who else problem)
        raise ConfigError(lines, f"{spec.path} (checked before any trial starts)")
    return runs


def _check_runs(spec: Spec, processes: int, problems: dict[str, list[str]]) -> list[Run]:
    """Every run's problems into ``problems`` (problem → the runs it concerns)."""
    points = list(spec.points) if spec.mode != "search" else search_corners(spec)
    runs = build_runs(spec, points, problems)
    once: dict[str, Any] = {}
    for run in runs:
        for problem in run_problems(spec, run.config, processes, once):
            problems.setdefault(problem, []).append(f"trial {run.point.label!r} (seed {run.seed})")
    seen: dict[str, Run] = {}
    for run in runs:
        other = seen.setdefault(run.key, run)
        if other is not run and spec.mode != "search":
            problems.setdefault(
                f"trains the same config as trial {other.point.label!r}; drop one of them", []
            ).append(f"trial {run.point.label!r} (seed {run.seed})")
    if spec.mode != "search":
        for problem in grid_problems(spec):
            problems.setdefault(problem, [])
    return runs


def run_problems(spec: Spec, cfg: RunConfig, processes: int, once: dict[str, Any]) -> list[str]:
    """Model-free problems of one run's config; each distinct check runs once (``once``)."""
    from trainer.models import source
    from trainer.report import image_scores
    from trainer.run import preflight

    def cached(key: Any, compute: Callable[[], Any]) -> Any:
        text = json.dumps(key, sort_keys=True, default=str)
        if text not in once:
            once[text] = compute()
        return once[text]

    p = cached(["dir", str(spec.sweep_dir)], lambda: preflight.output_dir_problems(spec.sweep_dir))
    model = cfg.model

    def model_problems() -> list[str]:
        # The family against model.arch, and the targets in every trained text encoder, once
        # the source exists; the VAE either way, as the run's own preflight checks them.
        found = source.source_problems(model) or preflight.model_problems(cfg)[0]
        return found + source.vae_problems(model)

    data = cfg.to_dict()
    p = p + cached(["model", data["model"], data["lora"]], model_problems)
    p = p + cached(["hardware", data["train"]], lambda: preflight.hardware_problems(cfg))
    # The dataset is read even when train.max_steps fixes the length: a missing data.path
    # is found here with the rest, not by the first trial.
    examples = cached(["data", data["data"], data["validation"]], lambda: _examples(cfg))
    if isinstance(examples, list):
        p = p + examples
    else:
        key = ["length", data["data"], data["validation"], data["train"], data["lr_scheduler"]]
        p = p + cached([*key, processes], lambda: _length_problems(cfg, examples, processes))
    val = cfg.validation
    if not (val.fraction or val.path):
        p.append(
            "validation.fraction / validation.path: the sweep's objective is the validation "
            "loss; hold out images (validation.fraction = 0.1) or give validation.path"
        )
    for objective in spec.objectives:
        if objective.score and objective.score not in val.scores:
            p.append(
                f"objective = {objective.name!r}: the runs must compute it; add it to "
                f'validation.scores (in [set]: "validation.scores" = ["{objective.score}"])'
            )
    p = p + cached(["scorers", data["validation"]], lambda: image_scores.model_problems(val))
    if spec.pruner is not None and not val.every_n_steps:
        p.append(
            "validation.every_n_steps: the pruner needs validation losses during training; "
            "set it (e.g. 50), or drop [pruner]"
        )
    return p


def _examples(cfg: RunConfig) -> Any:
    """The run's training examples, checked as its preflight checks them (image headers
    only); their problems (a list) when the data is unusable."""
    from trainer.data.dataset import DataError
    from trainer.data.feed import checked_examples

    try:
        return checked_examples(cfg, show_progress=False, decode=False)[0]
    except DataError as err:
        return [str(err)]


def _length_problems(cfg: RunConfig, examples: Any, processes: int) -> list[str]:
    """Whether the run length derived from the data fits the batch and the schedule."""
    from trainer.run.plan import plan_run

    try:
        plan_run(cfg, examples.groups, processes)
    except ConfigError as err:
        return err.problems
    return []


def search_corners(spec: Spec) -> list[Point]:
    """Configurations that exercise every [search] bound and choice (it cannot all be run
    in advance): all lows, all highs, and each choice with the other keys at their lows."""
    low = {p.key: (p.choice_labels()[0] if p.choices else p.low) for p in spec.search}
    high = {p.key: (p.choice_labels()[-1] if p.choices else p.high) for p in spec.search}
    combos = [low, high]
    for p in spec.search:
        for choice in p.choice_labels()[1:-1]:
            combos.append({**low, p.key: choice})
    return [spec.search_point(c) for c in combos]
