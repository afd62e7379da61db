"""Progress and metrics: the progress line, the tracker (tensorboard/wandb), and metrics.jsonl.

``metrics.jsonl`` holds one JSON object per optimizer update, written by the main process:
``{"step": N, "loss": ..., "lr": [lr of each param group], "epoch": ..., "samples": ...,
"time": "2025-05-01T12:00:00.123+02:00", "elapsed": 81.234}``, plus ``"val_loss"`` and
``"val_loss_by_timestep"`` (``{"125": ..., "375": ...}``: the loss at each fixed timestep) on
the updates where the validation set was scored, and the image scores of ``validation.scores``
(``"clip_t"``, ``"clip_i"``, ``"dino"``) where the samples were scored.
``step`` N is the N-th optimizer update (1-based), and ``lr`` is the LR that update applied,
the same numbering as ``checkpoints/step-NNNNNN`` and ``sdlora lr-plot --csv``.
``time`` is the local wall-clock time the record was written. ``elapsed`` is the seconds the
run has trained to reach it, summed over sessions: a resumed run starts from the ``elapsed``
of the record of the update it resumed at, so the time between a kill and the restart, and
updates trained twice, do not count.

TensorBoard: one run per ``output_dir``, ``logs/<logging.project>/``, whose hyperparameters
are in that run too. A resumed run appends to it: its writer starts with a session-start
event at the first update it trains, and TensorBoard discards what an earlier session wrote
at that update and after, so every step has one value, as in ``metrics.jsonl``.

wandb: one run per ``output_dir`` too, in project ``logging.project``, named like the LoRA.
Its id is kept in ``logs/wandb_run.json`` and every resume continues that run
(``resume="allow"``); wandb's local files go to ``logs/wandb/``, not the working directory.
wandb keeps the first value logged at a step, so updates a resume trains again (after a kill
past the checkpoint) keep their first values: the same ones, since resume is exact.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from trainer.config.load import RunConfig, flatten
from trainer.files import write_text
from trainer.report import image_scores, progress
from trainer.step_folders import CHECKPOINTS

if TYPE_CHECKING:
    from trainer.report.prometheus import TrainingMetrics
    from trainer.run.plan import Plan

METRICS_NAME = "metrics.jsonl"
# Keys of a metrics record that depend on the wall clock, not on the training.
CLOCK_KEYS = ("time", "elapsed")
# Seconds between tensorboard flushes (its default, 120 s, hides recent steps for long).
TB_FLUSH_SECS = 30
LOGS_DIR = "logs"
WANDB_RUN_NAME = "wandb_run.json"  # in logs/: the id of this output_dir's wandb run


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``output_dir/metrics.jsonl`` (an empty list when there is none).

    A line cut short by a kill mid-write is skipped, not fatal: the resume that follows
    rewrites that update's record anyway.
    """
    path = Path(output_dir) / METRICS_NAME
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(output_dir: str | Path, last_step: int) -> None:
    """Drop records after ``last_step``: a resumed run rewrites the steps after its checkpoint,
    so the file ends up as the uninterrupted run's would."""
    path = Path(output_dir) / METRICS_NAME
    if path.is_file():
        kept = [r for r in read_metrics(output_dir) if r["step"] <= last_step]
        # Atomic: a kill here must not leave the history half-written.
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def history(output_dir: Path, update: int, resumed_from: Path | None) -> list[dict[str, Any]]:
    """The records of updates 1..``update`` a resumed run continues from.

    They are this run's own, or, when it resumed from another run's checkpoint
    (``OTHER/checkpoints/step-NNNNNN``), that run's, so the smoothed loss and ``elapsed``
    continue where the checkpoint was written.
    """
    if update == 0:
        return []
    own = [r for r in read_metrics(output_dir) if r["step"] <= update]
    if (own and own[-1]["step"] == update) or resumed_from is None:
        return own
    if Path(resumed_from).parent.name != CHECKPOINTS:
        return own
    theirs = [r for r in read_metrics(Path(resumed_from).parent.parent) if r["step"] <= update]
    return theirs if theirs and theirs[-1]["step"] == update else own


def flat_hparams(data: Mapping[str, Any]) -> dict[str, Any]:
    """Nested config data as the scalars trackers take (tensorboard hparams): ``train/seed``."""
    return {
        k: v if isinstance(v, (bool, int, float, str)) else str(v)
        for k, v in flatten(data, sep="/").items()
    }


def start_trackers(accelerator, config: RunConfig, first_step: int) -> None:
    """Start the configured tracker on the main process; ``first_step`` is the first update
    this session trains.

    accelerate's tensorboard tracker, given the config, calls ``SummaryWriter.add_hparams``,
    which writes into a new folder named by the current time (a separate run in TensorBoard),
    and then writes ``hparams.yml`` into a second timestamped folder: two extra runs per start
    and per resume. So it gets no config here; the hparams go into the run's own writer.
    """
    name = config.logging.tracker
    if name == "none":
        return
    hparams = flat_hparams(config.to_dict())
    if name == "wandb":
        options = wandb_options(config, first_step)
        accelerator.init_trackers(config.logging.project, hparams, {"wandb": options})
        return
    options = {"purge_step": first_step, "flush_secs": TB_FLUSH_SECS}
    accelerator.init_trackers(config.logging.project, init_kwargs={"tensorboard": options})
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    # Listing the metrics makes TensorBoard's HPARAMS tab show each run's latest values.
    val = config.validation
    metrics = {"train/loss": 0.0, **({"val/loss": 0.0} if val.fraction or val.path else {})}
    metrics.update({f"val/{k}": 0.0 for k in val.scores})
    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    for summary in hparams_summaries(hparams, metrics):
        writer.file_writer.add_summary(summary)


def wandb_options(config: RunConfig, first_step: int) -> dict[str, Any]:
    """``wandb.init`` options: this output_dir's own run, continued by every resume.

    A fresh start (``first_step`` 1) gets a new id; a resume reuses the recorded one, so its
    curves continue the same wandb run rather than starting a second one per session.
    """
    from trainer.lora.outputs import output_name

    logs = Path(config.output_dir) / LOGS_DIR
    record = logs / WANDB_RUN_NAME
    run_id = None
    if first_step > 1 and record.is_file():
        try:
            run_id = str(json.loads(record.read_text())["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            run_id = None  # a damaged record: a new run beats a crash at the start
    if run_id is None:
        run_id = secrets.token_hex(8)  # wandb ids: letters and digits, at most 64
        logs.mkdir(parents=True, exist_ok=True)
        write_text(record, json.dumps({"id": run_id}) + "\n")
    return {"id": run_id, "resume": "allow", "name": output_name(config), "dir": str(logs)}


# The progress line: tqdm draws the label, the bar and the update counter, our postfix the rest.
BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"
# In a terminal too narrow for all of it, the numbers matter more than the label and the bar.
NARROW_BAR_FORMAT = "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"
BAR_MIN, NARROW_BAR_MIN = 10, 3


class Tracker:
    """Everything the loop reports: ``update``, ``message``, ``paused``, ``checkpointed``,
    ``log_image``, ``sub_progress``, ``close``."""

    def __init__(
        self,
        accelerator,
        config: RunConfig,
        plan: Plan,
        initial: int,
        resumed_from: Path | None = None,
        metrics: TrainingMetrics | None = None,
    ) -> None:
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.enabled_tracker = config.logging.tracker != "none"
        self.total = plan.total_updates
        self.initial = initial
        self.images_per_update = (
            config.train.batch_size * plan.accumulation * accelerator.num_processes
        )
        micro_batches = plan.total_updates * plan.accumulation
        self.epochs = math.ceil(micro_batches / plan.micro_batches_per_epoch)
        val = config.validation
        self.val_every = val.every_n_steps if (val.fraction or val.path or val.prompts) else -1
        output_dir = Path(config.output_dir)
        self.metrics = (output_dir / METRICS_NAME).open("a") if self.main else None
        self.clock = progress.Clock()
        self.done = 0  # updates this session
        self.training_s = 0.0  # training time up to the last update (not the final save)
        self.ema = progress.LossEMA()
        self.val: tuple[float, int] | None = None
        self.base_elapsed = 0.0
        for record in history(output_dir, initial, resumed_from) if self.main else []:
            self._remember(record)
        # The Prometheus gauges (logging.prometheus_port): what the line shows, as numbers.
        self.prometheus = metrics if self.main else None
        if self.prometheus is not None:
            self.prometheus.started(initial, self.total)
        self.bar = tqdm(
            total=self.total,
            initial=initial,
            desc="updates",
            unit="upd",
            disable=not self.main,
            dynamic_ncols=True,
            # Our own rate, elapsed time and ETA are in the postfix (training time only).
            bar_format=BAR_FORMAT,
        )

    def _remember(self, record: Mapping[str, Any]) -> None:
        """Fold a record of an earlier session into the smoothed loss, val loss and clock."""
        self.ema.add(record["loss"])
        if "val_loss" in record:
            self.val = (record["val_loss"], record["step"])
        self.base_elapsed = float(record.get("elapsed", self.base_elapsed))

    def update(self, record: dict[str, Any]) -> None:
        """Report the optimizer update just done: its record gains ``time`` and ``elapsed``,
        becomes one metrics.jsonl line, goes to the tracker, and is what the line shows."""
        self.done += 1
        self.training_s = self.clock.training_s
        if self.metrics is not None:  # the main process (it alone writes metrics and the line)
            record["time"] = datetime.now().astimezone().isoformat(timespec="milliseconds")
            record["elapsed"] = round(self.base_elapsed + self.clock.wall_s, 3)
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
            ema = self.ema.add(record["loss"])
            if "val_loss" in record:
                self.val = (record["val_loss"], record["step"])
            # Set before bar.update, which draws: the line shows this update, never the last.
            shown = self._values(record, ema)
            self.bar.bar_format, line = self._fit(shown)
            self.bar.set_postfix_str(line, refresh=False)
            if self.prometheus is not None:
                self.prometheus.publish(record["step"], shown)
            if self.enabled_tracker:
                values = {"train/loss": record["loss"]}
                if "val_loss" in record:
                    values["val/loss"] = record["val_loss"]
                for t, loss in record.get("val_loss_by_timestep", {}).items():
                    values[f"val/loss_t{int(t):04d}"] = loss
                values.update({f"val/{k}": record[k] for k in image_scores.SCORES if k in record})
                values.update({f"train/lr_group{i}": lr for i, lr in enumerate(record["lr"])})
                # The optimizer's own step size where it has one (Prodigy's d·lr).
                values.update(
                    {
                        f"train/effective_lr_group{i}": v
                        for i, v in enumerate(record.get("effective_lr", []))
                    }
                )
                self.accelerator.log(values, step=record["step"])
        self.bar.update(1)

    def _values(self, record: Mapping[str, Any], ema: float) -> progress.LineValues:
        step = record["step"]
        rate = self.done / self.training_s if self.training_s > 0 else 0.0
        eta = (self.total - step) / rate if rate else 0.0
        if self.val_every >= 0:
            left = progress.validation_points_left(step, self.total, self.val_every)
            eta += left * self.clock.mean_pause_s("validation")
        peak, kind = progress.peak_memory(self.accelerator.device)
        return progress.LineValues(
            loss=record["loss"],
            loss_ema=ema,
            lrs=record["lr"],
            epoch=record["epoch"],
            epochs=self.epochs,
            updates_per_s=rate,
            images_per_s=rate * self.images_per_update,
            elapsed_s=record["elapsed"],
            eta_s=eta,
            peak_bytes=peak,
            peak_kind=kind,
            val_loss=self.val[0] if self.val else None,
            val_step=self.val[1] if self.val else None,
        )

    def _fit(self, values: progress.LineValues) -> tuple[str, str]:
        """The bar format and the postfix that fit the terminal's width, read at each update
        as tqdm reads it (the window may be resized). Everything when it fits beside a bar of
        BAR_MIN; else the label goes, the bar shrinks to NARROW_BAR_MIN and the postfix gives
        up what matters least (progress.SHRINK_ORDER), rather than tqdm cutting its end off."""
        full = progress.format_line(values)
        width = self.bar.dynamic_ncols(self.bar.fp)[0] if self.bar.dynamic_ncols else None
        # tqdm writes ", " before the postfix; the counter is never longer than total/total.
        counter = len(f"| {self.total}/{self.total}, ")
        if width is None or len(f"{self.bar.desc} 100%|") + BAR_MIN + counter + len(full) <= width:
            return BAR_FORMAT, full
        room = width - len("100%|") - NARROW_BAR_MIN - counter
        return NARROW_BAR_FORMAT, progress.format_line(values, room)

    @contextmanager
    def paused(self, kind: str) -> Iterator[None]:
        """Time inside (``"validation"``, ``"checkpoint"``) is not training time: it is left
        out of the updates/s and images/s shown and summed, and the ETA adds it back per
        validation point left."""
        with self.clock.pause(kind):
            yield

    def checkpointed(self, folder: Path) -> None:
        """Say where the checkpoint went, and flush the logs up to it, so a kill after it
        loses none of the steps a resume will not train again."""
        self.message(f"checkpoint: {folder}")
        if self.main and self.enabled_tracker:
            for tracker in self.accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.flush()

    def message(self, text: str) -> None:
        """A log line that does not break the progress bar."""
        if self.main:
            self.bar.write(text)
            logging.getLogger("sdlora").debug(text)

    def sub_progress(self, items: Iterable, desc: str, unit: str) -> Iterable:
        """A short-lived second bar over ``items`` (sampling's prompts), removed when done."""
        items = list(items)
        return tqdm(
            items, desc=desc, unit=unit, leave=False, disable=not self.main, dynamic_ncols=True
        )

    def log_image(self, tag: str, image: Image.Image, step: int) -> None:
        """Log an image at update ``step`` to the tracker (main process)."""
        if not (self.main and self.enabled_tracker):
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                pixels = np.asarray(image.convert("RGB"))
                tracker.writer.add_image(tag, pixels, step, dataformats="HWC")
            elif tracker.name == "wandb":
                tracker.log_images({tag: [image]}, step=step)

    def close(self) -> progress.SessionStats:
        """Close the bar and the metrics file; return this session's numbers.

        The trackers are finished by ``accelerator.end_training()``, which the loop calls
        last: it also destroys the process group, so no collective may follow it.
        """
        self.bar.close()
        if self.metrics:
            self.metrics.close()
        return progress.SessionStats(
            updates=self.done,
            training_s=self.training_s,
            paused_s=dict(self.clock.paused_s),
            images_per_update=self.images_per_update,
        )
