"""Prometheus metrics of the front door and the admin API without Kafka or
Redis: the apps run under httpx's ASGI transport (no lifespan, so nothing
connects), the breaker collector reads breakers driven by hand, and the
listeners bind loopback ports of their own."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from starlette.responses import JSONResponse

from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.http_metrics import (
    HttpMetrics,
    HttpMetricsMiddleware,
    RedisBreakersCollector,
)
from gateway.redis_breaker import register_breaker

pytestmark = pytest.mark.timeout(30)

INFER = "/v2/models/{model_name}/infer"


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def _requests(registry: CollectorRegistry, **labels: str) -> float:
    return _value(registry, "modelgate_http_requests_total", **labels)


def _observed(registry: CollectorRegistry, route: str, method: str) -> float:
    return _value(
        registry,
        "modelgate_http_request_duration_seconds_count",
        route=route,
        method=method,
    )


def _client(app: Any) -> httpx.AsyncClient:
    # Unhandled faults are answered by the app (its 500 handler), then
    # re-raised by starlette for the server's log; the client sees the 500.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://t")


@pytest.fixture
def frontdoor() -> FastAPI:
    from gateway.frontdoor.app import create_app
    from gateway.models import ModelSignature, TensorSpec

    app = create_app(load_settings())
    # As a started front door, which has read its models' signatures: a model
    # it does not serve is then 404 UNKNOWN_MODEL (before, 503 NOT_READY).
    app.state.frontdoor.signatures = {
        "digits": ModelSignature(
            name="digits",
            version="2",
            inputs=(TensorSpec("pixels", "FP32", (-1, 64), 0.0, 16.0),),
            outputs=(TensorSpec("label", "INT64", (-1,)),),
            classes=tuple(range(10)),
        )
    }

    async def boom() -> None:
        raise RuntimeError("a fault the handlers do not know")

    app.add_api_route("/test/boom", boom)
    return app


async def test_frontdoor_counts_by_route_template_status_and_code(
    frontdoor: FastAPI,
) -> None:
    registry = frontdoor.state.metrics.registry
    async with _client(frontdoor) as http:
        assert (await http.get("/v2/health/live")).status_code == 200
        # Two model names, one route template: no series per raw path.
        for name in ("nope", "other"):
            assert (await http.get(f"/v2/models/{name}")).status_code == 404
        assert (await http.get("/v3/anything")).status_code == 404
        assert (await http.delete("/v2/health/live")).status_code == 405
        assert (await http.request("BREW", "/v2/health/live")).status_code == 405
        oversize = await http.post("/v2/models/x/infer", content=b"0" * 2_000_000)
        assert oversize.status_code == 413
        assert (await http.get("/test/boom")).status_code == 500

    assert (
        _requests(
            registry, route="/v2/health/live", method="GET", status="200", code=""
        )
        == 1
    )
    assert (
        _requests(
            registry,
            route="/v2/models/{model_name}",
            method="GET",
            status="404",
            code="UNKNOWN_MODEL",
        )
        == 2
    )
    assert (
        _requests(
            registry, route="unmatched", method="GET", status="404", code="NOT_FOUND"
        )
        == 1
    )
    assert (
        _requests(
            registry,
            route="/v2/health/live",
            method="DELETE",
            status="405",
            code="METHOD_NOT_ALLOWED",
        )
        == 1
    )
    # A method outside the known set is one label value, whatever it is.
    assert (
        _requests(
            registry,
            route="/v2/health/live",
            method="OTHER",
            status="405",
            code="METHOD_NOT_ALLOWED",
        )
        == 1
    )
    # Refused by the body-size guard before routing, still under its template.
    assert (
        _requests(
            registry, route=INFER, method="POST", status="413", code="PAYLOAD_TOO_LARGE"
        )
        == 1
    )
    assert (
        _requests(
            registry, route="/test/boom", method="GET", status="500", code="INTERNAL"
        )
        == 1
    )
    assert _observed(registry, "/v2/models/{model_name}", "GET") == 2
    assert _observed(registry, INFER, "POST") == 1
    assert _value(registry, "modelgate_http_requests_in_flight") == 0
    # Not started (no lifespan): not ready, no Redis client yet, no answers due.
    assert _value(registry, "modelgate_frontdoor_ready") == 0
    assert _value(registry, "modelgate_frontdoor_replies_pending") == 0
    assert (
        registry.get_sample_value(
            "modelgate_redis_breaker_state", {"client": "frontdoor"}
        )
        is None
    )


async def test_latency_lands_in_the_right_bucket(frontdoor: FastAPI) -> None:
    registry = frontdoor.state.metrics.registry
    async with _client(frontdoor) as http:
        await http.get("/v2/health/live")

    def bucket(le: str) -> float:
        return _value(
            registry,
            "modelgate_http_request_duration_seconds_bucket",
            route="/v2/health/live",
            method="GET",
            le=le,
        )

    # In-process, a health probe takes well under 10 s and more than 0 s.
    assert bucket("10.0") == 1 and bucket("+Inf") == 1
    total = _value(
        registry,
        "modelgate_http_request_duration_seconds_sum",
        route="/v2/health/live",
        method="GET",
    )
    assert 0 < total < 10


async def test_metrics_are_not_on_the_client_facing_app(frontdoor: FastAPI) -> None:
    async with _client(frontdoor) as http:
        response = await http.get("/metrics")
    assert response.status_code == 404
    assert "modelgate_" not in response.text


async def test_two_apps_in_one_process_count_apart() -> None:
    from gateway.frontdoor.app import create_app

    first, second = create_app(load_settings()), create_app(load_settings())
    async with _client(first) as http:
        await http.get("/v2/health/live")
    labels = {"route": "/v2/health/live", "method": "GET", "status": "200", "code": ""}
    assert _requests(first.state.metrics.registry, **labels) == 1
    assert _requests(second.state.metrics.registry, **labels) == 0


async def test_unknown_or_unreadable_error_codes_are_one_label() -> None:
    metrics = HttpMetrics("test")
    bodies: dict[str, Any] = {
        "/known": {"code": "KNOWN"},
        "/new": {"code": "MINTED_BY_A_CLIENT_12345"},
        "/array": ["not", "an", "object"],
    }

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/text":
            await send({"type": "http.response.start", "status": 502, "headers": []})
            await send({"type": "http.response.body", "body": b"bad gateway"})
            return
        await JSONResponse(bodies[scope["path"]], status_code=400)(scope, receive, send)

    wrapped = HttpMetricsMiddleware(
        app,
        metrics=metrics,
        templates=lambda: ["/known", "/new", "/array", "/text"],
        codes={"KNOWN"},
    )
    async with _client(wrapped) as http:
        for path in ("/known", "/new", "/array", "/text"):
            await http.get(path)
    registry = metrics.registry
    assert _requests(registry, route="/known", method="GET", status="400", code="KNOWN")
    for path, status in (("/new", "400"), ("/array", "400"), ("/text", "502")):
        assert (
            _requests(registry, route=path, method="GET", status=status, code="OTHER")
            == 1
        ), path


async def test_admin_counts_refusals_and_faults() -> None:
    from gateway.admin.app import create_app

    app = create_app(load_settings())
    registry = app.state.metrics.registry
    async with _client(app) as http:
        assert (await http.get("/v1/nothing-here")).status_code == 404
        assert (await http.put("/v1/sessions/me")).status_code == 405
        # No lifespan ran, so the app has no stores: the route fails inside,
        # and the fault is answered (and counted) as INTERNAL.
        assert (await http.get("/v1/sessions/me")).status_code == 500
    assert (
        _requests(
            registry, route="unmatched", method="GET", status="404", code="NOT_FOUND"
        )
        == 1
    )
    assert (
        _requests(
            registry,
            route="/v1/sessions/me",
            method="PUT",
            status="405",
            code="METHOD_NOT_ALLOWED",
        )
        == 1
    )
    assert (
        _requests(
            registry,
            route="/v1/sessions/me",
            method="GET",
            status="500",
            code="INTERNAL",
        )
        == 1
    )
    # Neither Redis client exists before the lifespan: no breaker sample yet.
    assert (
        registry.get_sample_value("modelgate_redis_breaker_state", {"client": "admin"})
        is None
    )


def test_breaker_collector_follows_each_client_by_label() -> None:
    first = Redis.from_url("redis://127.0.0.1:1/0")  # never connects
    second = Redis.from_url("redis://127.0.0.1:2/0")
    breaker = register_breaker(first, 5.0, failures=1)
    register_breaker(second, 5.0, failures=1)
    clients: dict[str, Redis | None] = {"one": first, "two": second, "later": None}
    registry = CollectorRegistry()
    registry.register(
        RedisBreakersCollector({name: (lambda n=name: clients[n]) for name in clients})
    )

    def state(client: str) -> float | None:
        return registry.get_sample_value(
            "modelgate_redis_breaker_state", {"client": client}
        )

    assert (state("one"), state("two"), state("later")) == (0, 0, None)
    breaker.failed(breaker.acquire(), waited=True, operation="get", reason="test")
    assert (state("one"), state("two")) == (2, 0)
    assert (
        registry.get_sample_value(
            "modelgate_redis_breaker_opens_total", {"client": "one"}
        )
        == 1
    )
    assert (
        registry.get_sample_value("modelgate_redis_waited_out_total", {"client": "one"})
        == 1
    )
    clients["later"] = second
    assert state("later") == 0


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_listener_serves_loopback_and_refuses_a_taken_port(taken_port: int) -> None:
    metrics = HttpMetrics("frontdoor")
    assert metrics.serve("127.0.0.1", 0) == 0  # 0: none, as the worker's
    with pytest.raises(ConfigError, match=r"frontdoor\.metrics_port .* is not free"):
        metrics.serve("127.0.0.1", taken_port)
    with pytest.raises(ConfigError, match="client-facing"):
        metrics.serve("127.0.0.1", 8080, beside=8080)
    metrics.in_flight.set(3)
    port = metrics.serve("127.0.0.1", _free_port())
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "modelgate_http_requests_in_flight 3.0" in text
    finally:
        metrics.close()
    metrics.close()  # idempotent
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)


@pytest.mark.parametrize("command", ["frontdoor", "admin"])
def test_serve_commands_run_the_listener_beside_the_app(
    monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    import uvicorn
    from typer.testing import CliRunner

    from gateway.cli import app as cli

    port = _free_port()
    monkeypatch.setenv(f"MODELGATE_{command.upper()}__METRICS_PORT", str(port))
    scraped: dict[str, Any] = {}

    def run(app: Any, **kw: Any) -> None:
        # While the app "runs", its metrics answer on their own port.
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        scraped.update(status=response.status_code, text=response.text, port=kw)

    monkeypatch.setattr(uvicorn, "run", run)
    result = CliRunner().invoke(cli, [command, "serve", "--port", "18998"])
    assert result.exit_code == 0, result.output
    assert scraped["status"] == 200 and scraped["port"]["port"] == 18998
    assert "modelgate_http_requests_in_flight" in scraped["text"]
    # Closed once the app stops.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)


@pytest.mark.parametrize("command", ["frontdoor", "admin"])
def test_serve_commands_fail_clearly_on_a_taken_port(
    monkeypatch: pytest.MonkeyPatch, taken_port: int, command: str
) -> None:
    import uvicorn
    from typer.testing import CliRunner

    from gateway.cli import app as cli

    monkeypatch.setenv(f"MODELGATE_{command.upper()}__METRICS_PORT", str(taken_port))
    calls: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    result = CliRunner().invoke(cli, [command, "serve", "--port", "18998"])
    assert result.exit_code == 2, result.output
    assert f"{command}.metrics_port {taken_port} on 127.0.0.1 is not free" in (
        result.output
    )
    assert calls == []  # the app never took its public port
