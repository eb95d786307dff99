"""Pure logic of the front door: the status table, rate headers, the GCRA
window numbers, and tensor conversion. No Kafka, Redis or sockets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.errors import ERROR_CODES, ValidationError
from gateway.frontdoor.errors import (
    FRONTDOOR_CODES,
    HTTP_STATUS,
    error_response,
    rate_headers,
    retry_after_s,
    status_of,
)
from gateway.frontdoor.schemas import InferInputTensor
from gateway.frontdoor.tensors import to_array
from gateway.models import TensorSpec
from gateway.protocol import RateInfo

PIXELS = TensorSpec("pixels", "FP32", (-1, 64), 0.0, 16.0)
_GOOD_TOKEN = "the-one-good-token"


def _served_app() -> Any:
    """A front door app serving digits, with a stand-in key store (one good
    token) and no Kafka: a request that passes every check meets
    ``NOT_READY`` from the stand-in round trip."""
    from gateway.config import load_settings
    from gateway.errors import AuthError, BrokerError
    from gateway.frontdoor.app import create_app
    from gateway.frontdoor.service import CheckedKey
    from gateway.keys import ApiKey
    from gateway.models import ModelSignature

    app = create_app(load_settings())
    door = app.state.frontdoor
    door.signatures = {
        "digits": ModelSignature(
            name="digits", version="2", inputs=(PIXELS,),
            outputs=(TensorSpec("label", "INT64", (-1,), None, None),),
            classes=tuple(range(10)),
        )
    }  # fmt: skip

    async def check_key(token: str | None, model: str) -> CheckedKey:
        if not token:
            raise AuthError("no API key presented", code="AUTH_MISSING")
        if token != _GOOD_TOKEN:
            raise AuthError("unknown API key", code="AUTH_UNKNOWN_KEY")
        key = ApiKey.__new__(ApiKey)  # never read by the stand-in round trip
        return CheckedKey("mgk_000000000001", b"s" * 32, key)

    async def infer(*args: object, **kwargs: object) -> None:
        raise BrokerError("stand-in: the request passed every check", code="NOT_READY")

    door.check_key = check_key
    door.infer = infer
    return app


@pytest.mark.parametrize("code", sorted({*ERROR_CODES, *FRONTDOOR_CODES}))
def test_every_error_code_has_an_http_status(code: str) -> None:
    assert code in HTTP_STATUS, f"{code} has no HTTP status"
    assert 400 <= HTTP_STATUS[code] <= 599


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("SCHEMA_INVALID", 400),
        ("MALFORMED_JSON", 400),
        ("PAYLOAD_TOO_LARGE", 413),
        ("UNKNOWN_MODEL", 404),
        ("AUTH_MISSING", 401),
        ("AUTH_BAD_SIGNATURE", 401),
        ("AUTH_MODEL_FORBIDDEN", 403),
        ("DUPLICATE_REQUEST", 409),
        ("RATE_LIMITED", 429),
        ("QUOTA_EXCEEDED", 429),
        ("TOO_MANY_IN_FLIGHT", 429),
        ("BLOCKED", 403),
        ("BACKEND_ERROR", 502),
        ("BACKEND_UNAVAILABLE", 503),
        ("STORE_UNAVAILABLE", 503),
        ("BACKEND_TIMEOUT", 504),
        ("GATEWAY_TIMEOUT", 504),
        ("INTERNAL", 500),
    ],
)
def test_contract_statuses(code: str, status: int) -> None:
    assert status_of(code) == status


def test_unmapped_code_is_500() -> None:
    assert status_of("SOMETHING_NEW") == 500


def test_blocked_carries_retry_after_and_429_carries_rate_headers() -> None:
    blocked = error_response("BLOCKED", "blocked", True, retry_after_ms=600_000)
    assert blocked.status_code == 403 and blocked.headers["Retry-After"] == "600"
    rate = RateInfo(limit=2, remaining=0, reset_ms=1500, window_s=2.0)
    limited = error_response("RATE_LIMITED", "slow", True, retry_after_ms=1, rate=rate)
    assert limited.headers["Retry-After"] == "1"
    assert limited.headers["RateLimit"] == '"burst";r=0;t=2'
    assert limited.headers["RateLimit-Policy"] == '"burst";q=2;w=2'
    # A 400 says nothing about when to retry.
    bad = error_response("SCHEMA_INVALID", "bad", False, retry_after_ms=5)
    assert "Retry-After" not in bad.headers


def test_rate_headers_round_up() -> None:
    headers = rate_headers(RateInfo(limit=100, remaining=7, reset_ms=1, window_s=2.5))
    assert headers == {
        "RateLimit-Policy": '"burst";q=100;w=3',
        "RateLimit": '"burst";r=7;t=1',
    }
    assert retry_after_s(0) == 1 and retry_after_s(1001) == 2


def _tensor(data: list, shape: list[int], datatype: str = "FP32") -> InferInputTensor:
    return InferInputTensor(name="pixels", shape=shape, datatype=datatype, data=data)


def test_flat_and_nested_data_give_the_same_array() -> None:
    rows = np.arange(128, dtype=np.float32).reshape(2, 64) / 8
    flat = to_array(_tensor(rows.ravel().tolist(), [2, 64]), PIXELS)
    nested = to_array(_tensor(rows.tolist(), [2, 64]), PIXELS)
    assert flat.dtype == np.float32 and flat.shape == (2, 64)
    np.testing.assert_array_equal(flat, rows)
    np.testing.assert_array_equal(nested, rows)


def test_integer_data_for_a_float_input_is_converted_exactly() -> None:
    array = to_array(_tensor(list(range(64)), [1, 64], "INT32"), PIXELS)
    assert array.dtype == np.float32
    fp64 = to_array(_tensor([0.1] * 64, [1, 64], "FP64"), PIXELS)
    assert fp64.dtype == np.float32  # rounded to the model's FP32
    assert fp64[0, 0] == np.float32(0.1)
    no_model = to_array(_tensor([0.1] * 64, [1, 64], "FP64"), None)
    assert no_model.dtype == np.float64  # no declared input: kept for the worker
    too_big = to_array(_tensor([2**40 + 1] * 2, [1, 2], "INT64"), PIXELS)
    assert too_big.dtype == np.int64  # not exact in float32


@pytest.mark.parametrize(
    ("data", "shape", "datatype", "code"),
    [
        ([1.0] * 63, [1, 64], "FP32", "SHAPE_MISMATCH"),
        ([[1.0] * 64, [1.0] * 63], [2, 64], "FP32", "SHAPE_MISMATCH"),
        ([[[1.0]]], [1, 1], "FP32", "SHAPE_MISMATCH"),
        ([1, 2.5], [1, 2], "INT32", "DTYPE_MISMATCH"),
        ([300], [1, 1], "INT8", "DTYPE_MISMATCH"),
        ([-1], [1, 1], "UINT8", "DTYPE_MISMATCH"),
        ([True], [1, 1], "FP32", "DTYPE_MISMATCH"),
        ([[True]], [1, 1], "FP32", "DTYPE_MISMATCH"),
        (["1"], [1, 1], "FP32", "DTYPE_MISMATCH"),
        ([float("nan")], [1, 1], "FP32", "NON_FINITE"),
        ([float("inf")], [1, 1], "FP64", "NON_FINITE"),
    ],
)
def test_inconsistent_tensors_are_refused(
    data: list, shape: list[int], datatype: str, code: str
) -> None:
    tensor = InferInputTensor.model_construct(
        name="pixels", shape=shape, datatype=datatype, data=data, parameters=None
    )
    with pytest.raises(ValidationError) as caught:
        to_array(tensor, PIXELS)
    assert caught.value.code == code


def test_the_documented_error_table_lists_every_code() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "frontdoor.md").read_text()
    for code, status in HTTP_STATUS.items():
        row = next(
            (line for line in text.splitlines() if line.startswith(f"| {status} |")),
            "",
        )
        assert f"`{code}`" in row, f"{code} missing from the {status} row of the docs"


async def test_not_ready_before_kafka_is_up() -> None:
    import httpx

    from gateway.config import load_settings
    from gateway.frontdoor.app import create_app

    # No lifespan runs under ASGITransport, so the front door never starts:
    # it is alive and says it is not ready, and inference is refused 503.
    app = create_app(load_settings())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        assert (await http.get("/v2/health/live")).json() == {"live": True}
        ready = await http.get("/v2/health/ready")
        assert ready.status_code == 503 and ready.json() == {"ready": False}
        wrong_method = await http.delete("/v2/health/live")
        assert wrong_method.status_code == 405
        assert wrong_method.json()["code"] == "METHOD_NOT_ALLOWED"


@pytest.mark.parametrize(
    ("content_type", "named"),
    [
        (None, "no Content-Type"),
        ("text/plain", "Content-Type 'text/plain'"),
        # What curl -d sends unless told otherwise.
        (
            "application/x-www-form-urlencoded",
            "Content-Type 'application/x-www-form-urlencoded'",
        ),
    ],
)
async def test_a_body_not_sent_as_json_is_told_to_use_the_json_content_type(
    content_type: str | None, named: str
) -> None:
    import json

    import httpx

    transport = httpx.ASGITransport(app=_served_app())
    body = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
                        "data": [0.0] * 64}]}  # fmt: skip
    headers = {"X-API-Key": _GOOD_TOKEN}
    if content_type is not None:
        headers["Content-Type"] = content_type
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        answer = await http.post(
            "/v2/models/digits/infer", content=json.dumps(body), headers=headers
        )
        # The same bytes as JSON pass validation (and meet the stand-in
        # round trip's NOT_READY).
        as_json = await http.post(
            "/v2/models/digits/infer",
            content=json.dumps(body),
            headers={
                "X-API-Key": _GOOD_TOKEN,
                "Content-Type": "application/json; charset=utf-8",
            },
        )
    assert answer.status_code == 400, answer.text
    assert answer.json()["code"] == "SCHEMA_INVALID", answer.text
    message = answer.json()["error"]
    assert "Content-Type: application/json" in message, message
    assert named in message, message
    assert as_json.json()["code"] == "NOT_READY", as_json.text


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "APPLICATION/JSON", "application/vnd.api+json; charset=utf-8"],
)
async def test_every_json_content_type_is_read_as_json(content_type: str) -> None:
    """``application/<x>+json`` is JSON too (docs/frontdoor.md): such a body
    passes validation and meets the stand-in round trip's NOT_READY."""
    import json

    import httpx

    transport = httpx.ASGITransport(app=_served_app())
    body = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
                        "data": [0.0] * 64}]}  # fmt: skip
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        answer = await http.post(
            "/v2/models/digits/infer",
            content=json.dumps(body),
            headers={"Content-Type": content_type, "X-API-Key": _GOOD_TOKEN},
        )
    assert answer.json()["code"] == "NOT_READY", answer.text


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"inputs": [', "application/json"),  # MALFORMED_JSON with a key
        (b'{"inputs": []}', "application/json"),  # SCHEMA_INVALID with a key
        (b'{"inputs": [{"name": "pixels"}]}', "text/plain"),  # the wrong type
        (b'{"inputs": [{"name": "pixels", "shape": [1, 2], "datatype": "FP32",'
         b' "data": [0.0]}]}', "application/json"),  # SHAPE_MISMATCH with a key
    ],
    ids=["malformed", "schema", "content-type", "shape"],
)  # fmt: skip
async def test_the_key_is_checked_before_the_body(
    content: bytes, content_type: str
) -> None:
    """An anonymous caller learns nothing about the request schema: its bad
    body is answered as a missing or unknown key. Regression: FastAPI read
    the body first, so the answer was the body's 400."""
    import httpx

    transport = httpx.ASGITransport(app=_served_app())
    headers = {"Content-Type": content_type}
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        url = "/v2/models/digits/infer"
        keyed = await http.post(
            url, content=content, headers={**headers, "X-API-Key": _GOOD_TOKEN}
        )
        anonymous = await http.post(url, content=content, headers=headers)
        unknown = await http.post(
            url,
            content=content,
            headers={**headers, "Authorization": "Bearer someone-else"},
        )
        versioned = await http.post(
            "/v2/models/digits/versions/2/infer", content=content, headers=headers
        )
        # Whether a model is served is public (its metadata needs no key).
        other_model = await http.post(
            "/v2/models/nope/infer", content=content, headers=headers
        )
    assert keyed.status_code == 400, keyed.text
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.json()["code"] == "AUTH_MISSING", anonymous.text
    assert unknown.json()["code"] == "AUTH_UNKNOWN_KEY", unknown.text
    assert versioned.json()["code"] == "AUTH_MISSING", versioned.text
    assert other_model.json()["code"] == "UNKNOWN_MODEL", other_model.text


async def test_the_body_limit_comes_before_the_key() -> None:
    import httpx

    transport = httpx.ASGITransport(app=_served_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        oversize = await http.post(
            "/v2/models/digits/infer",
            content=b"0" * 2_000_000,
            headers={"Content-Type": "application/json"},
        )
    assert oversize.status_code == 413, oversize.text
    assert oversize.json()["code"] == "PAYLOAD_TOO_LARGE"


def test_default_instance_id_validates_on_any_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os
    from types import SimpleNamespace

    from gateway.config import FrontDoorConfig

    long_name = "pod-" + "x" * 80 + ".ünïcode host"
    monkeypatch.setattr(os, "uname", lambda: SimpleNamespace(nodename=long_name))
    instance = FrontDoorConfig().instance_id
    assert instance.endswith(f"-{os.getpid()}") and len(instance) <= 40


@pytest.mark.parametrize(
    ("env", "owns"),
    [({}, True), ({"MODELGATE_FRONTDOOR__INSTANCE_ID": "slot-1"}, False)],
)
def test_serve_with_a_port_keeps_a_generated_instance_id_generated(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], owns: bool
) -> None:
    import uvicorn
    from typer.testing import CliRunner

    from gateway.frontdoor.cli import frontdoor_app

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # No metrics listener: the default port may be another process's.
    monkeypatch.setenv("MODELGATE_FRONTDOOR__METRICS_PORT", "0")
    seen: dict[str, object] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    result = CliRunner().invoke(frontdoor_app, ["serve", "--port", "18999"])
    assert result.exit_code == 0, result.output
    door = seen["app"].state.frontdoor  # type: ignore[attr-defined]
    assert seen["port"] == 18999
    # Only a generated id's reply topic is removed at stop.
    assert door.owns_reply_topic is owns


async def test_inference_before_the_front_door_starts_is_not_ready_not_unknown() -> (
    None
):
    import httpx

    from gateway.config import load_settings
    from gateway.frontdoor.app import create_app

    # Before its start has read the models' signatures the front door cannot
    # tell a served model from another: it must say "not ready" (503, retry)
    # rather than "no such model" (404, give up).
    app = create_app(load_settings())
    transport = httpx.ASGITransport(app=app)
    body = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
                        "data": [0.0] * 64}]}  # fmt: skip
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        for answer in (
            await http.post("/v2/models/digits/infer", json=body),
            await http.get("/v2/models/digits"),
            await http.get("/v2/models/digits/ready"),
        ):
            assert answer.status_code == 503, answer.text
            assert answer.json()["code"] == "NOT_READY", answer.text


async def test_a_model_not_built_yet_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from cryptography.fernet import Fernet

    from gateway.config import load_settings
    from gateway.frontdoor import service
    from gateway.models import ModelSignature

    # A front door started beside a worker's first start, in a fresh
    # directory, finds no signature until the worker has built the model; it
    # must go on trying, not give up for the life of the process.
    monkeypatch.setattr(service, "_START_RETRY_S", 0.01)
    reached_kafka = asyncio.Event()

    async def hold(*args: object, **kwargs: object) -> None:
        reached_kafka.set()
        await asyncio.Event().wait()  # no Kafka here: stop() cancels this

    monkeypatch.setattr(service, "ensure_topics", hold)
    settings = load_settings(models={"directory": tmp_path, "serve": ["digits"]})
    door = service.FrontDoor(settings, server_key=Fernet.generate_key())
    door.start_in_background()
    try:
        await asyncio.sleep(0.1)  # several attempts, each finding no file
        assert not reached_kafka.is_set() and door.signatures is None
        signature = ModelSignature(
            name="digits", version="2", inputs=(PIXELS,),
            outputs=(TensorSpec("label", "INT64", (-1,), None, None),),
            classes=tuple(range(10)),
        )  # fmt: skip
        (tmp_path / "digits.signature.json").write_text(signature.to_json())
        await asyncio.wait_for(reached_kafka.wait(), timeout=5)
        assert door.signatures is not None and set(door.signatures) == {"digits"}
    finally:
        await door.stop()


async def test_a_store_outage_shows_the_caller_no_internal_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The fresh user saw "redis keys.get_many: 127.0.0.1:26379/0: circuit
    open" in a 503 body: the caller gets the code and a generic message, the
    operator the detail in the log."""
    import httpx

    from gateway.errors import StoreError

    app = _served_app()
    internal = "redis keys.get_many: 127.0.0.1:26379/0: circuit open"

    async def check_key(token: str | None, model: str) -> object:
        raise StoreError(internal)

    app.state.frontdoor.check_key = check_key
    transport = httpx.ASGITransport(app=app)
    with caplog.at_level("WARNING", logger="gateway.frontdoor.errors"):
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            answer = await http.post(
                "/v2/models/digits/infer",
                json={"inputs": []},
                headers={"Authorization": f"Bearer {_GOOD_TOKEN}"},
            )
    assert answer.status_code == 503, answer.text
    assert answer.json() == {
        "error": "the counter store is unavailable; retry later",
        "code": "STORE_UNAVAILABLE",
        "retriable": True,
    }
    assert "127.0.0.1" not in answer.text and "get_many" not in answer.text
    logged = [r for r in caplog.records if getattr(r, "detail", None) == internal]
    assert logged and logged[0].__dict__["code"] == "STORE_UNAVAILABLE"


@pytest.mark.parametrize(
    ("x_api_key", "code"),
    [("someone-elses-token", "AUTH_AMBIGUOUS"), (_GOOD_TOKEN, "SCHEMA_INVALID")],
    ids=["different", "equal"],
)
async def test_bearer_and_x_api_key_must_agree(x_api_key: str, code: str) -> None:
    """A Bearer token and a different X-API-Key: the Bearer one was used
    silently. Equal ones name one key and pass the key check, so the empty
    body is what gets refused next."""
    import httpx

    transport = httpx.ASGITransport(app=_served_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        answer = await http.post(
            "/v2/models/digits/infer",
            json={"inputs": []},
            headers={"Authorization": f"Bearer {_GOOD_TOKEN}", "X-API-Key": x_api_key},
        )
    assert answer.json()["code"] == code, answer.text
    if code == "AUTH_AMBIGUOUS":
        assert answer.status_code == 400
        assert answer.json()["retriable"] is False


def test_an_outage_logs_the_first_refusal_then_a_summary_per_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Redis outage logged one warning per refused request. With a fake
    clock: the first line, silence within ``every_s``, then one summary with
    the count, each code on its own."""
    from gateway.frontdoor.errors import ErrorLogThrottle, public_message

    now = [100.0]
    log = ErrorLogThrottle(every_s=10.0, clock=lambda: now[0])

    def refuse(code: str, n: int) -> None:
        for i in range(n):
            public_message(code, f"down {i}", path="/p", source="frontdoor", log=log)

    with caplog.at_level("WARNING", logger="gateway.frontdoor.errors"):
        refuse("STORE_UNAVAILABLE", 50)
        refuse("BROKER_UNAVAILABLE", 3)  # its own first line, not suppressed
        now[0] += 9.9
        refuse("STORE_UNAVAILABLE", 5)
        now[0] += 0.1
        refuse("STORE_UNAVAILABLE", 2)
    lines = [
        (r.__dict__["code"], r.__dict__.get("count"), r.__dict__["detail"])
        for r in caplog.records
    ]
    assert lines == [
        ("STORE_UNAVAILABLE", None, "down 0"),
        ("BROKER_UNAVAILABLE", None, "down 0"),
        # 49 + 5 unlogged since the first line; this one is the summary.
        ("STORE_UNAVAILABLE", 54, "down 0"),
    ]


async def test_a_store_outage_under_load_is_not_logged_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Through the app: twenty refused requests, one log line."""
    import httpx

    from gateway.errors import StoreError

    app = _served_app()

    async def check_key(token: str | None, model: str) -> object:
        raise StoreError("redis keys.get_many: circuit open")

    app.state.frontdoor.check_key = check_key
    transport = httpx.ASGITransport(app=app)
    with caplog.at_level("WARNING", logger="gateway.frontdoor.errors"):
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            for _ in range(20):
                answer = await http.post(
                    "/v2/models/digits/infer",
                    json={"inputs": []},
                    headers={"X-API-Key": _GOOD_TOKEN},
                )
                assert answer.json()["code"] == "STORE_UNAVAILABLE"
    codes = [r.__dict__.get("code") for r in caplog.records]
    assert codes == ["STORE_UNAVAILABLE"], codes


async def test_health_answers_head_like_get_without_a_body() -> None:
    """Load balancers probe with HEAD; it was a 405."""
    import httpx

    from gateway.config import load_settings
    from gateway.frontdoor.app import create_app

    app = create_app(load_settings())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        for path in ("/v2/health/live", "/v2/health/ready"):
            got = await http.get(path)
            head = await http.head(path)
            # Not started under ASGITransport: ready is 503, as for GET.
            assert head.status_code == got.status_code, (path, head.status_code)
            assert head.content == b"", path
            assert head.headers["content-type"] == got.headers["content-type"]
            assert head.headers["content-length"] == str(len(got.content))


@pytest.mark.parametrize(
    "headers",
    [
        [("Authorization", f"Bearer {_GOOD_TOKEN}"), ("Authorization", "Bearer x")],
        # The same token twice is refused too: the rule is about the header.
        [("X-API-Key", _GOOD_TOKEN), ("X-API-Key", _GOOD_TOKEN)],
    ],
    ids=["authorization", "x-api-key"],
)
async def test_a_credential_header_sent_twice_is_refused(
    headers: list[tuple[str, str]],
) -> None:
    """The first Authorization was used, the second silently ignored."""
    import httpx

    transport = httpx.ASGITransport(app=_served_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        answer = await http.post(
            "/v2/models/digits/infer", json={"inputs": []}, headers=headers
        )
    assert answer.status_code == 400, answer.text
    assert answer.json()["code"] == "AUTH_AMBIGUOUS", answer.text
    assert answer.json()["retriable"] is False
