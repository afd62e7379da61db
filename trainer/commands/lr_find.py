"""``sdlora lr-find``: the LR range test. Which base LR should a sweep try?

One short run (``--steps``, default 100 updates) of the config's own LoRA, data and optimizer,
through the trainer's own loop, while the LR rises geometrically from ``--min`` to ``--max``
(the registered ``exponential_ramp`` schedule, applied by ``apply_lr_schedule`` like any
other, so ``sdlora lr-plot`` shows the same curve). The loop records each update's loss and
applied LRs in ``metrics.jsonl``, and, with held-out images, the fixed-seed validation loss
at ``--val-points`` points. The run stops as soon as the smoothed loss diverges (``--diverge``
times its lowest value). ``trainer/report/lr_range.py`` turns the records into the CSV, the
plot, the suggested base LR and a sweep snippet around it.

It leaves no LoRA behind: the run trains in a scratch folder inside ``--out`` (default
``<output_dir>/lr_find``), which is removed when it ends (and cleared at the next start if a
kill left it), and it never writes into ``output_dir`` itself. The text encoders' LRs, when
they are trained, keep their ratio to ``train.learning_rate``.

Several processes: ``sdlora launch --num_processes 2 train.py lr-find --config FILE``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer.config import load as config_load
from trainer.config.load import ConfigError, RunConfig
from trainer.files import write_atomic, write_text
from trainer.report import lr_range

log = logging.getLogger("sdlora")
CSV_NAME, PNG_NAME = "lr_find.csv", "lr_find.png"
SCRATCH = ".scratch"  # the run's own folder inside --out, removed when it ends


@dataclass(frozen=True)
class Options:
    """The range test's settings (the command's flags)."""

    min_lr: float = 1e-7
    max_lr: float = 1e-1
    steps: int = 100
    diverge: float = 4.0
    smooth: float = 0.98
    val_points: int = 5
    out: str = ""  # empty: <output_dir>/lr_find

    def problems(self) -> list[str]:
        """Every bad flag at once, before any config or model is read."""
        p = []
        if not self.min_lr > 0:
            p.append(f"--min {self.min_lr:g}: must be > 0 (the ramp is geometric)")
        if not self.max_lr > self.min_lr:
            p.append(f"--max {self.max_lr:g}: must be above --min {self.min_lr:g}")
        if self.steps < 10:
            p.append(f"--steps {self.steps}: at least 10 updates, or nothing can be suggested")
        if not self.diverge > 1:
            p.append(f"--diverge {self.diverge:g}: a factor above the lowest loss, > 1 (e.g. 4)")
        if not 0 <= self.smooth < 1:
            p.append(f"--smooth {self.smooth:g}: the moving average's weight, in [0, 1)")
        if self.val_points < 0:
            p.append(f"--val-points {self.val_points}: must be >= 0")
        return p


def out_dir(config: RunConfig, options: Options) -> Path:
    """Where the CSV and plot go: ``--out``, else ``<output_dir>/lr_find``."""
    return Path(options.out) if options.out else Path(config.output_dir) / "lr_find"


def ramp_overrides(config: RunConfig, options: Options, scratch: Path) -> list[str]:
    """The ``--set`` flags that turn the config into the range test's run."""
    train = config.train
    scale = options.max_lr / train.learning_rate
    sets = [
        f"output_dir={json.dumps(str(scratch))}",
        f"train.max_steps={options.steps}",
        f"train.learning_rate={options.max_lr!r}",
        "lr_scheduler={ name = "
        f'"exponential_ramp", start_factor = {options.min_lr / options.max_lr!r} }}',
        "checkpoint.every_n_steps=0",
        'checkpoint.resume=""',
        'logging.tracker="none"',
        "logging.prometheus_port=0",
        "validation.prompts=[]",  # sample images tell nothing about the LR here
    ]
    # The text encoders keep their LR's ratio to the UNet's (0 means "the UNet's LR").
    for key in ("text_encoder_lr", "text_encoder_2_lr"):
        if getattr(train, key):
            sets.append(f"train.{key}={getattr(train, key) * scale!r}")
    val = config.validation
    held_out = bool(val.fraction or val.path)
    every = max(1, options.steps // options.val_points) if held_out and options.val_points else 0
    sets.append(f"validation.every_n_steps={every}")
    return sets


def load_config(path: str, overrides: Sequence[str], options: Options) -> tuple[RunConfig, Path]:
    """The range test's run config and its ``--out`` folder; every problem at once."""
    found = options.problems()
    try:
        config = config_load.load(path, overrides)
    except ConfigError as err:
        raise ConfigError(found + err.problems, err.source) from err
    if found:
        raise ConfigError(found, "sdlora lr-find")
    out = out_dir(config, options)
    scratch = out / SCRATCH
    return config_load.load(path, [*overrides, *ramp_overrides(config, options, scratch)]), out


def train_ramp(config: RunConfig, divergence: lr_range.Divergence) -> bool:
    """Train the ramp through the trainer's own loop until its end or the divergence; True
    when a signal stopped it. The models are dropped when it returns; nothing is saved but
    the scratch folder's records."""
    from trainer.run import loop, preflight

    processes, is_main = preflight.launch()
    # --overwrite: a scratch folder a killed range test left is cleared, never resumed.
    checked = preflight.check(config, processes, overwrite=True, show_progress=is_main)
    accelerator = loop.make_accelerator(config)
    if accelerator.is_main_process:
        preflight.apply(checked, config, accelerator.num_processes)
    accelerator.wait_for_everyone()
    state = loop.setup(config, accelerator, checked)
    state.watch = lambda record: divergence.add(float(record["loss"]))
    loop.train(state)
    if state.tracker is not None:
        state.tracker.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return state.update < state.plan.total_updates and not divergence.diverged


def run(
    path: str, overrides: Sequence[str], options: Options
) -> tuple[str, lr_range.Finding] | None:
    """Run the range test; on the main process, write its files and return the text to print
    with the finding (None on the other processes).

    Raises:
        ConfigError: a bad flag or config, found before any model loads.
        KeyboardInterrupt: a signal stopped it (the scratch folder is removed first).
    """
    config, out = load_config(path, overrides, options)
    scratch = Path(config.output_dir)
    divergence = lr_range.Divergence(options.smooth, options.diverge)
    from trainer.run.preflight import launch

    is_main = launch()[1]
    try:
        signalled = train_ramp(config, divergence)
        if not is_main:
            return None
        if signalled:
            raise KeyboardInterrupt
        from trainer.report.tracking import read_metrics

        points = lr_range.points_from_metrics(read_metrics(scratch), options.smooth)
    finally:
        if is_main:
            shutil.rmtree(scratch, ignore_errors=True)
    finding = lr_range.find(points, options.steps, divergence.diverged)
    return report(finding, out, path, overrides, config, options), finding


def report(
    finding: lr_range.Finding,
    out: Path,
    config_path: str,
    overrides: Sequence[str],
    config: RunConfig,
    options: Options,
) -> str:
    """Write the CSV and the plot; the text that says what was found and what to sweep."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / CSV_NAME, out / PNG_NAME
    write_text(csv_path, lr_range.csv_text(finding.points))
    points = finding.points
    title = f"LR range test: {len(points)} of {finding.planned} updates, {config.optimizer.name}"
    png = lr_range.figure_png(finding, title)

    def write_png(tmp: Path) -> None:
        tmp.write_bytes(png)

    write_atomic(png_path, write_png)
    first, last = points[0].lr, points[-1].lr
    lines = [f"lr-find: {len(points)} of {finding.planned} updates, LR {first:.3g} → {last:.3g}"]
    if finding.diverged_at is not None:
        lines.append(
            f"the smoothed loss diverged at LR {finding.diverged_at:.3g} (above "
            f"{options.diverge:g} × its lowest value); the run stopped there"
        )
    lines += list(finding.notes)
    if finding.suggested is not None:
        rule = "steepest descent of the smoothed loss"
        if finding.steepest is None:
            rule = "minimum ÷ 10 (no steepest descent was found)"
        lines.append(f"suggested base LR (train.learning_rate): {finding.suggested:.3g} ({rule})")
        if finding.steepest is not None and finding.minimum_10 is not None:
            lines.append(f"  the other rule, minimum ÷ 10: {finding.minimum_10:.3g}")
    lines.append(f"wrote {csv_path} and {png_path}")
    if finding.suggested is not None:
        base = str(Path(config_path).resolve())
        snippet = lr_range.sweep_snippet(base, finding.suggested, overrides)
        if not (config.validation.fraction or config.validation.path):
            snippet = snippet.replace(
                "[set]\n", '[set]\n"validation.fraction" = 0.1  # the sweep\'s objective\n', 1
            )
        lines += ["a sweep around it (sdlora sweep FILE; docs/sweeps.md):", "", snippet]
    return "\n".join(lines)
