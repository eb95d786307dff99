"""What the transports read from an answer beside the outputs: the degrade
level and ``replayed`` on a success, the rate window on a refusal (the front
door's headers over HTTP, ``rate`` over Kafka)."""

from __future__ import annotations

import httpx
import pytest

from gateway import protocol
from modelgate import errors
from modelgate.http import error_from_response, parse_response
from modelgate.kafka import result_of
from modelgate.results import RateInfo

_OUTPUTS = [
    {"name": "probabilities", "shape": [1, 2], "datatype": "FP32", "data": [0, 1]},
    {"name": "label", "shape": [1], "datatype": "INT64", "data": [1]},
]


def _ok(parameters: dict[str, object]) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "id": "r-1",
            "model_name": "digits",
            "model_version": "2",
            "outputs": _OUTPUTS,
            "parameters": parameters,
        },
    )


def test_http_success_reads_degrade_and_replayed() -> None:
    plain = parse_response(_ok({"action": "allow"}), "r-1", "digits")
    assert (plain.action, plain.degrade, plain.replayed) == ("allow", None, False)
    shaped = parse_response(
        _ok({"action": "degrade", "degrade": "label", "replayed": True}),
        "r-1",
        "digits",
    )
    assert (shaped.action, shaped.degrade, shaped.replayed) == (
        "degrade",
        "label",
        True,
    )
    # Anything but a non-empty string is no level.
    odd = parse_response(_ok({"action": "degrade", "degrade": 3}), "r-1", "digits")
    assert odd.degrade is None


def test_http_429_carries_the_rate_window_of_its_headers() -> None:
    response = httpx.Response(
        429,
        headers={
            "Retry-After": "3",
            "RateLimit-Policy": '"burst";q=2;w=6',
            "RateLimit": '"burst";r=0;t=5',
        },
        json={"error": "slow down", "code": "RATE_LIMITED", "retriable": True},
    )
    err = error_from_response(response, "r-1")
    assert isinstance(err, errors.RateLimitedError)
    assert err.retry_after_s == 3.0 and err.http_status == 429
    assert err.rate == RateInfo(limit=2, remaining=0, reset_s=5.0, window_s=6.0)


@pytest.mark.parametrize("code", ["NOT_READY", "BROKER_UNAVAILABLE"])
def test_http_front_door_codes_are_typed(code: str) -> None:
    response = httpx.Response(
        503, json={"error": "later", "code": code, "retriable": True}
    )
    err = error_from_response(response, "r-1")
    assert isinstance(err, errors.ServerError) and err.code == code
    assert err.retriable


def test_kafka_answers_carry_degrade_and_the_refusal_rate() -> None:
    rate = protocol.RateInfo(limit=2, remaining=0, reset_ms=5000, window_s=6.0)
    tensors = [protocol.Tensor(**t) for t in _OUTPUTS]  # type: ignore[arg-type]
    ok = protocol.InferResponse(
        v=1,
        request_id="r-1",
        status="ok",
        ts_ms=0,
        action="degrade",
        degrade="rounded",
        outputs=tensors,
    )
    assert result_of(ok, "digits").degrade == "rounded"
    refused = protocol.InferResponse(
        v=1,
        request_id="r-2",
        status="error",
        ts_ms=0,
        error=protocol.ErrorBody("RATE_LIMITED", "slow down", True),
        retry_after_ms=2500,
        rate=rate,
    )
    with pytest.raises(errors.RateLimitedError) as caught:
        result_of(refused, "digits")
    assert caught.value.retry_after_s == 2.5
    assert caught.value.rate == RateInfo(
        limit=2, remaining=0, reset_s=5.0, window_s=6.0
    )
