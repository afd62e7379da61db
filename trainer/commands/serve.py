"""``sdlora serve``: the LR schedules as an HTTP service, with Prometheus metrics.

    POST /lr_schedule       the LRs training applies at given updates (``serve_api.py``)
    GET  /schedules         every registered schedule, one line each (``sdlora schedules``)
    GET  /schedules/{name}  one schedule's formula, keys and defaults (``sdlora schedules NAME``)
    GET  /metrics           Prometheus text: requests, latency, schedule evaluations
    GET  /healthz           {"status": "ok"}, at once: the readiness probe

Starlette on uvicorn, one process: replicas scale it (docker/k8s/serve.yaml), each with its own
``/metrics``, as Prometheus expects. The answers are computed on Starlette's thread pool, so
``/healthz`` and ``/metrics`` answer while a 100,000-update request is evaluated. Every error is
JSON with a 4xx status and the messages the config loader gives; an error of the service itself
is a JSON 500 whose traceback goes to the server's log, never to the client. This module is
imported only by the ``serve`` command: its web stack is the ``serve`` extra, kept out of
``sdlora --help`` and of training.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from trainer.commands import serve_api
from trainer.commands.serve_api import MAX_BODY_BYTES, RequestError
from trainer.config.load import ConfigError

log = logging.getLogger("sdlora.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]
ENDPOINTS = ("/lr_schedule", "/schedules", "/schedules/{name}", "/metrics", "/healthz")
# Request latencies, in seconds: a one-update answer takes well under a millisecond of work;
# 100,000 updates of a slow schedule take a second or more.
BACKLOG = 2048  # connections waiting to be accepted (uvicorn's default)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ServiceMetrics:
    """The service's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sdlora_serve_requests",
            "HTTP requests answered, by endpoint, method and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "sdlora_serve_request_duration_seconds",
            "Time from a request's arrival to its last byte sent, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_progress = Gauge(
            "sdlora_serve_requests_in_progress", "Requests being answered now", registry=r
        )
        self.evaluations = Counter(
            "sdlora_serve_schedule_evaluations",
            "Updates evaluated (one Schedule.lrs call each), by schedule",
            ["lr_scheduler"],
            registry=r,
        )


def endpoint_of(path: str) -> str:
    """The route a path takes, as a label with few values (every unknown path is "other")."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/schedules/") and path.count("/") == 2:
        return "/schedules/{name}"
    return "other"


def observed(app: ASGIApp, metrics: ServiceMetrics) -> ASGIApp:
    """``app`` with every HTTP request counted by status and timed (an ASGI middleware)."""

    async def middleware(
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.in_progress.inc()
        try:
            await app(scope, receive, send_status)
        finally:
            metrics.in_progress.dec()
            endpoint = endpoint_of(scope["path"])
            metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    return middleware


def json_response(body: Any, status: int = 200) -> Response:
    """JSON whose floats are Python's ``repr``: each reads back as the same double."""
    text = json.dumps(body, allow_nan=False, separators=(",", ":"))
    return Response(text, status, media_type="application/json")


def error_response(err: RequestError) -> Response:
    return json_response(err.body(), err.status)


async def read_body(request: Request) -> bytes:
    """The body, refused past :data:`MAX_BODY_BYTES` (read no further than that)."""
    limit = f"the body is over the limit of {MAX_BODY_BYTES:,} bytes (MAX_BODY_BYTES)"
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise RequestError(400, [f"Content-Length {length!r} is not a byte count"])
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(413, [f"{limit}; send fewer steps per request"])
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestError(413, [f"{limit}; send fewer steps per request"])
        chunks.append(chunk)
    return b"".join(chunks)


def _evaluate(body: bytes) -> serve_api.Answer:
    return serve_api.answer(serve_api.parse_json(body))


def build_app(metrics: ServiceMetrics | None = None) -> ASGIApp:
    """The service as an ASGI app (uvicorn runs it; so may any ASGI server)."""
    metrics = metrics or ServiceMetrics()

    async def lr_schedule(request: Request) -> Response:
        try:
            body = await read_body(request)
            answer = await run_in_threadpool(_evaluate, body)
        except RequestError as err:
            return error_response(err)
        metrics.evaluations.labels(answer.lr_scheduler).inc(answer.evaluations)
        return json_response(answer.body)

    async def schedule_list(request: Request) -> Response:
        return json_response(await run_in_threadpool(serve_api.schedule_list))

    async def schedule_info(request: Request) -> Response:
        try:
            info = await run_in_threadpool(serve_api.schedule_info, request.path_params["name"])
        except RequestError as err:
            return error_response(err)
        return json_response(info)

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def http_error(request: Request, exc: Exception) -> Response:
        """Routing's own errors (no such path, wrong method) as JSON like every other."""
        assert isinstance(exc, HTTPException)
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            message = f"no endpoint {where}; the endpoints: {', '.join(ENDPOINTS)}"
        else:
            message = f"{where}: {exc.detail}"
        return json_response({"error": message, "problems": [message]}, exc.status_code)

    async def internal_error(request: Request, exc: Exception) -> Response:
        """A fault of the service: JSON without the traceback (uvicorn logs it)."""
        message = f"internal error ({type(exc).__name__}), logged on the server"
        return json_response({"error": message, "problems": [message]}, 500)

    app = Starlette(
        routes=[
            Route("/lr_schedule", lr_schedule, methods=["POST"]),
            Route("/schedules", schedule_list, methods=["GET"]),
            Route("/schedules/{name}", schedule_info, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )
    return observed(app, metrics)


def bind(host: str, port: int) -> socket.socket:
    """The listening address, bound here so that a port in use is a clear error (and port 0
    picks a free one); uvicorn serves on this very socket, so nothing can take it between."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as err:
        raise ConfigError([f"--host {host!r}: not an address of this machine: {err}"]) from err
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        # Listening from here on: a client that connects before uvicorn runs waits in the
        # backlog instead of being refused.
        sock.listen(BACKLOG)
    except OSError as err:
        sock.close()
        raise ConfigError(
            [f"--port {port}: cannot listen on {host}:{port}: {err.strerror or err}; "
             "pick another port (--port 0 takes any free one)"],
            "sdlora serve",
        ) from err  # fmt: skip
    return sock


def serve(host: str, port: int, access_log: bool = False) -> int:
    """Run the service until SIGINT or SIGTERM; it prints the address it listens on first."""
    import uvicorn

    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    # Config warnings found in requests are the clients' to read in the answers, not the log's.
    logging.getLogger("sdlora").setLevel(logging.ERROR)
    log.setLevel(logging.INFO)
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"sdlora serve: listening on http://{shown}:{bound_port}", flush=True)
    config = uvicorn.Config(
        build_app(),
        lifespan="off",
        access_log=access_log,
        log_level="info",
        timeout_graceful_shutdown=10,
        backlog=BACKLOG,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0
