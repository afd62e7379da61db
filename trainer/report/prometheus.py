"""A training run's ``/metrics`` for Prometheus (``logging.prometheus_port``).

The main process serves what its progress line shows, as gauges: the update, each param
group's LR, the loss (last and smoothed), the validation loss, updates/s, images/s and peak
memory, from a registry of the run's own (so two runs in one process never share a series),
through prometheus_client's HTTP server on a thread. No web framework is loaded: that is the
``serve`` extra's, for ``sdlora serve``.

The values are the :class:`~trainer.report.progress.LineValues` the tracker computes for the
line, kept as one immutable snapshot that a scrape reads: nothing is computed twice, and a
scrape never waits for the loop. The server is started after preflight (which found a port in
use before any model loaded) and shut down when the run returns, whatever ends it; a killed
process's port is freed by the kernel, and the server sets ``SO_REUSEADDR`` (as every
``http.server`` does), so the next run binds it at once.

Several runs on one machine need one port each. A sweep's trials may run side by side, so a
trial takes the first free port of ``prometheus_port`` … ``prometheus_port + SWEEP_PORTS - 1``
and logs which; its ``sdlora_train_info`` names the run.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config.load import ConfigError, RunConfig
from trainer.config.schema import MAX_PORT
from trainer.report.progress import LineValues

if TYPE_CHECKING:  # prometheus_client is the `prometheus` extra's: imported when serving
    from wsgiref.simple_server import WSGIServer

    from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("sdlora")

KEY = "logging.prometheus_port"
# Ports a sweep trial may take from logging.prometheus_port on: one per trial running at once
# on a machine (a worker per GPU), with room to spare.
SWEEP_PORTS = 16
# What the server binds: every interface, since Prometheus scrapes from another machine.
BIND_ADDRESS = "0.0.0.0"


def group_labels(config: RunConfig) -> list[tuple[str, str]]:
    """``(name, module)`` of each optimizer param group, in the order of
    ``RunConfig.base_lrs``: the name ``metrics.jsonl`` gives it and what it trains (LoRA+ and
    block multipliers split one module into several groups)."""
    return [(group.name, group.component) for group in config.lr_groups()]


def candidate_ports(port: int, spread: int) -> range:
    """The ports a run may serve on: ``port`` alone, or a sweep trial's range."""
    return range(port, min(port + max(1, spread), MAX_PORT + 1))


def _bind_probe(port: int) -> None:
    """Bind and release ``port`` as the metrics server would bind it (raises OSError)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((BIND_ADDRESS, port))


def _why(port: int, err: OSError) -> str:
    if err.errno == errno.EADDRINUSE:
        return (
            f"port {port} is in use on this machine (another run's metrics server or another "
            f"program; `ss -ltnp 'sport = :{port}'` shows which)"
        )
    if err.errno == errno.EACCES:
        return f"port {port} needs privileges this process lacks (ports below 1024 do)"
    return f"port {port} cannot be bound: {err.strerror or err}"


def port_problems(port: int, spread: int = 1) -> list[str]:
    """Whether the metrics server could bind now (preflight: before any model loads).

    Args:
        port: ``logging.prometheus_port`` (0: off, no problem).
        spread: How many ports from ``port`` on may be taken (:data:`SWEEP_PORTS` in a sweep).

    Returns:
        One message when none of them is free, naming the key and the fix.
    """
    if not port:
        return []
    reasons = []
    for candidate in candidate_ports(port, spread):
        try:
            _bind_probe(candidate)
            return []
        except OSError as err:
            reasons.append(_why(candidate, err))
    fix = "pick another port, or 0 for no metrics server"
    if len(reasons) == 1:
        return [f"{KEY}: {reasons[0]}; {fix}"]
    last = port + len(reasons) - 1
    return [f"{KEY}: none of ports {port}..{last} can be bound ({reasons[0]}, ...); {fix}"]


@dataclass(frozen=True)
class Snapshot:
    """What the last update showed: a scrape reads one of these whole."""

    update: int
    total: int
    values: LineValues | None = None


class TrainingMetrics:
    """The run's gauges, read from the latest :class:`Snapshot` at each scrape."""

    def __init__(self, config: RunConfig) -> None:
        self.groups = group_labels(config)
        self.info = {
            "run": Path(config.output_dir).name,
            "output_dir": str(config.output_dir),
            "lr_scheduler": config.lr_scheduler.name,
            "optimizer": config.optimizer.name,
        }
        self.snapshot = Snapshot(0, 0)
        self.port = 0

    def started(self, update: int, total: int) -> None:
        """The run starts (or resumes) at ``update`` of ``total``; no update is done yet."""
        self.snapshot = Snapshot(update, total)

    def publish(self, update: int, values: LineValues) -> None:
        """Optimizer update ``update`` (1-based, as in metrics.jsonl) is done."""
        self.snapshot = Snapshot(update, self.snapshot.total, values)

    def describe(self) -> list:
        """Nothing to describe ahead of a scrape (prometheus_client calls this on register)."""
        return []

    def collect(self) -> Iterable:
        """The metric families of the latest snapshot (prometheus_client's Collector API)."""
        from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

        snap = self.snapshot  # one read: the loop replaces it whole

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"sdlora_train_{name}", doc, value=value)

        yield InfoMetricFamily("sdlora_train_run", "The run this process trains", value=self.info)
        yield gauge("update", "Optimizer updates done (as metrics.jsonl's step)", snap.update)
        yield gauge("total_updates", "Optimizer updates the run trains in all", snap.total)
        v = snap.values
        if v is None:
            return
        lr = GaugeMetricFamily(
            "sdlora_train_lr",
            "LR the last update applied, per param group",
            labels=["param_group", "module", "name"],
        )
        for index, ((name, module), value) in enumerate(zip(self.groups, v.lrs, strict=True)):
            lr.add_metric([str(index), module, name], value)
        yield lr
        yield gauge("loss", "Loss of the last update (mean over its micro-batches)", v.loss)
        yield gauge("loss_ema", "Smoothed loss, as the progress line's ema", v.loss_ema)
        if v.val_loss is not None and v.val_step is not None:
            yield gauge("val_loss", "Fixed-seed validation loss, last measured", v.val_loss)
            yield gauge("val_loss_update", "The update val_loss was measured at", v.val_step)
        yield gauge("updates_per_second", "Updates per second of training time", v.updates_per_s)
        yield gauge("images_per_second", "Images per second of training time", v.images_per_s)
        yield gauge("elapsed_seconds", "Training time so far, over every session", v.elapsed_s)
        yield gauge("eta_seconds", "Estimated time to the last update", v.eta_s)
        peak = GaugeMetricFamily(
            "sdlora_train_peak_memory_bytes",
            "Peak memory of the main process: VRAM on CUDA, else the RSS",
            labels=["kind"],
        )
        peak.add_metric([v.peak_kind], v.peak_bytes)
        yield peak

    def registry(self) -> CollectorRegistry:
        """A registry of this run's own: these gauges and the process' CPU, memory and fds."""
        from prometheus_client import CollectorRegistry, ProcessCollector

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        ProcessCollector(registry=registry)
        return registry


def _bind(registry: CollectorRegistry, ports: Sequence[int]) -> tuple[WSGIServer, threading.Thread]:
    """Start prometheus_client's server on the first port of ``ports`` that binds.

    A port preflight found free may have been taken since (nothing holds it in between): that
    is the same clear error, never a traceback.
    """
    from prometheus_client import start_http_server

    reasons = []
    for port in ports:
        try:
            return start_http_server(port, BIND_ADDRESS, registry)
        except OSError as err:
            reasons.append(_why(port, err))
    raise ConfigError([f"{KEY}: {reasons[0]}; pick another port, or 0 for no metrics server"], KEY)


@contextmanager
def serving(config: RunConfig, main: bool, spread: int = 1) -> Iterator[TrainingMetrics | None]:
    """Serve the run's ``/metrics`` inside the block (main process, port set); else None.

    Args:
        config: The run config (``logging.prometheus_port``).
        main: Whether this is the run's main process, the one that serves.
        spread: Ports that may be tried from the configured one on (:data:`SWEEP_PORTS` for a
            sweep trial).

    Raises:
        ConfigError: No port could be bound.
    """
    port = config.logging.prometheus_port
    if not port or not main:
        yield None
        return
    metrics = TrainingMetrics(config)
    server, thread = _bind(metrics.registry(), candidate_ports(port, spread))
    metrics.port = server.server_port
    log.info("serving /metrics for Prometheus on port %d", metrics.port)
    try:
        yield metrics
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
