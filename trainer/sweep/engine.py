"""Optuna as the sweep's engine: the storage, the study, its sampler and pruner.

- **Storage.** Without ``--storage``, a journal file in the sweep folder
  (``optuna.storages.JournalStorage`` over ``JournalFileBackend``): an append-only log under a
  file lock, safe for several worker processes on one machine (Optuna advises against SQLite
  for that). With ``--storage URL``, any Optuna RDB URL (PostgreSQL, MySQL) with Optuna's
  heartbeat on, so workers on other machines can take over a dead worker's trial; the URL and
  its driver are checked with the sweep file (:func:`storage_problems`).
- **Study.** One per sweep, named by the sweep file; the same command on every worker
  creates it or loads it (Optuna settles two creators racing: one creates, the other loads).
- **Sampler.** Grids and trial lists sample nothing: every run is queued with its values
  (``claims.enqueue_missing``), so their sampler (:class:`QueueOnlySampler`) only refuses to
  invent values. ``[search]`` uses ``TPESampler``.
"""

from __future__ import annotations

import logging
import random
import time
import warnings
from pathlib import Path
from typing import Any

import optuna

from trainer.config.load import ConfigError
from trainer.sweep.optuna_adapter import heartbeat_options
from trainer.sweep.spec import Spec, pruner_class

JOURNAL_NAME = "optuna-journal.log"
# A trial whose worker has not sent a heartbeat for this many intervals is taken over.
GRACE_INTERVALS = 3


def quiet_optuna() -> None:
    """Keep the terminal for the sweep's own status lines: Optuna's per-trial INFO lines and
    the warnings about the experimental heartbeat API add nothing there."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def storage_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 (the driver the ``sweep`` extra installs) when the
    older psycopg2, SQLAlchemy's default for that scheme, is not installed."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            return f"postgresql+psycopg://{rest}"
    return url


# The pip package of each database driver module SQLAlchemy may import for an RDB URL.
DRIVER_PACKAGES = {
    "psycopg": "'psycopg[binary]'",
    "psycopg2": "psycopg2-binary",
    "pymysql": "pymysql",
    "MySQLdb": "mysqlclient",
    "mysql": "mysql-connector-python",
    "mariadb": "mariadb",
    "oracledb": "oracledb",
    "pyodbc": "pyodbc",
    "pymssql": "pymssql",
}
EXTRA_URLS = "postgresql:// (psycopg 3) and sqlite:/// (Python's own sqlite3)"


def storage_problems(url: str | None) -> list[str]:
    """What is wrong with a ``--storage`` URL, found without connecting: its form, and the
    database driver SQLAlchemy would import for it (Optuna's RDB storage goes through
    SQLAlchemy, and the sweep extra installs only the drivers of :data:`EXTRA_URLS`)."""
    if not url:
        return []
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(storage_url(url))
        shown = parsed.render_as_string(hide_password=True)
        dialect = parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as err:
        return [f"--storage {url}: not an Optuna RDB URL ({err}); e.g. postgresql://user@host/db"]
    try:
        dialect.import_dbapi()
    except ImportError as err:
        module = (err.name or str(err)).split(".")[0]
        install = f"pip install {DRIVER_PACKAGES.get(module, module)}"
        if parsed.get_backend_name() in ("mysql", "mariadb") and module != "pymysql":
            install += " (or write mysql+pymysql://... and pip install pymysql, pure Python)"
        return [
            f"--storage {shown}: SQLAlchemy opens {parsed.drivername}:// URLs with the "
            f"{parsed.get_driver_name()} driver, and its module {module!r} is not installed: "
            f"{install}; the sweep extra installs drivers only for {EXTRA_URLS}"
        ]
    return []


def open_storage(url: str | None, sweep_dir: Path, heartbeat_seconds: int):
    """The study's storage: the sweep folder's journal file, or the RDB at ``url``.

    Several workers starting at once against a new database all try to create Optuna's tables;
    the losers of that race get an integrity error from the server and simply try again.
    """
    if not url:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        sweep_dir.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(sweep_dir / JOURNAL_NAME)))
    from optuna.storages import RDBStorage
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    problems = storage_problems(url)  # checked before any trial; again for other callers
    if problems:
        raise ConfigError(problems, "--storage")
    url = storage_url(url)
    last: Exception | None = None
    for attempt in range(6):
        try:
            return RDBStorage(
                url, **heartbeat_options(heartbeat_seconds, GRACE_INTERVALS * heartbeat_seconds)
            )
        except (ArgumentError, NoSuchModuleError, ValueError) as err:  # a malformed URL: no retry
            raise ConfigError(
                [f"--storage {url}: not an Optuna RDB URL ({err}); e.g. postgresql://user@host/db"],
                "--storage",
            ) from err
        except ImportError as err:  # a driver whose own imports fail
            cause = err.__cause__ or err
            raise ConfigError(
                [f"--storage {url}: the database driver cannot be imported ({cause})"],
                "--storage",
            ) from err
        except Exception as err:  # SQLAlchemy's many errors: retried, then shown
            last = err
            time.sleep(0.5 + random.random() * (attempt + 1))
    raise ConfigError([f"--storage {url}: cannot open it: {last}"], "--storage")


def make_pruner(spec: Spec) -> optuna.pruners.BasePruner:
    """The sweep's pruner, or none (Optuna's NopPruner)."""
    if spec.pruner is None:
        return optuna.pruners.NopPruner()
    kwargs = {k: v for k, v in spec.pruner.items() if k != "name"}
    return pruner_class(spec.pruner["name"])(**kwargs)


class QueueOnlySampler(optuna.samplers.BaseSampler):
    """The sampler of a grid or trial list, which samples nothing.

    Every run is queued with its values, and a copy of a trial keeps them, so a trial that
    runs never asks the sampler. A trial created while the queue was empty (another worker
    popped the last queued one first) is skipped before it asks for anything
    (``claims.claim_problem``). Being asked anyway is a bug, said at once, rather than a run
    recorded with made-up values.
    """

    def infer_relative_search_space(self, study, trial) -> dict[str, Any]:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        raise RuntimeError(
            f"trial {trial.number} asked for {param_name!r}, but a grid or trial list samples "
            "nothing: its trials get their values from the queue"
        )


def make_sampler(spec: Spec) -> optuna.samplers.BaseSampler:
    """TPE for a [search]; for a grid or trial list, one that only serves queued values."""
    if spec.mode == "search":
        seed = None if spec.file.sampler_seed < 0 else spec.file.sampler_seed
        # constant_liar: trials still running on other workers count as bad guesses, so
        # parallel workers spread out instead of all sampling next to the current best.
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    return QueueOnlySampler()


def grid_space(spec: Spec) -> dict[str, list[Any]]:
    """A grid's or trial list's parameters and their values, ``seed`` included: the choices
    of each parameter's categorical distribution, as the study records it."""
    space: dict[str, list[Any]] = {}
    for point in spec.points:
        for key, value in point.params.items():
            space.setdefault(key, [])
            if value not in space[key]:
                space[key].append(value)
    space["seed"] = list(seeds(spec))
    return space


def grid_problems(spec: Spec) -> list[str]:
    """Whether Optuna takes a grid's or trial list's values as categorical parameters that
    its storages can hold (it warns about any value but None, bool, int, float and str):
    found with the other checks, before the study gets this sweep's fingerprint, so a grid
    it cannot take never leaves a study that a corrected sweep file cannot reuse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for values in grid_space(spec).values():
                optuna.distributions.distribution_to_json(
                    optuna.distributions.CategoricalDistribution(values)
                )
    except (TypeError, ValueError, UserWarning) as err:
        return [f"[{spec.mode}]: Optuna's categorical parameters cannot take these values ({err})"]
    return []


def seeds(spec: Spec) -> tuple[int, ...]:
    """The seeds every configuration runs with: the file's, or the base config's seed."""
    if spec.file.seeds:
        return spec.file.seeds
    from trainer.config.load import read_toml

    return (int(read_toml(spec.base).get("train", {}).get("seed", 0)),)


def open_study(spec: Spec, storage) -> optuna.Study:
    """Create the sweep's study, or load it when another worker (or an earlier run) made it.

    Its directions are the objectives' (two make a multi-objective study). Optuna loads an
    existing study without comparing them, so a study made for other objectives is refused
    here (:func:`check_objectives`).
    """
    logging.getLogger("optuna").setLevel(logging.WARNING)
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
        directions=[o.direction for o in spec.objectives],
        load_if_exists=True,
    )
    check_objectives(study, spec)
    return study


OBJECTIVE_ATTR = "sdlora_objective"  # study user attr: the objectives it was made for


def check_objectives(study: optuna.Study, spec: Spec) -> None:
    """Record the objectives in a new study; refuse to train into a study made for others
    (its values and directions would mean something else). A study from before objectives
    were recorded was made for the final validation loss."""
    names = [o.name for o in spec.objectives]
    recorded = study.user_attrs.get(OBJECTIVE_ATTR)
    if recorded is None and study.directions == [optuna.study.StudyDirection.MINIMIZE]:
        recorded = ["final"] if study.get_trials(deepcopy=False) else None
    directions = [optuna.study.StudyDirection[o.direction.upper()] for o in spec.objectives]
    if recorded is None and list(study.directions) != directions:
        recorded = ["final"]  # made before objectives were recorded: the loss's direction
    if recorded is None:
        study.set_user_attr(OBJECTIVE_ATTR, names)
        recorded = study.user_attrs.get(OBJECTIVE_ATTR, names)
    if list(recorded) != names:
        raise ConfigError(
            [
                f"objective: the study {spec.name!r} was made for objective = {recorded}, "
                f"and this sweep file says {names}; --report-only shows the same runs on "
                f"{names} without training, and another name (name = ...) or --out starts "
                "a new study"
            ],
            str(spec.path),
        )


def load_study(spec: Spec, storage) -> optuna.Study:
    """The sweep's existing study (for ``--report-only``); a missing one is a user error."""
    try:
        return optuna.load_study(
            study_name=spec.name, storage=storage, sampler=make_sampler(spec),
            pruner=make_pruner(spec),
        )  # fmt: skip
    except KeyError as err:
        raise ConfigError(
            [f"no study named {spec.name!r} in this storage yet; run the sweep first"],
            str(spec.path),
        ) from err
