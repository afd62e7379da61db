"""A training run's ``/metrics`` (``logging.prometheus_port``): scraped while it trains, and its
port free again once the run ends or is killed.

What a scrape shows is checked against the run's own ``metrics.jsonl`` (the LR each update
applied, its loss) and the progress line's smoothing (``progress.smoothed``), read through
prometheus_client's parser of the text format.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trainer.config import load as config
from trainer.config.load import ConfigError
from trainer.report import prometheus
from trainer.report.progress import smoothed
from trainer.report.tracking import read_metrics
from trainer.run import loop, preflight
from trainer.run.trial import LOCK_ENV

REPO = Path(__file__).resolve().parents[1]
TINY_TOML = REPO / "configs" / "tiny.toml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def held(port: int) -> Iterator[socket.socket]:
    """Another program listening on ``port`` (on every interface, as a server would)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen()
        yield sock


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``/metrics`` of a run: each sample's value by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


# ---------------------------------------------------------------- the key, before any model


def test_the_port_is_checked_with_the_config():
    with pytest.raises(ConfigError) as err:
        config.load(TINY_TOML, ["logging.prometheus_port=70000"])
    assert err.value.problems == [
        "logging.prometheus_port: 70000 is not a TCP port; use 1..65535, or 0 for no metrics server"
    ]


def test_a_missing_prometheus_client_names_its_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "prometheus_client" else real(name, *a),
    )
    with pytest.raises(ConfigError) as err:
        config.load(TINY_TOML, ["logging.prometheus_port=9464"])
    assert "pip install 'sdlora[prometheus]'" in str(err.value)
    config.load(TINY_TOML, ["logging.prometheus_port=0"])  # off: nothing to install


def test_preflight_finds_a_port_in_use_before_any_model_loads(make_config):
    port = free_port()
    cfg = make_config(f"logging.prometheus_port={port}")
    with held(port), pytest.raises(ConfigError) as err:
        preflight.check(cfg, 1)
    assert f"logging.prometheus_port: port {port} is in use on this machine" in str(err.value)
    preflight.check(cfg, 1)  # free again: no problem


def test_a_port_taken_between_preflight_and_the_start_is_the_same_clear_error(make_config):
    port = free_port()
    cfg = make_config(f"logging.prometheus_port={port}")
    with held(port), pytest.raises(ConfigError) as err, prometheus.serving(cfg, main=True):
        pass
    assert f"port {port} is in use" in err.value.problems[0]


def test_a_sweep_trial_takes_the_next_free_port(make_config, monkeypatch):
    monkeypatch.setenv(LOCK_ENV, "/nonexistent/run.lock")  # what a sweep worker sets
    port = free_port()
    cfg = make_config(f"logging.prometheus_port={port}")
    with held(port):
        preflight.check(cfg, 1)  # a later port of the range is free: no problem
        with prometheus.serving(cfg, True, prometheus.SWEEP_PORTS) as metrics:
            assert metrics is not None
            assert port < metrics.port < port + prometheus.SWEEP_PORTS
            info = scrape(metrics.port)["sdlora_train_run_info"]
            ((labels, _),) = info.items()
            assert dict(labels)["run"] == Path(cfg.output_dir).name


def test_only_the_main_process_serves(make_config):
    cfg = make_config(f"logging.prometheus_port={free_port()}")
    with prometheus.serving(cfg, main=False) as metrics:
        assert metrics is None
        assert prometheus.port_problems(cfg.logging.prometheus_port) == []


# ---------------------------------------------------------------- a run, scraped


@pytest.mark.slow
def test_a_run_serves_its_update_and_lr_while_it_trains_and_frees_the_port(make_config):
    port = free_port()
    cfg = make_config(
        f"logging.prometheus_port={port}",
        "train.max_steps=6",
        "train.batch_size=2",
        "train.gradient_accumulation_steps=1",
        "lora.train_text_encoder=true",
        "train.text_encoder_lr=3e-4",
        "validation.fraction=0.25",
        "validation.every_n_steps=3",
    )
    seen: list[dict] = []
    done = threading.Event()

    def scraper() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):  # not serving yet, or no more
                seen.append(scrape(port))
            time.sleep(0.05)

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        result = loop.run(cfg)
    finally:
        done.set()
        thread.join()
    records = {r["step"]: r for r in read_metrics(result.output_dir)}
    ema = smoothed([records[s]["loss"] for s in sorted(records)])
    during = [s for s in seen if "sdlora_train_lr" in s]
    updates = [int(s["sdlora_train_update"][()]) for s in during]
    assert any(1 <= u < 6 for u in updates), updates  # seen while it trained
    for sample, update in zip(during, updates, strict=True):
        record = records[update]
        lrs = {dict(k)["module"]: v for k, v in sample["sdlora_train_lr"].items()}
        assert lrs == {"unet": record["lr"][0], "text_encoder": record["lr"][1]}
        named = {dict(k)["name"]: v for k, v in sample["sdlora_train_lr"].items()}
        assert named == dict(zip(record["lr_groups"], record["lr"], strict=True))
        assert sample["sdlora_train_loss"][()] == record["loss"]
        assert sample["sdlora_train_loss_ema"][()] == pytest.approx(ema[update - 1], rel=1e-12)
        assert sample["sdlora_train_total_updates"][()] == 6
        if update >= 3:  # validated every 3 updates
            val_at = max(v for v in (3, 6) if v <= update)
            assert sample["sdlora_train_val_loss"][()] == records[val_at]["val_loss"]
            assert sample["sdlora_train_val_loss_update"][()] == val_at
        assert sample["sdlora_train_peak_memory_bytes"][(("kind", "RSS"),)] > 0
        assert sample["sdlora_train_updates_per_second"][()] > 0
    # The run returned: nothing listens, and a next run binds the port at once.
    with pytest.raises(OSError):
        scrape(port)
    assert prometheus.port_problems(port) == []


@pytest.mark.slow
def test_a_killed_run_leaves_its_port_free(tiny_model, tiny_data, tmp_path):
    """SIGKILL mid-training: the kernel closes the socket, and the next run binds it."""
    port = free_port()
    sets = [
        f'model.pretrained="{tiny_model}"',
        f'data.path="{tiny_data}"',
        f'output_dir="{tmp_path / "out"}"',
        'logging.tracker="none"',
        "train.max_steps=200",
        f"logging.prometheus_port={port}",
    ]
    cmd = [sys.executable, "train.py", "--config", str(TINY_TOML)]
    cmd += [x for s in sets for x in ("--set", s)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline, update = time.monotonic() + 180, 0.0
        while time.monotonic() < deadline and proc.poll() is None and update < 2:
            try:
                update = scrape(port)["sdlora_train_update"][()]
            except (OSError, KeyError):
                time.sleep(0.05)
        assert update >= 2, "the run never showed an update on /metrics"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert prometheus.port_problems(port) == []
    cfg = config.load(TINY_TOML, sets)
    with prometheus.serving(cfg, main=True) as metrics:
        assert metrics is not None and metrics.port == port


def test_every_param_group_is_scraped_under_its_metrics_jsonl_name():
    """LoRA+ splits each module's group in two: every group keeps a series, labelled with
    the name metrics.jsonl's lr_groups gives it and the module it trains."""
    from prometheus_client import CollectorRegistry, generate_latest

    from trainer.report.progress import LineValues

    cfg = config.load(TINY_TOML, ["lora.plus_ratio=4.0", "lora.train_text_encoder=true"])
    names = cfg.lr_group_names()
    assert len(names) == 4  # the UNet's and the text encoder's A and B groups
    metrics = prometheus.TrainingMetrics(cfg)
    metrics.started(0, 10)
    lrs = [1e-4 * (i + 1) for i in range(len(names))]
    values = LineValues(0.5, 0.5, lrs, 0, 1, 1.0, 1.0, 1.0, 9.0, 1, "RSS", None, None)
    metrics.publish(1, values)
    registry = CollectorRegistry()
    registry.register(metrics)
    text = generate_latest(registry).decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "sdlora_train_lr"]
    got = {s.labels["name"]: (s.labels["module"], s.value) for s in family.samples}
    modules = [g.component for g in cfg.lr_groups()]
    assert got == dict(zip(names, zip(modules, lrs, strict=True), strict=True))
    assert set(modules) == {"unet", "text_encoder"}
