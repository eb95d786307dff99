"""Prometheus metrics of an HTTP app (the front door, the admin API), on a
registry of its own and a listener of its own.

``HttpMetrics`` holds the request counter, latency histogram and in-flight
gauge that :class:`HttpMetricsMiddleware` moves, and serves them on a
separate host and port, never on the app's client-facing one: /metrics says
how busy and how healthy the gateway is, which is not for its clients.
``RedisBreakersCollector`` exports the circuit breakers of the app's Redis
clients, labelled by client, read at each scrape.

A registry per app (not the process-global default) lets tests build several
apps in one process without metric name clashes, as ``gateway.metrics`` does
for workers. Imports prometheus-client, starlette's routing and the
gateway's errors and Redis breaker; nothing from FastAPI itself.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import ConfigError
from gateway.metrics import breaker_families, start_metrics_server, stop_metrics_server
from gateway.redis_breaker import breaker_for
from gateway.store import RedisClient

logger = logging.getLogger(__name__)

# From a health probe answered in well under a millisecond to an inference
# that waited out a long reply timeout (frontdoor.reply_timeout_s, 10 s by
# default); anything slower than 30 s lands in +Inf.
LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
)  # fmt: skip

# Label values for what no route template or known code names: a client
# choosing paths, methods or bodies must not be able to mint new series.
UNMATCHED_ROUTE = "unmatched"
OTHER = "OTHER"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Error bodies are a few hundred bytes ({"error", "code", "retriable"}, the
# message capped by each app); more than this is not one of them.
_MAX_ERROR_BODY_BYTES = 16_384

RedisSource = Callable[[], RedisClient | None]


class HttpMetrics:
    """Request counter, latency histogram and in-flight gauge of one app.

    Parameters
    ----------
    setting
        The settings section whose ``metrics_port`` this app serves on, named
        in the error when the port is taken (``"frontdoor"``, ``"admin"``).
    """

    def __init__(self, setting: str) -> None:
        self.setting = setting
        self.registry = CollectorRegistry()
        self._server: WSGIServer | None = None
        self.requests = Counter(
            "modelgate_http_requests",
            "HTTP requests answered, by route template, method, status and the "
            "error code of the body ('' for none; status 0: the client went "
            "away before an answer).",
            ["route", "method", "status", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "modelgate_http_request_duration_seconds",
            "Wall time from a request's arrival to the end of its answer.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "modelgate_http_requests_in_flight",
            "HTTP requests being answered now.",
            registry=self.registry,
        )

    def watch_redis(self, sources: Mapping[str, RedisSource]) -> None:
        """Export the breakers of the app's Redis clients, each found through
        its source at every scrape (a client made later, or made again after a
        failed start, is then followed without re-registering)."""
        self.registry.register(RedisBreakersCollector(sources))

    def serve(self, host: str, port: int, *, beside: int | None = None) -> int:
        """Expose /metrics on ``host:port`` in a daemon thread and return the
        bound port (port 0 means none: metrics stay in-process only, as
        ``worker.metrics_port`` 0 does).

        Parameters
        ----------
        beside
            The app's client-facing port, which the metrics must not share.

        Raises
        ------
        ConfigError
            The port is the client-facing one, or is taken (or the host
            cannot be bound).
        """
        if port == 0:
            return 0
        if port == beside:
            raise ConfigError(
                f"{self.setting}.metrics_port {port} is the client-facing port "
                f"({self.setting}.port); give the metrics a port of their own, "
                "or 0 for none"
            )
        self._server = start_metrics_server(
            self.registry, host, port, self.setting, f"{self.setting} process"
        )
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop serving /metrics. Idempotent."""
        server, self._server = self._server, None
        stop_metrics_server(server)


class HttpMetricsMiddleware:
    """Count, time and track every HTTP request of ``app`` (pure ASGI).

    The route label is the template of the route that matched (``/v2/models/
    {model_name}/infer``), as the router left it in the scope; for a request
    refused before routing (the front door's body-size guard) the first of
    ``templates`` whose pattern fits the path; ``unmatched`` when none does.
    The code label is the ``code`` of an error body (status 400 and up), kept
    only if it is one of ``codes`` so that the label set stays the app's own
    table.

    Parameters
    ----------
    app
        The ASGI app inside this middleware.
    metrics
        Where the counts go.
    templates
        The app's path templates, read once, when first needed (for FastAPI,
        the paths of its OpenAPI document, by then complete).
    codes
        The error codes the app answers with.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: HttpMetrics,
        templates: Callable[[], Iterable[str]],
        codes: Collection[str],
    ) -> None:
        self.app = app
        self.metrics = metrics
        self._templates = templates
        self._patterns: list[tuple[re.Pattern[str], str]] | None = None
        self.codes = frozenset(codes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        error_body: list[bytes] | None = None
        size = 0

        async def watched_send(message: Message) -> None:
            nonlocal status, error_body, size
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if status >= 400:
                    error_body = []
            elif message["type"] == "http.response.body" and error_body is not None:
                chunk = message.get("body", b"")
                size += len(chunk)
                if size <= _MAX_ERROR_BODY_BYTES:
                    error_body.append(chunk)
            await send(message)

        self.metrics.in_flight.inc()
        code = ""
        try:
            await self.app(scope, receive, watched_send)
            if error_body is not None:
                code = self._code(b"".join(error_body), size)
        except Exception:
            # Unhandled here means the server's last-resort handler answers
            # after us; both apps answer that 500 with INTERNAL.
            if status == 0:
                status = 500
            code = "INTERNAL"
            raise
        finally:
            self.metrics.in_flight.dec()
            route = self._route(scope)
            method = scope["method"] if scope["method"] in _METHODS else OTHER
            self.metrics.requests.labels(route, method, str(status), code).inc()
            self.metrics.duration.labels(route, method).observe(
                time.perf_counter() - started
            )

    def _route(self, scope: Scope) -> str:
        # FastAPI leaves the matched route (also on a wrong method) in the
        # scope; after the router has run, no route there means no match.
        path = getattr(scope.get("route"), "path", None)
        if isinstance(path, str):
            return path
        if "router" in scope:
            return UNMATCHED_ROUTE
        if self._patterns is None:
            self._patterns = [(compile_path(t)[0], t) for t in self._templates()]
        for pattern, template in self._patterns:
            if pattern.match(scope["path"]):
                return template
        return UNMATCHED_ROUTE

    def _code(self, body: bytes, size: int) -> str:
        if size > _MAX_ERROR_BODY_BYTES:
            return OTHER
        try:
            code = json.loads(body).get("code")
        except (ValueError, AttributeError):
            return OTHER
        return code if isinstance(code, str) and code in self.codes else OTHER


class RedisBreakersCollector(Collector):
    """The circuit breakers of several Redis clients, labelled ``client``.

    The same metrics as a worker's (both built by
    :func:`gateway.metrics.breaker_families`), with the label added because
    an app may hold
    more than one client (the admin API has its own and the live
    configuration's). A source that has no client yet adds no sample.
    """

    def __init__(self, sources: Mapping[str, RedisSource]) -> None:
        self._sources = dict(sources)

    def collect(self) -> Iterator[Metric]:
        breakers = []
        for name, source in self._sources.items():
            client = source()
            if client is not None:
                breakers.append(([name], breaker_for(client)))
        return breaker_families(breakers, ["client"], "this process's")

    def describe(self) -> Iterator[Metric]:
        # Names for the registry's clash check; values are not read.
        return self.collect()
