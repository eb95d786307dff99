"""Prometheus metrics of the front door and the admin API on the real stack,
scraped over loopback from their own listeners: the front door as
``modelgate frontdoor serve`` runs it (a child process beside an in-process
worker), a reply timeout, its Redis breaker against a private redis-server
that this test stops and starts again, and the admin API's login refusals."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from cryptography.fernet import Fernet
from prometheus_client.parser import text_string_to_metric_families

from evaluation.process import settings_env
from gateway.config import Settings
from gateway.frontdoor.app import create_app
from gateway.frontdoor.service import reply_topic_for
from gateway.keys import format_token
from gateway.models import digits_split
from gateway.topics import delete_topics
from tests.conftest import StackInfo
from tests.integration.adminkit import FAST_HASH, admin_app
from tests.integration.frontdoor_helpers import bearer, serving, with_instance
from tests.integration.helpers import (
    REPO,
    create_key,
    fail_open_settings,
    isolated_settings,
    running_worker,
)
from tests.integration.test_adversarial import OwnRedis

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

INFER = "/v2/models/{model_name}/infer"
START_S = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _body(n: int = 1) -> dict[str, object]:
    rows = digits_split()[1][:n].astype(np.float32)
    return {
        "inputs": [
            {
                "name": "pixels",
                "shape": list(rows.shape),
                "datatype": "FP32",
                "data": rows.ravel().tolist(),
            }
        ]
    }


async def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the /metrics page on ``port``, by name and labels."""
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200, response.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float],
    name: str,
    **labels: str,
) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@contextlib.contextmanager
def _frontdoor_process(
    settings: Settings, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``modelgate frontdoor serve`` as a child on ``settings``; stopped with
    SIGTERM (as an operator would) and its reply topic removed afterwards."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "frontdoor", "serve"],
            env=settings_env(settings),
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


async def _until_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_S
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            assert proc.poll() is None, _text(log)
            with contextlib.suppress(httpx.TransportError):
                if (await http.get(url + "/v2/health/ready")).status_code == 200:
                    return
            assert time.monotonic() < deadline, _text(log)
            await _pause()


def _text(log: Path) -> str:
    return log.read_text(errors="replace")


async def _pause() -> None:
    await asyncio.sleep(0.1)


async def test_frontdoor_serve_exports_its_requests_on_its_own_port(
    settings: Settings, tmp_path: Path
) -> None:
    port, metrics_port = _free_port(), _free_port()
    section = with_instance(settings).frontdoor.model_copy(
        update={"port": port, "metrics_port": metrics_port}
    )
    settings = settings.model_copy(update={"frontdoor": section})
    token = format_token(*await create_key(settings, "metered"))
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "frontdoor.log"
    try:
        async with running_worker(settings):
            with _frontdoor_process(settings, log) as proc:
                await _until_ready(url, proc, log)
                before = await _scrape(metrics_port)
                async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                    answer = await http.post(
                        "/v2/models/digits/infer", json=_body(2), headers=bearer(token)
                    )
                    assert answer.status_code == 200, answer.text
                    # The client-facing port has no metrics.
                    assert (await http.get("/metrics")).status_code == 404
                after = await _scrape(metrics_port)
    finally:
        await delete_topics(settings, [reply_topic_for(settings)])

    ok = {"route": INFER, "method": "POST", "status": "200", "code": ""}
    assert _sample(before, "modelgate_http_requests_total", **ok) is None
    assert _sample(after, "modelgate_http_requests_total", **ok) == 1
    observed = _sample(
        after,
        "modelgate_http_request_duration_seconds_count",
        route=INFER,
        method="POST",
    )
    assert observed == 1
    round_trips = _sample(
        after, "modelgate_frontdoor_round_trip_seconds_count", outcome="answered"
    )
    assert round_trips == 1
    assert _sample(after, "modelgate_frontdoor_ready") == 1
    assert _sample(after, "modelgate_frontdoor_replies_pending") == 0
    assert _sample(after, "modelgate_redis_breaker_state", client="frontdoor") == 0
    assert f"metrics endpoint up on http://127.0.0.1:{metrics_port}/metrics" in (
        _text(log)
    )


async def test_frontdoor_breaker_metric_follows_its_redis(
    stack: StackInfo, models_dir: Path, tmp_path: Path
) -> None:
    """A private redis-server, stopped under a running front door: the first
    key check that cannot reach it opens the breaker (threshold 1 here), the
    next is refused at once; started again, the breaker closes after its
    cool-down."""
    own = OwnRedis(tmp_path, _free_port())
    own.start()
    settings = with_instance(
        fail_open_settings(
            stack,
            own.url,
            models_dir,
            redis={
                "socket_timeout_s": 1.0,
                "breaker_failures": 1,
                "breaker_cooldown_s": 1.0,
            },
            # Every request looks its key up in Redis (no cached key).
            auth={"key_cache_ttl_s": 0},
        )
    )
    token = format_token(*await create_key(settings, "breaker"))
    app = create_app(settings)
    metrics_port = app.state.metrics.serve("127.0.0.1", _free_port())

    async def breaker(name: str) -> float | None:
        return _sample(await _scrape(metrics_port), name, client="frontdoor")

    try:
        async with (
            serving(settings, app=app) as url,
            httpx.AsyncClient(base_url=url, timeout=30) as http,
        ):
            assert await breaker("modelgate_redis_breaker_state") == 0

            own.kill()
            refused = await http.post(
                "/v2/models/digits/infer", json=_body(), headers=bearer(token)
            )
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "STORE_UNAVAILABLE"
            assert await breaker("modelgate_redis_breaker_state") == 2
            assert await breaker("modelgate_redis_breaker_opens_total") == 1
            again = await http.post(
                "/v2/models/digits/infer", json=_body(), headers=bearer(token)
            )
            assert again.json()["code"] == "STORE_UNAVAILABLE"
            rejected = await breaker("modelgate_redis_breaker_rejected_total")
            assert rejected is not None and rejected >= 1
            samples = await _scrape(metrics_port)
            assert (
                _sample(
                    samples,
                    "modelgate_http_requests_total",
                    route=INFER,
                    method="POST",
                    status="503",
                    code="STORE_UNAVAILABLE",
                )
                == 2
            )

            # Back (empty: the key is gone, so the probe's answer is a 401,
            # but Redis answered and the breaker closes).
            own.start()
            deadline = time.monotonic() + 30
            while await breaker("modelgate_redis_breaker_state") != 0:
                assert time.monotonic() < deadline, await _scrape(metrics_port)
                await http.post(
                    "/v2/models/digits/infer", json=_body(), headers=bearer(token)
                )
                await _pause()
    finally:
        app.state.metrics.close()
        own.kill()


async def test_admin_metrics_count_refused_logins(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        auth={"server_key": Fernet.generate_key().decode()},
        admin=FAST_HASH,
    )
    async with admin_app(settings) as admin:
        metrics = admin.app.state.metrics
        port = metrics.serve("127.0.0.1", _free_port())
        try:
            await admin.add_user("ops", "admin")
            async with admin.client() as http:
                assert (
                    await admin.login(http, "ops", password="wrong" * 4)
                ).status_code == 401
                assert (await admin.login(http, "ops")).status_code == 201
            samples = await _scrape(port)
        finally:
            metrics.close()

    assert (
        _sample(
            samples,
            "modelgate_http_requests_total",
            route="/v1/sessions",
            method="POST",
            status="401",
            code="ADMIN_UNAUTHENTICATED",
        )
        == 1
    )
    login = "modelgate_admin_actions_total"
    assert _sample(samples, login, action="login", outcome="denied") == 1
    assert _sample(samples, login, action="login", outcome="ok") == 1
    assert _sample(samples, "modelgate_redis_breaker_state", client="admin") == 0


async def test_frontdoor_counts_a_reply_timeout(
    stack: StackInfo, models_dir: Path
) -> None:
    """No worker: the request goes to Kafka, no answer comes, the client gets
    504 and the round trip is observed as a timeout."""
    settings = with_instance(
        isolated_settings(
            stack.kafka_bootstrap,
            stack.redis_url,
            models_dir,
            frontdoor={"reply_timeout_s": 1.0},
        )
    )
    token = format_token(*await create_key(settings, "unanswered"))
    app = create_app(settings)
    registry = app.state.metrics.registry
    async with (
        serving(settings, app=app) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        response = await http.post(
            "/v2/models/digits/infer", json=_body(), headers=bearer(token)
        )
    assert response.status_code == 504, response.text
    timed_out = registry.get_sample_value(
        "modelgate_frontdoor_round_trip_seconds_count", {"outcome": "timeout"}
    )
    assert timed_out == 1
    answered = registry.get_sample_value(
        "modelgate_frontdoor_round_trip_seconds_count", {"outcome": "answered"}
    )
    assert answered is None
    counted = registry.get_sample_value(
        "modelgate_http_requests_total",
        {"route": INFER, "method": "POST", "status": "504", "code": "GATEWAY_TIMEOUT"},
    )
    assert counted == 1
    assert registry.get_sample_value("modelgate_frontdoor_replies_pending") == 0
