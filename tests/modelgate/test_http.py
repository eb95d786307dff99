"""The HTTP transport against an in-memory front door (``httpx.MockTransport``):
request shape, answer parsing, error mapping and retries under one request id.

The real front door is tested end to end elsewhere; these pin down what the
client sends and how it reads each kind of answer.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from modelgate import errors
from modelgate.client import AsyncClient, Client
from modelgate.http import parse_retry_after, rate_from_headers
from modelgate.retry import RetryPolicy

TOKEN = "mgk_0123456789ab.c2VjcmV0"
FAST = RetryPolicy(max_attempts=4, base_delay_s=0.001, max_delay_s=0.002)


def ok_body(request: httpx.Request, rows: int = 1) -> dict[str, Any]:
    sent = json.loads(request.content)
    proba = np.full((rows, 10), 0.1, dtype=np.float32)
    proba[:, 3] = 0.2
    return {
        "id": sent["id"],
        "model_name": "digits",
        "model_version": "1",
        "outputs": [
            {
                "name": "probabilities",
                "shape": [rows, 10],
                "datatype": "FP32",
                "data": proba.ravel().tolist(),
            },
            {"name": "label", "shape": [rows], "datatype": "INT64", "data": [3] * rows},
        ],
        "parameters": {"action": "flag"},
    }


class FrontDoor:
    """Answers each request with the next scripted response, recording what
    it was sent."""

    def __init__(self, *script: Callable[[httpx.Request], httpx.Response]) -> None:
        self.script = list(script)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.script[min(len(self.requests), len(self.script)) - 1]
        return step(request)

    @property
    def ids(self) -> list[str]:
        return [json.loads(r.content)["id"] for r in self.requests]

    def client(self, **options: Any) -> AsyncClient:
        options.setdefault("retry", FAST)
        return AsyncClient.http(
            "http://frontdoor.test",
            TOKEN,
            http_transport=httpx.MockTransport(self),
            **options,
        )


def ok(rows: int = 1, headers: dict[str, str] | None = None) -> Any:
    return lambda r: httpx.Response(200, json=ok_body(r, rows), headers=headers)


def fail(
    status: int, code: str | None = None, retriable: bool | None = None, **headers: str
) -> Any:
    def respond(request: httpx.Request) -> httpx.Response:
        if code is None:
            return httpx.Response(status, text="<html>bad gateway</html>")
        body: dict[str, Any] = {"error": f"{code} says the test", "code": code}
        if retriable is not None:
            body["retriable"] = retriable
        return httpx.Response(
            status,
            json=body,
            headers={k.replace("_", "-"): v for k, v in headers.items()},
        )

    return respond


def raise_(exc: Exception) -> Any:
    def respond(request: httpx.Request) -> httpx.Response:
        raise exc

    return respond


async def test_request_follows_oip_v2_with_the_bearer_token() -> None:
    door = FrontDoor(ok(rows=2))
    x = np.arange(128, dtype=np.float64).reshape(2, 64)
    async with door.client() as client:
        result = await client.infer("digits", x)
    (request,) = door.requests
    assert request.method == "POST"
    assert request.url.path == "/v2/models/digits/infer"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    body = json.loads(request.content)
    assert set(body) == {"id", "inputs"}
    assert body["inputs"] == [
        {
            "name": "pixels",
            "shape": [2, 64],
            "datatype": "FP32",
            "data": x.ravel().tolist(),
        }
    ]
    assert result.request_id == body["id"]
    assert result.model == "digits" and result.model_version == "1"
    assert result.action == "flag" and result.attempts == 1
    assert result["probabilities"].dtype == np.float32
    assert result["probabilities"].shape == (2, 10)
    np.testing.assert_array_equal(result["label"], [3, 3])


async def test_predict_gives_one_row_for_one_row_and_a_batch_for_a_batch() -> None:
    async with FrontDoor(ok(rows=1)).client() as client:
        one = await client.predict("digits", np.zeros(64))
    async with FrontDoor(ok(rows=3)).client() as client:
        many = await client.predict("digits", np.zeros((3, 64)))
        labels = await client.predict("digits", np.zeros((3, 64)), output="label")
    assert one.shape == (10,) and many.shape == (3, 10)
    assert labels.dtype == np.int64 and labels.shape == (3,)


async def test_rate_headers_become_rate_info() -> None:
    headers = {
        "RateLimit-Policy": '"default";q=50;w=1',
        "RateLimit": '"default";r=7;t=0.5',
    }
    async with FrontDoor(ok(headers=headers)).client() as client:
        result = await client.infer("digits", np.zeros((1, 64)))
    assert result.rate is not None
    assert (result.rate.limit, result.rate.remaining) == (50, 7)
    assert (result.rate.reset_s, result.rate.window_s) == (0.5, 1.0)


@pytest.mark.parametrize(
    ("first", "kind"),
    [
        (fail(429, "RATE_LIMITED", True, Retry_After="0"), errors.RateLimitedError),
        (fail(429), errors.RateLimitedError),
        (fail(502), errors.UnknownGatewayError),
        (fail(503, "BACKEND_UNAVAILABLE", True), errors.BackendUnavailableError),
        (fail(504, "GATEWAY_TIMEOUT", True), errors.GatewayTimeoutError),
        (raise_(httpx.ConnectError("refused")), errors.ConnectionFailedError),
        (raise_(httpx.ReadTimeout("slow")), errors.RequestTimeoutError),
    ],
)
async def test_retriable_failures_are_retried_under_the_same_request_id(
    first: Any, kind: type[errors.GatewayError]
) -> None:
    door = FrontDoor(first, first, ok())
    async with door.client() as client:
        result = await client.infer("digits", np.zeros((1, 64)))
        # A second call is a new request with a new id.
        door.script = [ok()]
        other = await client.infer("digits", np.zeros((1, 64)))
    assert result.attempts == 3
    assert len(set(door.ids[:3])) == 1 and door.ids[0] == result.request_id
    assert door.ids[3] == other.request_id != result.request_id

    # Without retries, the same failure surfaces as its class.
    door = FrontDoor(first)
    async with door.client(retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(kind) as caught:
            await client.infer("digits", np.zeros((1, 64)), request_id="mine")
    assert caught.value.retriable is True
    assert caught.value.request_id == "mine"


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (401, "AUTH_REVOKED", errors.RevokedKeyError),
        (401, "AUTH_UNKNOWN_KEY", errors.UnknownKeyError),
        (403, "AUTH_MODEL_FORBIDDEN", errors.ModelForbiddenError),
        (404, "UNKNOWN_MODEL", errors.UnknownModelError),
        (400, "SHAPE_MISMATCH", errors.ShapeMismatchError),
        (413, "PAYLOAD_TOO_LARGE", errors.PayloadTooLargeError),
        (409, "DUPLICATE_REQUEST", errors.DuplicateRequestError),
        (500, "INTERNAL", errors.InternalError),
        (418, "FROM_THE_FUTURE", errors.UnknownGatewayError),
    ],
)
async def test_final_errors_are_raised_at_once_as_their_class(
    status: int, code: str, kind: type[errors.GatewayError]
) -> None:
    door = FrontDoor(fail(status, code, False))
    async with door.client() as client:
        with pytest.raises(kind) as caught:
            await client.infer("digits", np.zeros((1, 64)))
    assert len(door.requests) == 1
    err = caught.value
    assert (err.code, err.http_status, err.retriable) == (code, status, False)
    assert err.message == f"{code} says the test"
    assert err.attempts == 1


async def test_blocked_carries_retry_after_and_is_not_waited_past_the_deadline() -> (
    None
):
    door = FrontDoor(fail(403, "BLOCKED", True, Retry_After="600"))
    async with door.client(retry=RetryPolicy(deadline_s=5)) as client:
        with pytest.raises(errors.BlockedError) as caught:
            await client.infer("digits", np.zeros((1, 64)))
    assert caught.value.retry_after_s == 600.0
    assert len(door.requests) == 1


async def test_retries_stop_after_max_attempts() -> None:
    door = FrontDoor(fail(503, "STORE_UNAVAILABLE", True))
    async with door.client() as client:
        with pytest.raises(errors.StoreUnavailableError) as caught:
            await client.infer("digits", np.zeros((1, 64)))
    assert len(door.requests) == 4 and caught.value.attempts == 4
    assert len(set(door.ids)) == 1


async def test_an_unreadable_success_is_a_bad_response() -> None:
    door = FrontDoor(lambda r: httpx.Response(200, text="not json"))
    async with door.client() as client:
        with pytest.raises(errors.BadResponseError):
            await client.infer("digits", np.zeros((1, 64)))
    door = FrontDoor(lambda r: httpx.Response(200, json={**ok_body(r), "id": "other"}))
    async with door.client() as client:
        with pytest.raises(errors.BadResponseError):
            await client.infer("digits", np.zeros((1, 64)))


async def test_a_closed_client_refuses_work() -> None:
    client = FrontDoor(ok()).client()
    await client.close()
    await client.close()  # idempotent
    with pytest.raises(errors.ClientClosedError):
        await client.infer("digits", np.zeros((1, 64)))


def test_blocking_client_runs_and_stops_its_loop_thread() -> None:
    door = FrontDoor(fail(503, "BACKEND_ERROR", True), ok(rows=2))
    before = {t.name for t in threading.enumerate()}
    with Client.http(
        "http://frontdoor.test",
        TOKEN,
        http_transport=httpx.MockTransport(door),
        retry=FAST,
    ) as client:
        assert "modelgate-client" in {t.name for t in threading.enumerate()}
        proba = client.predict("digits", np.zeros((2, 64)))
        result = client.infer("digits", np.zeros((2, 64)))
    assert proba.shape == (2, 10) and result.attempts == 1
    assert door.ids[0] == door.ids[1] != door.ids[2]
    assert {t.name for t in threading.enumerate()} == before
    with pytest.raises(errors.ClientClosedError):
        client.predict("digits", np.zeros((2, 64)))
    client.close()  # idempotent


def test_retry_after_and_rate_header_parsing() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("-1") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("Fri, 04 Dec 2026 18:00:10 GMT", now_s=1796407200.0) == 10
    assert rate_from_headers({}) is None
    old_style = {
        "X-RateLimit-Limit": "10",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "2",
    }
    rate = rate_from_headers(old_style)
    assert rate is not None and (rate.limit, rate.remaining, rate.reset_s) == (10, 0, 2)
    assert rate.window_s is None


async def test_connect_picks_the_transport_by_name() -> None:
    door = FrontDoor(ok())
    client = AsyncClient.connect(
        "http",
        url="http://frontdoor.test",
        token=TOKEN,
        http_transport=httpx.MockTransport(door),
    )
    async with client:
        await client.infer("digits", np.zeros((1, 64)))
    assert len(door.requests) == 1
    with pytest.raises(ValueError):
        AsyncClient.connect("grpc")  # type: ignore[arg-type]  # the point
    with pytest.raises(ValueError):
        Client.kafka(TOKEN, "c", transport=object())


async def test_cancelling_a_call_cancels_it_without_retrying() -> None:
    started = asyncio.Event()
    calls = 0

    async def hang(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.sleep(60)
        return httpx.Response(200, json=ok_body(request))

    client = AsyncClient.http(
        "http://frontdoor.test", TOKEN, http_transport=httpx.MockTransport(hang)
    )
    async with client:
        task = asyncio.create_task(client.infer("digits", np.zeros((1, 64))))
        await asyncio.wait_for(started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert calls == 1


# Run in a child process: a real SIGINT sent to pytest's own process could land
# outside the call under test (a loaded machine delays the moment), and a
# KeyboardInterrupt inside pytest's failure reporting ends the whole test run.
_INTERRUPTED_CALLER = """
import asyncio, sys, threading
import httpx, numpy as np
from modelgate.client import Client

started, cancelled = threading.Event(), threading.Event()

async def hang(request):
    started.set()
    print("started", flush=True)
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        cancelled.set()
        raise
    return httpx.Response(500)

client = Client.http(
    "http://frontdoor.test", sys.argv[1], http_transport=httpx.MockTransport(hang)
)
try:
    client.predict("digits", np.zeros((1, 64)))
except KeyboardInterrupt:
    print("interrupted", flush=True)
    print("cancelled" if cancelled.wait(10) else "still running", flush=True)
else:
    print("returned", flush=True)
client.close()
"""


def test_interrupting_a_blocking_call_cancels_it_on_the_loop() -> None:
    # A KeyboardInterrupt (Ctrl-C: a real SIGINT) while the caller waits must
    # not leave the request running on the background loop.
    child = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED_CALLER, TOKEN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "started"
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert out.split() == ["interrupted", "cancelled"], (out, err)
    assert child.returncode == 0, err
