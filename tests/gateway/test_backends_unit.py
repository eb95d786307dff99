"""Pure logic of the model backends: the circuit breaker, the signature merge,
the OIP client's retry rules (over httpx's in-memory transport) and the
backend settings. The same paths against real servers are in
tests/integration/test_backends.py."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.backends.breaker import CircuitBreaker
from gateway.backends.oip import OipBackend, merge_signature
from gateway.config import BackendConfig, load_settings
from gateway.errors import (
    ERROR_CODES,
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
)
from gateway.models import ModelSignature, TensorSpec

SIGNATURE = ModelSignature(
    name="m",
    version="1",
    inputs=(TensorSpec("x", "FP32", (-1, 3), 0.0, 1.0),),
    outputs=(TensorSpec("probabilities", "FP32", (-1, 2)),),
    classes=(0, 1),
)
METADATA: dict[str, Any] = {
    "name": "m",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
    "outputs": [{"name": "predict_proba", "datatype": "FP64", "shape": [-1, 2]}],
}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- circuit breaker -------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_only() -> None:
    seen: list[str] = []
    breaker = CircuitBreaker("m", 3, 5.0, clock=Clock(), on_change=seen.append)
    for _ in range(2):
        breaker.acquire()
        breaker.record_failure()
    breaker.acquire()
    breaker.record_success()  # resets the run of failures
    for _ in range(2):
        breaker.acquire()
        breaker.record_failure()
    assert breaker.state == "closed"
    breaker.acquire()
    breaker.record_failure()
    assert breaker.state == "open"
    assert seen == ["open"]
    with pytest.raises(BackendUnavailableError) as info:
        breaker.acquire()
    assert info.value.code == "BACKEND_UNAVAILABLE"
    assert info.value.retriable


def test_breaker_half_open_lets_one_probe_through() -> None:
    clock = Clock()
    breaker = CircuitBreaker("m", 1, 5.0, clock=clock)
    breaker.acquire()
    breaker.record_failure()
    clock.now += 4.9
    with pytest.raises(BackendUnavailableError):
        breaker.acquire()
    clock.now += 0.2
    breaker.acquire()  # the probe
    assert breaker.state == "half_open"
    with pytest.raises(BackendUnavailableError, match="probe is in flight"):
        breaker.acquire()
    breaker.record_failure()  # probe failed: open for another cool-down
    assert breaker.state == "open"
    with pytest.raises(BackendUnavailableError):
        breaker.acquire()
    clock.now += 5.1
    breaker.acquire()
    breaker.record_success()
    assert breaker.state == "closed"
    breaker.acquire()  # closed again: no refusal


# -- signature merge ---------------------------------------------------------------


def test_merge_takes_remote_declaration_and_local_ranges() -> None:
    merged = merge_signature(SIGNATURE, METADATA, output="predict_proba")
    assert merged.inputs == (TensorSpec("x", "FP32", (-1, 3), 0.0, 1.0),)
    assert merged.classes == SIGNATURE.classes


def test_metadata_without_inputs_keeps_the_local_signature() -> None:
    assert merge_signature(SIGNATURE, {"name": "m"}, output="p") == SIGNATURE


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"inputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]}, "inputs"),
        ({"inputs": [{"name": "x", "datatype": "FP64", "shape": [-1, 3]}]}, "FP64"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]}, "shape"),
        ({"inputs": [{"name": "x"}]}, "unreadable"),
        ({"outputs": [{"name": "predict", "shape": [-1]}]}, "no output"),
        ({"outputs": [{"name": "predict_proba", "shape": [-1, 3]}]}, "3 classes"),
    ],
)
def test_merge_mismatch_is_a_config_error(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        merge_signature(SIGNATURE, {**METADATA, **change}, output="predict_proba")


# -- OIP client: retries, timeouts, breaker ------------------------------------------


class Script:
    """An httpx transport answering inference calls from a list of outcomes:
    an int status, an exception to raise, or "ok"."""

    def __init__(self, outcomes: list[Any]) -> None:
        self.outcomes = outcomes
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if isinstance(outcome, Exception):
            raise outcome
        if outcome != "ok":
            return httpx.Response(outcome, text="nope")
        body = json.loads(request.content)
        n = body["inputs"][0]["shape"][0]
        data = [0.25, 0.75] * n
        return httpx.Response(
            200,
            json={
                "outputs": [{"name": "predict_proba", "shape": [n, 2], "data": data}]
            },
        )


def backend(script: Script, **config: Any) -> OipBackend:
    settings = BackendConfig(
        kind="oip",
        url="http://127.0.0.1:9",
        retry_backoff_s=0.0,
        **config,
    )
    return OipBackend(
        "m",
        settings,
        SIGNATURE,
        np.zeros((1, 3), np.float32),
        transport=httpx.MockTransport(script),
    )


ROWS = np.zeros((2, 3), np.float32)


def test_connect_errors_are_retried_then_unavailable() -> None:
    refused = httpx.ConnectError("refused")
    script = Script([refused, refused, "ok"])
    proba = backend(script, retries=2).predict_proba(ROWS)
    assert proba.dtype == np.float32 and proba.shape == (2, 2)
    assert script.calls == 3

    script = Script([refused] * 5)
    with pytest.raises(BackendUnavailableError):
        backend(script, retries=2).predict_proba(ROWS)
    assert script.calls == 3


def test_503_is_retried_but_500_is_not() -> None:
    script = Script([503, "ok"])
    backend(script, retries=1).predict_proba(ROWS)
    assert script.calls == 2

    script = Script([500, "ok"])
    with pytest.raises(BackendError) as info:
        backend(script, retries=3).predict_proba(ROWS)
    assert info.value.code == "BACKEND_ERROR"
    assert script.calls == 1


def test_read_timeout_is_not_retried() -> None:
    script = Script([httpx.ReadTimeout("slow"), "ok"])
    with pytest.raises(BackendTimeoutError) as info:
        backend(script, retries=3).predict_proba(ROWS)
    assert info.value.code == "BACKEND_TIMEOUT"
    assert script.calls == 1


def test_breaker_counts_server_failures_not_client_errors() -> None:
    script = Script([400, 400, 400, 500, 500])
    model = backend(script, retries=0, breaker_failures=2)
    for _ in range(3):
        with pytest.raises(BackendError):
            model.predict_proba(ROWS)
    assert model.breaker.state == "closed"  # 400: the server is alive
    for _ in range(2):
        with pytest.raises(BackendError):
            model.predict_proba(ROWS)
    assert model.breaker.state == "open"
    with pytest.raises(BackendUnavailableError):
        model.predict_proba(ROWS)
    assert script.calls == 5  # the open breaker did not call the server


def test_malformed_answer_is_a_backend_error() -> None:
    def wrong_rows(request: httpx.Request) -> httpx.Response:
        out = {"name": "predict_proba", "shape": [1, 2], "data": [0.5, 0.5]}
        return httpx.Response(200, json={"outputs": [out]})

    model = OipBackend(
        "m",
        BackendConfig(kind="oip", url="http://127.0.0.1:9"),
        SIGNATURE,
        np.zeros((1, 3), np.float32),
        transport=httpx.MockTransport(wrong_rows),
    )
    with pytest.raises(BackendError, match="2 rows of 2"):
        model.predict_proba(ROWS)


# -- OIP client: batch size, deadline, size cap ------------------------------------


def clocked(handler: Any, clock: Clock, **config: Any) -> OipBackend:
    settings = BackendConfig(kind="oip", url="http://127.0.0.1:9", **config)
    return OipBackend(
        "m",
        settings,
        SIGNATURE,
        np.zeros((1, 3), np.float32),
        clock=clock,
        transport=httpx.MockTransport(handler),
    )


def test_a_batch_goes_in_calls_of_at_most_max_batch_rows_in_order() -> None:
    sizes: list[int] = []

    def echo_first_feature(request: httpx.Request) -> httpx.Response:
        tensor = json.loads(request.content)["inputs"][0]
        rows = np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])
        sizes.append(len(rows))
        data = np.stack([rows[:, 0], 1 - rows[:, 0]], axis=1).reshape(-1).tolist()
        out = {"name": "predict_proba", "shape": [len(rows), 2], "data": data}
        return httpx.Response(200, json={"outputs": [out]})

    rows = np.zeros((5, 3), np.float32)
    rows[:, 0] = [0.1, 0.2, 0.3, 0.4, 0.5]
    proba = clocked(echo_first_feature, Clock(), max_batch_rows=2).predict_proba(rows)
    assert sizes == [2, 2, 1]
    np.testing.assert_allclose(proba[:, 0], rows[:, 0])
    assert clocked(echo_first_feature, Clock()).predict_proba(rows).shape == (5, 2)
    assert sizes == [2, 2, 1, 5]  # the default (1,024) sends five rows at once
    empty = clocked(echo_first_feature, Clock()).predict_proba(rows[:0])
    assert empty.shape == (0, 2) and sizes == [2, 2, 1, 5]  # no call at all


class Trickle(httpx.SyncByteStream):
    """A body arriving in small pieces, each one second later on ``clock``."""

    def __init__(self, body: bytes, clock: Clock) -> None:
        self.body = body
        self.clock = clock

    def __iter__(self) -> Any:
        for start in range(0, len(self.body), 8):
            self.clock.now += 1.0
            yield self.body[start : start + 8]


def test_an_answer_trickling_past_the_call_deadline_times_out() -> None:
    clock = Clock()
    out = {"name": "predict_proba", "shape": [2, 2], "data": [0.5] * 4}
    body = json.dumps({"outputs": [out]}).encode()

    def trickle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Trickle(body, clock))

    model = clocked(trickle, clock, call_timeout_s=5.0, breaker_failures=1)
    with pytest.raises(BackendTimeoutError, match=r"call_timeout_s 5\.0"):
        model.predict_proba(ROWS)
    # Cut off at the first piece past the deadline, not at the body's end.
    assert 5.0 < clock.now - 100.0 <= 6.0 < len(body) / 8
    assert model.breaker.state == "open"
    # The same body in time is an answer.
    clock = Clock()
    patient = clocked(trickle, clock, call_timeout_s=len(body))
    assert patient.predict_proba(ROWS).shape == (2, 2)


def test_a_later_chunk_gets_only_the_time_left() -> None:
    clock = Clock()
    calls: list[float] = []

    def slow(request: httpx.Request) -> httpx.Response:
        calls.append(clock.now)
        clock.now += 2.0  # each call takes two seconds
        tensor = json.loads(request.content)["inputs"][0]
        n = tensor["shape"][0]
        out = {"name": "predict_proba", "shape": [n, 2], "data": [0.5] * (2 * n)}
        return httpx.Response(200, json={"outputs": [out]})

    model = clocked(slow, clock, max_batch_rows=1, call_timeout_s=3.0)
    with pytest.raises(BackendTimeoutError, match=r"call_timeout_s 3\.0"):
        model.predict_proba(np.zeros((4, 3), np.float32))
    assert calls == [100.0, 102.0]  # the third call was never started


def test_no_back_off_outlasts_the_deadline() -> None:
    script = Script([503] * 5)
    clock = Clock()
    model = OipBackend(
        "m",
        BackendConfig(
            kind="oip",
            url="http://127.0.0.1:9",
            retries=5,
            retry_backoff_s=2.0,
            call_timeout_s=1.0,
        ),
        SIGNATURE,
        np.zeros((1, 3), np.float32),
        clock=clock,
        transport=httpx.MockTransport(script),
    )
    with pytest.raises(BackendUnavailableError, match="HTTP 503"):
        model.predict_proba(ROWS)
    assert script.calls == 1  # a 2 s back-off would end past the 1 s deadline


def test_an_oversized_answer_is_refused_before_it_is_buffered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    pieces_read: list[int] = []

    class Endless(httpx.SyncByteStream):
        def __iter__(self) -> Any:
            while True:
                pieces_read.append(1)
                yield b"x" * 1024

    def endless(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Endless())

    monkeypatch.setattr("gateway.backends.oip._MAX_RESPONSE_BYTES", 10 * 1024)
    with pytest.raises(BackendError, match="too large"):
        clocked(endless, clock).predict_proba(ROWS)
    assert len(pieces_read) == 11

    def declared(request: httpx.Request) -> httpx.Response:
        headers = {"content-length": str(64 * 1024 * 1024)}
        return httpx.Response(200, headers=headers, stream=Endless())

    pieces_read.clear()
    with pytest.raises(BackendError, match="declared"):
        clocked(declared, clock).predict_proba(ROWS)
    assert pieces_read == []


# -- settings and codes ----------------------------------------------------------------


def test_backend_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="needs a url"):
        load_settings(models={"backends": {"digits": {"kind": "oip"}}})
    with pytest.raises(ConfigError, match="not served"):
        load_settings(models={"backends": {"other": {"kind": "onnx"}}})
    with pytest.raises(ConfigError, match="url"):
        load_settings(
            models={"backends": {"digits": {"kind": "oip", "url": "file:///etc"}}}
        )
    assert load_settings().models.backends == {}


def test_backend_codes_are_listed() -> None:
    assert BackendTimeoutError("x").code in ERROR_CODES
    assert BackendUnavailableError("x").code in ERROR_CODES
    assert isinstance(BackendTimeoutError("x"), BackendError)
