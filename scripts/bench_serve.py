"""``sdlora serve`` under load, on this machine's loopback: throughput and latency.

Starts ``sdlora serve --port 0`` as its own process, then for each scenario runs ``--clients``
concurrent clients (threads, each on its own keep-alive connection) for ``--seconds`` seconds,
each sending the scenario's request again and again:

- ``single``: one update of a cosine schedule with warmup, two param groups;
- ``10k``: 10,000 updates of the same schedule in one request;
- ``10k_alone``: the same with one client, for a request's latency without a queue.

It reports requests/s, updates/s, p50 and p99 latency and any non-200 or wrong answer (every
answer is compared with ``Schedule.lrs`` in this process), and two ratios from the same run:
updates/s of ``10k`` requests over ``single`` ones (what batching steps saves), and of ``10k``
over ``Schedule.lrs`` called in-process (what HTTP and JSON cost). Clients and server share
the machine's cores, so the figures are a floor for a dedicated server.

Usage:
    python scripts/bench_serve.py [--clients 32] [--seconds 10] [--json OUT]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import schedulers  # noqa: E402

TABLE = {"name": "cosine", "warmup_steps": 500, "min_lr_ratio": 0.1}
TOTAL = 20_000
BASE_LRS = [1e-4, 5e-5]
SCENARIOS = {"single": [12_345], "10k": list(range(5_001, 15_001))}
HEADERS = {"Content-Type": "application/json"}


def start_server() -> tuple[subprocess.Popen, int]:
    """``sdlora serve --port 0`` and the port it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.commands.cli", "serve", "--port", "0"],
        cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def run_clients(port: int, steps: list[int], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads posting the same request for ``seconds``; the figures."""
    schedule = schedulers.from_table(TABLE)
    want = [schedule.lrs(s - 1, TOTAL, BASE_LRS) for s in steps]
    body = {"lr_scheduler": TABLE, "total_steps": TOTAL, "base_lrs": BASE_LRS, "steps": steps}
    payload = json.dumps(body).encode()
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine, bad = [], 0
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            try:
                conn.request("POST", "/lr_schedule", payload, HEADERS)
                response = conn.getresponse()
                text = response.read()
                ok = response.status == 200 and json.loads(text)["lrs"] == want
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()  # counted as a failure; the next request reconnects
                ok = False
            mine.append(time.perf_counter() - start)
            bad += not ok
        conn.close()
        with lock:
            latencies.extend(mine)
            failures[0] += bad

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - began
    latencies.sort()
    count = len(latencies)
    return {
        "steps_per_request": len(steps),
        "requests": count,
        "failures": failures[0],
        "seconds": round(took, 2),
        "requests_per_s": round(count / took, 1),
        "updates_per_s": round(count * len(steps) / took),
        "p50_ms": round(latencies[count // 2] * 1e3, 2),
        "p99_ms": round(latencies[min(count - 1, int(count * 0.99))] * 1e3, 2),
    }


def in_process_rate(seconds: float = 2.0) -> float:
    """Updates per second of ``Schedule.lrs`` called directly, for the same table."""
    schedule = schedulers.from_table(TABLE)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for step in range(5_000, 15_000):
            schedule.lrs(step, TOTAL, BASE_LRS)
        done += 10_000
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (1..256)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per scenario (1..120)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 256 or not 1 <= args.seconds <= 120:
        parser.error("--clients must be in 1..256 and --seconds in 1..120")
    proc, port = start_server()
    try:
        results = {
            name: run_clients(port, steps, args.clients, args.seconds)
            for name, steps in SCENARIOS.items()
        }
        results["10k_alone"] = run_clients(port, SCENARIOS["10k"], 1, args.seconds)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    direct = in_process_rate()
    report = {
        "clients": args.clients,
        "cpus": os.cpu_count(),
        "scenarios": results,
        "in_process_updates_per_s": round(direct),
        "ratio_10k_over_single_updates_per_s": round(
            results["10k"]["updates_per_s"] / results["single"]["updates_per_s"], 1
        ),
        "ratio_10k_over_in_process": round(results["10k"]["updates_per_s"] / direct, 3),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
