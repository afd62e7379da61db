"""Progress and metrics: the tqdm bar, the tracker (tensorboard/wandb), and metrics.jsonl.

``metrics.jsonl`` holds one JSON object per optimizer update, written by the main process:
``{"step": N, "loss": ..., "lr": [lr of each param group], "epoch": ..., "samples": ...}``,
plus ``"val_loss"`` on the updates where the validation set was scored.
``step`` N is the N-th optimizer update (1-based), and ``lr`` is the LR that update applied,
the same numbering as ``checkpoints/step-NNNNNN`` and ``sdlora lr-plot --csv``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from trainer.config import flatten

METRICS_NAME = "metrics.jsonl"


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``output_dir/metrics.jsonl`` (an empty list when there is none)."""
    path = Path(output_dir) / METRICS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(output_dir: str | Path, last_step: int) -> None:
    """Drop records after ``last_step``: a resumed run rewrites the steps after its checkpoint,
    so the file ends up as the uninterrupted run's would."""
    path = Path(output_dir) / METRICS_NAME
    if path.is_file():
        kept = [r for r in read_metrics(output_dir) if r["step"] <= last_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def flat_hparams(data: Mapping[str, Any]) -> dict[str, Any]:
    """Nested config data as the scalars trackers take (tensorboard hparams): ``train/seed``."""
    return {
        k: v if isinstance(v, (bool, int, float, str)) else str(v)
        for k, v in flatten(data, sep="/").items()
    }


class Tracker:
    """Everything the loop reports, behind three calls: ``update``, ``message``, ``close``."""

    def __init__(
        self, accelerator, output_dir: Path, total: int, initial: int, enabled_tracker: bool
    ) -> None:
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.enabled_tracker = enabled_tracker
        self.metrics = (output_dir / METRICS_NAME).open("a") if self.main else None
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc="updates",
            unit="upd",
            disable=not self.main,
            dynamic_ncols=True,
        )

    def update(self, record: dict[str, Any]) -> None:
        """Report one optimizer update (the record becomes one metrics.jsonl line)."""
        self.bar.update(1)
        if not self.main:
            return
        lrs = record["lr"]
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lrs[0]:.3g}", refresh=False)
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.enabled_tracker:
            values = {"train/loss": record["loss"]}
            if "val_loss" in record:
                values["val/loss"] = record["val_loss"]
            values.update({f"train/lr_group{i}": lr for i, lr in enumerate(lrs)})
            self.accelerator.log(values, step=record["step"])

    def message(self, text: str) -> None:
        """A log line that does not break the progress bar."""
        if self.main:
            self.bar.write(text)
            logging.getLogger("sdlora").debug(text)

    def close(self) -> None:
        """Flush and close the bar and the metrics file.

        The trackers are finished by ``accelerator.end_training()``, which the loop calls
        last: it also destroys the process group, so no collective may follow it.
        """
        self.bar.close()
        if self.metrics:
            self.metrics.close()
