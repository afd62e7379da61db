"""What the progress line shows, worked out from the update just done.

The numbers are plain values kept here, away from tqdm, so the line, ``metrics.jsonl`` and the
end summary all come from the same arithmetic:

- **smoothed loss**: an exponential moving average with factor :data:`LOSS_EMA_BETA`,
  bias-corrected as Adam does (``ema_t = m_t / (1 - beta^t)``), so the first updates are not
  pulled towards 0. It is a pure function of the ``loss`` column of ``metrics.jsonl``
  (:func:`smoothed`); a resumed run replays the kept records, so it continues the same curve.
- **throughput**: updates and images per second of *training* time, the wall time of this
  session minus the pauses for validation, sampling and checkpoints (:class:`Clock`), so a
  slow sampler does not make training look slow.
- **ETA**: the updates left at that rate, plus the validation points left at the mean time of
  the ones already done.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

# Weight of the past in the smoothed loss: about the last 1 / (1 - 0.9) = 10 updates count.
# (A `logging.loss_smoothing` config key would replace this constant.)
LOSS_EMA_BETA = 0.9


class LossEMA:
    """Bias-corrected exponential moving average of the per-update loss."""

    def __init__(self, beta: float = LOSS_EMA_BETA) -> None:
        self.beta = beta
        self.raw = 0.0
        self.count = 0

    def add(self, loss: float) -> float:
        """Fold in one update's loss; return the smoothed value after it."""
        self.raw = self.beta * self.raw + (1 - self.beta) * loss
        self.count += 1
        return self.value

    @property
    def value(self) -> float:
        """The smoothed loss (NaN before the first update)."""
        if not self.count:
            return float("nan")
        return self.raw / (1 - self.beta**self.count)


def smoothed(losses: Iterable[float], beta: float = LOSS_EMA_BETA) -> list[float]:
    """The smoothed loss after each of ``losses`` (the progress line's ``ema``)."""
    ema = LossEMA(beta)
    return [ema.add(loss) for loss in losses]


@dataclass
class Clock:
    """Wall time of this session, split into training and named pauses (validation...)."""

    start: float = field(default_factory=time.monotonic)
    paused_s: dict[str, float] = field(default_factory=dict)
    pauses: dict[str, int] = field(default_factory=dict)

    @contextmanager
    def pause(self, kind: str) -> Iterator[None]:
        """Time spent inside is counted under ``kind``, not as training."""
        begin = time.monotonic()
        try:
            yield
        finally:
            self.paused_s[kind] = self.paused_s.get(kind, 0.0) + time.monotonic() - begin
            self.pauses[kind] = self.pauses.get(kind, 0) + 1

    @property
    def wall_s(self) -> float:
        """Seconds since this session's training started."""
        return time.monotonic() - self.start

    @property
    def training_s(self) -> float:
        """Seconds of training: the wall time without any pause."""
        return self.wall_s - sum(self.paused_s.values())

    def mean_pause_s(self, kind: str) -> float:
        """Mean length of one pause of ``kind`` (0 before the first)."""
        count = self.pauses.get(kind, 0)
        return self.paused_s.get(kind, 0.0) / count if count else 0.0


def peak_memory(device: torch.device) -> tuple[int, str]:
    """The peak memory of this process so far, in bytes, and what it measures.

    On CUDA: the most the caching allocator has handed out (``max_memory_allocated``, what a
    larger batch would compete for); it reads a counter, with no device sync. Elsewhere: the
    peak resident set size of the process (``getrusage``).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "VRAM"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return (peak if sys.platform == "darwin" else peak * 1024), "RSS"


def validation_points_left(update: int, total: int, every: int) -> int:
    """Validation points after ``update``: every ``every`` updates, and always the last one."""
    if update >= total:
        return 0
    points = (total - 1) // every - update // every if every else 0
    return points + 1


# ---------------------------------------------------------------- formatting


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``D days, H:MM:SS`` past a day), as tqdm and kohya print it."""
    seconds = max(0, round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def format_bytes(count: int) -> str:
    """Bytes in GiB (MiB below one GiB), two decimals."""
    if count >= 1024**3:
        return f"{count / 1024**3:.2f} GiB"
    return f"{count / 1024**2:.0f} MiB"


def format_loss(value: float) -> str:
    """A loss as the progress line and the summary print it."""
    return f"{value:.4f}"


def format_lrs(lrs: Sequence[float]) -> str:
    """Every param group's LR, UNet first, joined by ``/``: ``1.00e-04/5.00e-05``."""
    return "/".join(f"{lr:.2e}" for lr in lrs)


@dataclass(frozen=True)
class LineValues:
    """Everything the progress line shows for one update."""

    loss: float
    loss_ema: float
    lrs: Sequence[float]
    epoch: int  # 0-based, as in metrics.jsonl; shown 1-based
    epochs: int
    updates_per_s: float
    images_per_s: float
    elapsed_s: float
    eta_s: float
    peak_bytes: int
    peak_kind: str
    val_loss: float | None
    val_step: int | None


def line_fields(v: LineValues) -> dict[str, tuple[str, ...]]:
    """Each field of the progress line, in the order shown, as its forms from the longest to
    the shortest; an empty form leaves the field out."""
    loss, ema, eta = format_loss(v.loss), format_loss(v.loss_ema), format_duration(v.eta_s)
    rate = f"{v.updates_per_s:.2f} upd/s"
    val: tuple[str, ...] = ("",)
    if v.val_loss is not None:
        val = (f"val {format_loss(v.val_loss)}@{v.val_step}", f"val {format_loss(v.val_loss)}", "")
    return {
        "loss": (f"loss {loss} ema {ema}", f"ema {ema}"),
        "lr": (f"lr {format_lrs(v.lrs)}", f"lr {format_lrs(v.lrs[:1])}", ""),
        "epoch": (f"epoch {v.epoch + 1}/{v.epochs}", ""),
        "rate": (f"{rate} {v.images_per_s:.1f} img/s", rate, ""),
        "time": (f"{format_duration(v.elapsed_s)}<{eta}", f"eta {eta}", ""),
        "peak": (f"peak {format_bytes(v.peak_bytes)} {v.peak_kind}", ""),
        "val": val,
    }


# What a narrow terminal gives up first, one step at a time, each naming the field that takes
# its next shorter form. What stays longest, in order: the smoothed loss (after the update
# counter, which tqdm draws), the UNet's LR, the ETA, the rate, the validation loss. The epoch
# and the peak memory go first: the ETA says more than the epoch, and memory is settled in the
# first updates. Details go before whole fields: images/s, the elapsed time, the validation
# loss's update, the raw loss beside the smoothed one, the text encoders' LRs.
SHRINK_ORDER = (
    "epoch", "peak", "rate", "time", "val", "loss", "lr", "val", "rate", "time", "lr",
)  # fmt: skip


def format_line(v: LineValues, width: int | None = None) -> str:
    """The text after ``N/TOTAL`` on the progress line, in at most ``width`` characters where
    the fields allow (:data:`SHRINK_ORDER`); every field in full without a width.

    Example: ``loss 0.1234 ema 0.1301 | lr 1.00e-04 | epoch 3/10 | 1.52 upd/s 12.2 img/s |
    0:01:10<0:04:02 | peak 1.10 GiB RSS | val 0.1180@200``; in 40 characters,
    ``ema 0.1301 | lr 1.00e-04 | eta 0:04:02``.
    """
    fields = line_fields(v)
    level = dict.fromkeys(fields, 0)

    def text() -> str:
        return " | ".join(form for name, forms in fields.items() if (form := forms[level[name]]))

    for name in SHRINK_ORDER:
        if width is None or len(text()) <= width:
            break
        level[name] = min(level[name] + 1, len(fields[name]) - 1)
    return text()


@dataclass(frozen=True)
class SessionStats:
    """What one ``sdlora train`` session did, for the end summary."""

    updates: int
    training_s: float  # wall time of the loop without the pauses below
    paused_s: dict[str, float]  # "validation" (loss and samples), "checkpoint"
    images_per_update: int

    @property
    def updates_per_s(self) -> float:
        """Mean optimizer updates per second of training time."""
        return self.updates / self.training_s if self.training_s > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        """Mean images per second of training time (all processes)."""
        return self.updates_per_s * self.images_per_update
