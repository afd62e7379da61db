"""``sdlora lr-plot``: see the LR of every param group at every update before training.

The groups are the run's (``RunConfig.lr_groups``: the UNet's, the text encoders', their
block-multiplier and LoRA+ groups), named as ``metrics.jsonl`` names them.

The run length comes from the same ``plan_run`` that training uses (dataset size, batch,
accumulation, epochs or max_steps, processes), and the LRs from the same ``Schedule.lrs``
call the loop makes, so the CSV is exactly what training will apply. A run longer than
``preview.MAX_ROWS`` updates is shown at that many of them, which includes the first, the
last, the warmup's end and each jump, so the preview stays instant at any length. It needs no
model; it reads the dataset folder (image headers only) only when the run length is given in
epochs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import schedulers
from schedulers import preview
from trainer.config.load import ConfigError, RunConfig
from trainer.run.plan import plan_run


def total_updates(config: RunConfig, processes: int, examples: int | None = None) -> int:
    """Optimizer updates of the configured run, derived as training derives them.

    Args:
        config: The run config.
        processes: Processes the run will be launched with.
        examples: Dataset size to assume instead of reading data.path (one bucket).
    """
    if config.train.max_steps:
        return config.train.max_steps
    if examples is not None:
        groups = [list(range(examples))]
    else:
        from trainer.data.feed import checked_examples

        prepared, _ = checked_examples(config, show_progress=False, decode=False)
        groups = prepared.groups
    return plan_run(config, groups, processes).total_updates


def compare_schedule(spec: str, config: RunConfig) -> tuple[str, schedulers.Schedule]:
    """Build a ``--compare`` schedule: ``name`` or ``name:key=value,key=value``.

    Warmup and floor settings of the configured schedule carry over when the other schedule
    has those fields, so the curves differ only in their shape.
    """
    import tomllib

    name, _, extra = spec.partition(":")
    table = {"name": name}
    configured = config.lr_scheduler.params()
    try:
        fields = schedulers.get(name).__dataclass_fields__
    except (schedulers.UnknownScheduleError, schedulers.ScheduleRegistryError) as err:
        raise ConfigError([f"--compare {spec}: {err}"], "--compare") from err
    shared = ("warmup_steps", "warmup_shape", "warmup_start_factor", "min_lr_ratio", "min_lr")
    table.update({k: configured[k] for k in shared if k in configured and k in fields})
    for item in filter(None, extra.split(",")):
        key, _, raw = item.partition("=")
        try:
            table[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            table[key.strip()] = raw
    try:
        return spec, schedulers.from_table(table, where=f"--compare {name}")
    except ConfigError as err:  # the schedule's own problems, named for the flag
        raise ConfigError(err.problems, "--compare") from err


def run(
    config: RunConfig,
    csv_path: str | None,
    png_path: str | None,
    compare: Sequence[str] = (),
    processes: int | None = None,
    examples: int | None = None,
) -> str:
    """Write the requested files and return the text table to print.

    A run of more than ``preview.MAX_ROWS`` updates is written and drawn at that many of its
    updates (:func:`schedulers.preview.sample_curve`), and the text says which.
    """
    processes = processes or int(os.environ.get("WORLD_SIZE", "1"))
    total = total_updates(config, processes, examples)
    lrs = config.base_lrs()
    problems = config.lr_scheduler.check(total, base_lrs=lrs)
    if problems:
        raise ConfigError(problems, "config (with the derived run length)")
    curve = preview.sample_curve(config.lr_scheduler, total, lrs)
    names = config.lr_group_names()
    if csv_path:
        preview.write_csv(csv_path, curve.rows, curve.steps, names)
    if png_path:
        # Every param group of every curve, so the text encoder's LR is seen, not just the UNet's.
        curves = {config.lr_scheduler.name: curve}
        for spec in compare:
            label, other = compare_schedule(spec, config)
            problems = other.check(total, base_lrs=lrs)
            if problems:
                raise ConfigError(problems, f"--compare {spec}")
            curves[label] = preview.sample_curve(other, total, lrs)
        bases = ", ".join(f"{lr:g} ({name})" for lr, name in zip(lrs, names, strict=True))
        drawn = f" (1 in {curve.stride:,} drawn)" if curve.stride > 1 else ""
        title = f"{total} optimizer updates{drawn}, base LR {bases}"
        Path(png_path).parent.mkdir(parents=True, exist_ok=True)
        preview.write_png(png_path, curves, title, names)
    header = (
        f"{config.lr_scheduler.name}: {total} optimizer updates on {processes} process(es), "
        f"base LRs {dict(zip(names, lrs, strict=True))}"
    )
    if curve.note:
        header += f"\nshown, written and drawn: {curve.note}; training sets the LR at every update"
    return header + "\n" + preview.format_table(curve.rows, steps=curve.steps, names=names)
