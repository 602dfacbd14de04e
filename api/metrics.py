"""Prometheus metrics of the API: requests, latency per endpoint and model, rejections by reason.

Each app has its own registry (several apps in one process, as in the tests, do not clash). With
several uvicorn workers (`python -m api --workers N`) every worker is its own process:
`PROMETHEUS_MULTIPROC_DIR` is then set by `python -m api` and `/metrics` adds up every
worker's figures (prometheus-client's multiprocess mode). Under Ray Serve `/metrics` answers for
the replica that served the scrape; Ray's own metrics cover the deployment as a whole.

Labels carry the route's template (`/v1/predict/{key}`), never the raw path, and a model label
only for a registry key, so a client cannot grow the label sets.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from core.tasks import TASKS

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REPLICA_HEADER = "X-SecondLook-Replica"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Metrics:
    """The API's metrics in one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("secondlook_api_requests", "HTTP requests answered", ["endpoint", "model", "status"],
                                registry=self.registry)
        self.latency = Histogram("secondlook_api_request_seconds", "Time from request to the end of the answer",
                                 ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.rejections = Counter("secondlook_api_rejections", "Requests refused, by reason (the error code)",
                                  ["reason"], registry=self.registry)

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format: this process's, or every worker's in multiprocess mode."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Instrumented:
    """ASGI middleware: counts and times every HTTP request, and names the replica in a response header."""

    def __init__(self, app: ASGIApp, metrics: Metrics, replica: Callable[[], str]) -> None:
        self.app = app
        self.metrics = metrics
        self.replica = replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}
        replica = self.replica().encode("latin-1", "replace")

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER.lower().encode(), replica)]
            await send(message)

        try:
            await self.app(scope, receive, send_named)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            key = (scope.get("path_params") or {}).get("key")
            model = key if key in TASKS else ""
            self.metrics.requests.labels(endpoint, model, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint, model).observe(time.perf_counter() - started)
