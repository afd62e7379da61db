"""``sdlora serve``: the real server on a free local port, spoken to through real HTTP.

The answers are checked against ``sdlora lr-plot``'s CSV for the same table, to the last bit
(the text of each float and its hex); the error messages against what the config loader says
for the same table; the metrics through prometheus_client's own parser of the text format.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from plot_schedules import EXAMPLES, TOTAL_STEPS
from prometheus_client.parser import text_string_to_metric_families
from test_startup import loaded_after

import schedulers
from trainer.commands import cli, serve_api
from trainer.commands.serve_api import MAX_BODY_BYTES, MAX_STEPS
from trainer.config import load as config
from trainer.config.load import ConfigError
from typedtables.fields import toml_value

REPO = Path(__file__).resolve().parents[1]
TINY_TOML = REPO / "configs" / "tiny.toml"
# Two param groups, as a run that trains the text encoder has: the UNet's, then its own.
BASE_LRS = [1e-3, 2.5e-4]
GROUP_SETS = ["lora.train_text_encoder=true", f"train.text_encoder_lr={BASE_LRS[1]}"]
WEB_STACK = ("starlette", "uvicorn", "prometheus_client", "fastapi", "anyio")


# ---------------------------------------------------------------- the server and a client


class Server:
    """``sdlora serve --port 0`` in its own process; ``port`` is the one it printed."""

    def __init__(self, log: Path) -> None:
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trainer.commands.cli", "serve", "--port", "0"],
            cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.port = self._read_port()
        self._wait_healthy()

    def _read_port(self) -> int:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ""
        assert "listening on http://127.0.0.1:" in line, f"no address printed: {line!r}"
        return int(line.rsplit(":", 1)[1])

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if get(self.port, "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the server never answered /healthz")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self.log.close()
        return code


def request(
    port: int, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, Any] | str]:
    """One request on a fresh connection: the status and the JSON (or text) answered."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        text = response.read().decode()
        kind = response.getheader("Content-Type", "")
    finally:
        conn.close()
    return response.status, json.loads(text) if kind.startswith("application/json") else text


def get(port: int, path: str) -> tuple[int, Any]:
    return request(port, "GET", path)


def post(port: int, data: dict[str, Any]) -> tuple[int, Any]:
    return request(port, "POST", "/lr_schedule", json.dumps(data).encode())


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("serve") / "server.log")
    yield running
    # uvicorn shuts down on SIGTERM, then ends by the signal it was sent (as servers should).
    assert running.stop() in (0, -signal.SIGTERM)
    log = Path(running.log.name).read_text()
    assert "Finished server process" in log and "Traceback" not in log


# ---------------------------------------------------------------- the reference: lr-plot's CSV


def inline_table(table: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in table.items()) + "}"


def plot_sets(table: dict[str, Any], total: int) -> list[str]:
    """The --set flags of a tiny.toml run with this schedule, length and two param groups."""
    return [
        f"lr_scheduler={inline_table(table)}",
        f"train.max_steps={total}",
        f"train.learning_rate={BASE_LRS[0]}",
        *GROUP_SETS,
    ]


def lr_plot_csv(sets: list[str], tmp_path: Path) -> tuple[list[int], list[list[str]]]:
    """``sdlora lr-plot --csv`` run as the command line runs it: steps and the LR texts."""
    csv = tmp_path / "lr.csv"
    argv = ["lr-plot", "--config", str(TINY_TOML), "--csv", str(csv)]
    assert cli.main(argv + [x for s in sets for x in ("--set", s)]) == 0
    header, *lines = csv.read_text().splitlines()
    assert header == "step,lr_unet,lr_text_encoder"  # the groups train.py logs
    rows = [line.split(",") for line in lines]
    return [int(r[0]) for r in rows], [r[1:] for r in rows]


def assert_bitwise(answered: list[list[float]], texts: list[list[str]]) -> None:
    """Every float the service answered is the CSV's: the same text and the same double."""
    assert len(answered) == len(texts)
    for got, want in zip(answered, texts, strict=True):
        assert [repr(x) for x in got] == want
        assert [x.hex() for x in got] == [float(t).hex() for t in want]


@pytest.mark.slow
@pytest.mark.parametrize("table", [t for _, t in EXAMPLES], ids=[n for n, _ in EXAMPLES])
def test_every_builtin_schedule_answers_lr_plots_csv_to_the_bit(server, table, tmp_path):
    steps, texts = lr_plot_csv(plot_sets(table, TOTAL_STEPS), tmp_path)
    assert steps == list(range(1, TOTAL_STEPS + 1))
    by_table = {"lr_scheduler": table, "total_steps": TOTAL_STEPS, "base_lrs": BASE_LRS}
    status, body = post(server.port, {**by_table, "steps": steps})
    assert status == 200, body
    assert body["steps"] == steps and body["total_steps"] == TOTAL_STEPS
    assert_bitwise(body["lrs"], texts)
    # The whole run config, as TOML text, with the same overrides: the same numbers.
    by_config = {"config": TINY_TOML.read_text(), "set": plot_sets(table, TOTAL_STEPS)}
    status, body = post(server.port, {**by_config, "steps": steps})
    assert status == 200, body
    assert_bitwise(body["lrs"], texts)
    # One update at a time answers the same row.
    middle = TOTAL_STEPS // 2
    status, body = post(server.port, {**by_table, "step": middle})
    assert status == 200 and body["step"] == middle
    assert_bitwise([body["lrs"]], [texts[middle - 1]])


@pytest.mark.slow
def test_every_builtin_schedule_has_an_example():
    builtin = {n for n in schedulers.available() if schedulers.get(n).__module__ != "__main__"}
    assert builtin <= {t["name"] for _, t in EXAMPLES}


@pytest.mark.slow
def test_a_run_longer_than_the_csv_matches_at_every_sampled_update(server, tmp_path):
    """lr-plot writes a sample of a 250,000-update run (restarts included); the service gives
    the same LRs at those updates, asked in requests of at most MAX_STEPS."""
    table = {"name": "cosine_with_restarts", "warmup_steps": 0.01, "num_cycles": 7}
    total = 250_000
    steps, texts = lr_plot_csv(plot_sets(table, total), tmp_path)
    assert len(steps) < total and steps[-1] == total
    status, body = post(
        server.port,
        {"lr_scheduler": table, "total_steps": total, "base_lrs": BASE_LRS, "steps": steps},
    )
    assert status == 200, body
    assert_bitwise(body["lrs"], texts)


@pytest.mark.slow
def test_a_config_in_epochs_needs_the_dataset_size_and_then_matches_lr_plot(
    server, tiny_data, tmp_path
):
    """tiny.toml in epochs: the service does not read the dataset and says so; given its
    size, it derives the run length as lr-plot does from the folder itself."""
    sets = [f'data.path="{tiny_data}"', "train.max_steps=0", "train.epochs=3", *GROUP_SETS]
    steps, texts = lr_plot_csv(sets, tmp_path)
    images = len(list(Path(tiny_data).glob("*.png")))
    request_body = {"config": TINY_TOML.read_text(), "set": sets, "steps": steps}
    status, body = post(server.port, request_body)
    assert status == 422
    assert "the service does not read" in body["problems"][0] and "examples" in body["problems"][0]
    status, body = post(server.port, {**request_body, "examples": images})
    assert status == 200, body
    assert body["total_steps"] == steps[-1]
    assert [[repr(x) for x in row] for row in body["lrs"]] == texts
    header = (tmp_path / "lr.csv").read_text().splitlines()[0].split(",")
    assert ["step", *(f"lr_{name}" for name in body["groups"])] == header


# ---------------------------------------------------------------- the registry


@pytest.mark.slow
def test_schedules_list_and_describe_as_the_command_does(server, capsys):
    status, body = get(server.port, "/schedules")
    assert status == 200
    assert cli.main(["schedules"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [s["name"] for s in body["schedules"]] == [line.split()[0] for line in listed]
    assert [s["summary"] for s in body["schedules"]] == [line.split(None, 1)[1] for line in listed]
    status, body = get(server.port, "/schedules/cosine_with_restarts")
    assert status == 200
    assert body["text"] == schedulers.describe("cosine_with_restarts")
    cls = schedulers.get("cosine_with_restarts")
    assert {k["name"]: k["default"] for k in body["keys"]} == cls().params()


# ---------------------------------------------------------------- bad input


def loader_problems(table: dict[str, Any], total: int = 100) -> list[str]:
    """What ``config.load`` says of a config file with this [lr_scheduler] table."""
    try:
        config.load(TINY_TOML, [f"lr_scheduler={inline_table(table)}", f"train.max_steps={total}"])
    except ConfigError as err:
        return err.problems
    raise AssertionError("the loader accepted the table")


def by_table(table: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"lr_scheduler": table, "total_steps": 100, "base_lr": 1e-4, "step": 1, **extra}


@pytest.mark.slow
@pytest.mark.parametrize(
    "table",
    [
        {"name": "cosin", "warmup_steps": 10},
        {"name": "cosine", "warmup_stpes": 10},
        {"name": "cosine", "warmup_steps": 100},
        {"name": "cosine", "warmup_steps": 10, "min_lr_ratio": 1.5},
        {"name": "cosine_with_restarts", "num_cycles": "3"},
    ],
    ids=["unknown-schedule", "typo-key", "warmup-not-shorter-than-run", "range", "type"],
)
def test_a_bad_table_gets_422_and_the_loaders_messages(server, table):
    status, body = post(server.port, by_table(table))
    assert status == 422
    assert body["problems"] == loader_problems(table)
    assert body["error"] == f"{len(body['problems'])} problem(s) in request"


@pytest.mark.slow
def test_the_loaders_hints_reach_the_client(server):
    _, body = post(server.port, by_table({"name": "cosin"}))
    assert "did you mean 'cosine'?" in body["problems"][0]
    _, body = post(server.port, by_table({"name": "cosine", "warmup_stpes": 10}))
    assert body["problems"] == [
        "lr_scheduler.warmup_stpes: unknown key for the 'cosine' schedule; "
        "did you mean lr_scheduler.warmup_steps?"
    ]


LINEAR = {"name": "linear"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "said"),
    [
        (by_table(LINEAR, step=101), "update 101 is out of range: a run of 100 updates"),
        (by_table(LINEAR, step=0), "update 0 is out of range"),
        (
            {"lr_scheduler": LINEAR, "total_steps": 200_000, "base_lr": 1e-4}
            | {"steps": list(range(1, MAX_STEPS + 2))},
            f"{MAX_STEPS + 1:,} updates in one request; at most {MAX_STEPS:,} (MAX_STEPS)",
        ),
        (by_table(LINEAR, total_step=100), "request.total_step: unknown key; did you mean"),
        (by_table({"name": "os:getcwd"}), "imports no module a request names"),
        (by_table(LINEAR, config=""), "or config (a whole run config); both given"),
        ({"config": "[train\nmax_steps = 3", "step": 1}, "config: not valid TOML"),
        ({"lr_scheduler": LINEAR, "base_lr": 1e-4, "step": 1}, "total_steps: required"),
        (by_table(LINEAR, base_lr=-1e-4), "request.base_lr: -0.0001 must be > 0"),
    ],
    ids=[
        "past-the-end",
        "zero",
        "too-many-steps",
        "typo-request-key",
        "import-path",
        "both-forms",
        "bad-toml",
        "no-length",
        "negative-lr",
    ],
)
def test_bad_requests_get_422_naming_the_problem(server, body, said):
    status, answer = post(server.port, body)
    assert status == 422, answer
    assert any(said in p for p in answer["problems"]), answer


@pytest.mark.slow
def test_malformed_bodies_and_paths_get_json_errors(server):
    status, body = request(server.port, "POST", "/lr_schedule", b'{"lr_scheduler": {')
    assert status == 400 and "not valid JSON" in body["problems"][0]
    status, body = request(server.port, "POST", "/lr_schedule", b'{"base_lr": NaN}')
    assert status == 400 and "NaN is not a JSON number" in body["problems"][0]
    status, body = request(server.port, "POST", "/lr_schedule", b"[1, 2]")
    assert status == 400 and "JSON object" in body["problems"][0]
    big = b" " * (MAX_BODY_BYTES + 1)
    status, body = request(server.port, "POST", "/lr_schedule", big)
    assert status == 413 and f"{MAX_BODY_BYTES:,} bytes (MAX_BODY_BYTES)" in body["problems"][0]
    status, body = get(server.port, "/schedules/cosin")
    assert status == 404 and "did you mean 'cosine'?" in body["problems"][0]
    status, body = get(server.port, "/lr_schedule")
    assert status == 405 and isinstance(body, dict)
    status, body = get(server.port, "/nowhere")
    assert status == 404 and "/lr_schedule" in body["error"]


# ---------------------------------------------------------------- metrics


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``, read by prometheus_client's own parser."""
    status, text = get(port, "/metrics")
    assert status == 200 and isinstance(text, str)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def requests_seen(samples: dict, endpoint: str, method: str, status: str) -> float:
    key = (
        "sdlora_serve_requests_total",
        (("endpoint", endpoint), ("method", method), ("status", status)),
    )
    return samples.get(key, 0.0)


@pytest.mark.slow
def test_metrics_count_the_requests_made(server):
    before = scrape(server.port)
    good = {"lr_scheduler": LINEAR, "total_steps": 10, "base_lr": 1e-4, "steps": [1, 2, 3]}
    made = {("/lr_schedule", "POST", "200"): 3, ("/lr_schedule", "POST", "422"): 2}
    made |= {("/healthz", "GET", "200"): 4, ("/schedules/{name}", "GET", "404"): 1}
    made |= {("other", "GET", "404"): 1}
    for _ in range(3):
        assert post(server.port, good)[0] == 200
    for _ in range(2):
        assert post(server.port, by_table({"name": "cosin"}))[0] == 422
    for _ in range(4):
        assert get(server.port, "/healthz")[0] == 200
    assert get(server.port, "/schedules/nope")[0] == 404
    assert get(server.port, "/no/such/path")[0] == 404
    after = scrape(server.port)
    for (endpoint, method, status), count in made.items():
        grown = requests_seen(after, endpoint, method, status) - requests_seen(
            before, endpoint, method, status
        )
        assert grown == count, (endpoint, method, status)
    # The latency histogram counts every request of an endpoint; the evaluations every update.
    hist = ("sdlora_serve_request_duration_seconds_count", (("endpoint", "/lr_schedule"),))
    assert after[hist] - before.get(hist, 0.0) == 5
    evals = ("sdlora_serve_schedule_evaluations_total", (("lr_scheduler", "linear"),))
    assert after[evals] - before.get(evals, 0.0) == 9


# ---------------------------------------------------------------- load


@pytest.mark.slow
def test_32_concurrent_clients_leave_it_healthy_and_every_answer_right(server, capsys):
    """32 clients, each on its own keep-alive connection, for 3 seconds; the figures are
    printed, not asserted."""
    cases = []
    for _, table in EXAMPLES:
        schedule = schedulers.from_table(table)
        for step in (1, 100, 101, 500, 1000):
            want = schedule.lrs(step - 1, TOTAL_STEPS, BASE_LRS)
            body = {"lr_scheduler": table, "total_steps": TOTAL_STEPS, "base_lrs": BASE_LRS}
            cases.append((json.dumps({**body, "step": step}).encode(), want))
    results: list[tuple[float, bool]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 3.0

    def client(seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        mine = []
        while time.monotonic() < stop_at:
            payload, want = rng.choice(cases)
            start = time.perf_counter()
            conn.request("POST", "/lr_schedule", payload, {"Content-Type": "application/json"})
            response = conn.getresponse()
            text = response.read()
            ok = response.status == 200 and json.loads(text)["lrs"] == want
            mine.append((time.perf_counter() - start, ok))
        conn.close()
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    took = time.monotonic() - began
    assert results and all(ok for _, ok in results)
    assert server.proc.poll() is None
    assert get(server.port, "/healthz") == (200, {"status": "ok"})
    latencies = sorted(lat for lat, _ in results)
    with capsys.disabled():
        print(
            f"\n32 clients, {took:.1f} s: {len(results)} requests, {len(results) / took:.0f}/s, "
            f"p50 {latencies[len(latencies) // 2] * 1e3:.1f} ms, "
            f"p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.1f} ms"
        )


# ---------------------------------------------------------------- the docs


def test_the_docs_example_is_what_the_service_answers():
    """docs/serve.md's first curl body and the JSON it shows, through the request code."""
    text = (REPO / "docs" / "serve.md").read_text()
    sent = re.search(r"-d '(\{.*?\})'", text, re.DOTALL)
    shown = re.search(r"```json\n(\{.*?\})\n```", text, re.DOTALL)
    assert sent and shown
    answer = serve_api.answer(serve_api.parse_json(sent.group(1).encode()))
    assert json.loads(shown.group(1)) == answer.body


# ---------------------------------------------------------------- the command


def test_help_loads_no_web_stack():
    """The web stack is imported by `sdlora serve` alone, not by the command line's help."""
    for argv in (["--help"], ["serve", "--help"]):
        code, loaded = loaded_after(argv)
        assert code == 0
        assert sorted(loaded & set(WEB_STACK)) == []


def test_a_missing_web_stack_names_the_extra(monkeypatch, capsys):
    """Without the serve extra, `sdlora serve` is one error line naming it, exit status 2."""
    monkeypatch.delitem(sys.modules, "trainer.commands.serve", raising=False)
    monkeypatch.setitem(sys.modules, "starlette", None)  # import starlette fails
    monkeypatch.setitem(sys.modules, "starlette.applications", None)
    assert cli.main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "sdlora serve needs the starlette package" in err
    assert "pip install 'sdlora[serve]'" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_port_in_use_is_one_clear_error(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "trainer.commands.cli", "serve", "--port", str(port)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_kubernetes_example_probes_healthz_on_the_port_it_serves():
    """docker/k8s/serve.yaml: a Deployment whose container runs `sdlora serve` on the port its
    readiness probe and Service use, with resource requests."""
    docs = [d for d in yaml.safe_load_all((REPO / "docker/k8s/serve.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["command"] + container.get("args", [])
    assert command[:2] == ["sdlora", "serve"]
    port = int(command[command.index("--port") + 1])
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert container["ports"][0]["containerPort"] == port
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and probe["port"] in (port, container["ports"][0]["name"])
    assert set(container["resources"]["requests"]) >= {"cpu", "memory"}
    service = kinds["Service"]["spec"]
    labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    assert service["ports"][0]["targetPort"] in (port, container["ports"][0]["name"])
    dockerfile = (REPO / "docker/Dockerfile").read_text()
    assert "serve]" in dockerfile or "serve," in dockerfile
