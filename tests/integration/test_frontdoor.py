"""The HTTP front door against the real Kafka, Redis and a real worker.

Each test runs uvicorn on a free loopback port and talks to it with httpx, so
the socket, the lifespan and the body-size guard are all the real ones.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.config import FrontDoorConfig, Settings
from gateway.frontdoor.service import FrontDoor, reply_topic_for
from gateway.keys import KeyStore, format_token
from gateway.models import digits_split, load_model
from gateway.store import redis_from_settings
from gateway.topics import delete_topics, partitions_of
from tests.conftest import StackInfo
from tests.integration.frontdoor_helpers import (
    bearer,
    serving,
    throttled_settings,
    with_instance,
)
from tests.integration.helpers import (
    create_key,
    isolated_settings,
    read_topic,
    running_worker,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

INFER = "/v2/models/digits/infer"


def _rows(n: int, start: int = 0) -> np.ndarray:
    _, x_test, _, _ = digits_split()
    return x_test[start : start + n].astype(np.float32)


def _body(rows: np.ndarray, *, nested: bool = False, rid: str | None = None) -> dict:
    data: Any = rows.tolist() if nested else rows.ravel().tolist()
    body: dict[str, Any] = {
        "inputs": [
            {
                "name": "pixels",
                "shape": list(rows.shape),
                "datatype": "FP32",
                "data": data,
            }
        ]
    }
    if rid is not None:
        body["id"] = rid
    return body


async def _token(settings: Settings, client_id: str = "alice", **kw: Any) -> str:
    key_id, secret = await create_key(settings, client_id, **kw)
    return format_token(key_id, secret)


async def _requests_produced(settings: Settings) -> list[dict[str, Any]]:
    return await read_topic(settings, settings.kafka.topics.requests, timeout_s=2.0)


def _assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "code", "retriable"}, body
    assert body["code"] == code, body
    return dict(body)


async def test_health_and_metadata(settings: Settings) -> None:
    settings = with_instance(settings)
    async with serving(settings) as url, httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/v2/health/live")).json() == {"live": True}
        ready = await http.get("/v2/health/ready")
        assert ready.status_code == 200 and ready.json() == {"ready": True}
        server = (await http.get("/v2")).json()
        assert server["name"] == "modelgate" and server["extensions"] == []

        meta = (await http.get("/v2/models/digits")).json()
        assert meta["name"] == "digits"
        assert meta["inputs"] == [
            {"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}
        ]
        assert {o["name"] for o in meta["outputs"]} == {"probabilities", "label"}
        version = meta["versions"][0]
        assert (await http.get(f"/v2/models/digits/versions/{version}")).json() == meta
        assert (await http.get("/v2/models/digits/ready")).json() == {"ready": True}
        versioned = await http.get(f"/v2/models/digits/versions/{version}/ready")
        assert versioned.status_code == 200

        _assert_error(await http.get("/v2/models/nope"), 404, "UNKNOWN_MODEL")
        _assert_error(await http.get("/v2/models/nope/ready"), 404, "UNKNOWN_MODEL")
        _assert_error(
            await http.get("/v2/models/digits/versions/999"), 404, "UNKNOWN_MODEL"
        )
        _assert_error(await http.get("/v3"), 404, "NOT_FOUND")
        spec = (await http.get("/openapi.json")).json()
        assert "/v2/models/{model_name}/infer" in spec["paths"]


async def test_infer_returns_exactly_the_models_probabilities(
    settings: Settings, models_dir: Path
) -> None:
    settings = with_instance(settings)
    token = await _token(settings)
    rows = _rows(5)
    expected = load_model(models_dir, "digits").predict_proba(rows)
    async with (
        running_worker(settings),
        serving(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        flat = await http.post(
            INFER, json=_body(rows, rid="r-flat"), headers=bearer(token)
        )
        nested = await http.post(
            INFER,
            json=_body(rows, nested=True),
            headers={"X-API-Key": token},
        )
        again = await http.post(
            INFER, json=_body(rows, rid="r-flat"), headers=bearer(token)
        )
        reused = await http.post(
            INFER, json=_body(rows[:2], rid="r-flat"), headers=bearer(token)
        )
        only_label = await http.post(
            INFER,
            json={**_body(rows[:1]), "outputs": [{"name": "label"}]},
            headers=bearer(token),
        )
        # FP64 for the FP32 model is rounded to FP32, as MLServer does.
        fp64_body = _body(rows)
        fp64_body["inputs"][0]["datatype"] = "FP64"
        fp64 = await http.post(INFER, json=fp64_body, headers=bearer(token))

    assert flat.status_code == 200, flat.text
    body = flat.json()
    assert body["id"] == "r-flat"
    assert body["model_name"] == "digits" and body["parameters"] == {"action": "allow"}
    outputs = {o["name"]: o for o in body["outputs"]}
    proba = outputs["probabilities"]
    assert proba["shape"] == [5, 10] and proba["datatype"] == "FP32"
    got = np.asarray(proba["data"], dtype=np.float32).reshape(proba["shape"])
    np.testing.assert_array_equal(got, expected)
    assert outputs["label"]["data"] == expected.argmax(axis=1).tolist()
    assert flat.headers["RateLimit-Policy"].startswith('"burst";q=')

    assert nested.status_code == 200, nested.text
    assert nested.json()["id"]  # generated when absent
    nested_out = {o["name"]: o for o in nested.json()["outputs"]}
    np.testing.assert_array_equal(
        np.asarray(nested_out["probabilities"]["data"], dtype=np.float32).reshape(
            5, 10
        ),
        expected,
    )
    assert [o["name"] for o in only_label.json()["outputs"]] == ["label"]
    assert fp64.status_code == 200, fp64.text
    assert fp64.json()["outputs"] == body["outputs"]
    # The same id and body again, after it was served, is a retry: the kept
    # answer, marked as such; the same id for other rows is a duplicate.
    assert again.status_code == 200, again.text
    assert again.json()["parameters"] == {"action": "allow", "replayed": True}
    assert again.json()["outputs"] == body["outputs"]
    _assert_error(reused, 409, "DUPLICATE_REQUEST")


async def test_bad_keys_are_refused_before_kafka(settings: Settings) -> None:
    settings = with_instance(settings)
    token = await _token(settings)
    key_id, _ = KeyStore.parse_token(token)
    wrong_secret = format_token(key_id, b"x" * 32)
    unknown = format_token("mgk_" + "0" * 12, b"y" * 32)
    scoped = await _token(settings, "bob", models=["other"])
    revoked = await _token(settings, "carol")
    expiring = await _token(settings, "dave", ttl_s=0.2)
    expired_from = time.monotonic() + 0.2
    redis = redis_from_settings(settings)
    try:
        await KeyStore(redis, settings).revoke(KeyStore.parse_token(revoked)[0])
    finally:
        await redis.aclose()

    body = _body(_rows(1))
    async with serving(settings) as url, httpx.AsyncClient(base_url=url) as http:
        _assert_error(await http.post(INFER, json=body), 401, "AUTH_MISSING")
        # The key before the body: a stranger learns nothing of the schema.
        not_oip = {"inputs": [{"name": "pixels"}]}
        _assert_error(await http.post(INFER, json=not_oip), 401, "AUTH_MISSING")
        _assert_error(
            await http.post(INFER, json=not_oip, headers=bearer(wrong_secret)),
            401,
            "AUTH_BAD_SIGNATURE",
        )
        malformed = await http.post(INFER, json=body, headers=bearer("not-a-token"))
        _assert_error(malformed, 401, "AUTH_UNKNOWN_KEY")
        _assert_error(
            await http.post(INFER, json=body, headers=bearer(unknown)),
            401,
            "AUTH_UNKNOWN_KEY",
        )
        _assert_error(
            await http.post(INFER, json=body, headers=bearer(wrong_secret)),
            401,
            "AUTH_BAD_SIGNATURE",
        )
        # A malformed secret: a known key id says so, as a wrong secret
        # does; an unknown one is unknown, as the worker would answer.
        known_garbled = await http.post(
            INFER, json=body, headers=bearer(f"{key_id}.c2hvcnQ")
        )
        garbled = _assert_error(known_garbled, 401, "AUTH_BAD_SIGNATURE")
        assert "malformed API key token" in garbled["error"], garbled
        _assert_error(
            await http.post(
                INFER, json=body, headers=bearer("mgk_" + "0" * 12 + ".c2hvcnQ")
            ),
            401,
            "AUTH_UNKNOWN_KEY",
        )
        _assert_error(
            await http.post(INFER, json=body, headers=bearer(revoked)),
            401,
            "AUTH_REVOKED",
        )
        _assert_error(
            await http.post(INFER, json=body, headers=bearer(scoped)),
            403,
            "AUTH_MODEL_FORBIDDEN",
        )
        # The key expires 0.2 s after creation. Asked before that, the front
        # door would rightly forward the request to Kafka, where no worker
        # answers in this test: wait out the key's life first.
        await asyncio.sleep(max(0.0, expired_from - time.monotonic()))
        async with asyncio.timeout(10):
            while True:
                expired = await http.post(INFER, json=body, headers=bearer(expiring))
                if expired.json()["code"] == "AUTH_EXPIRED":
                    break
                await asyncio.sleep(0.1)
        _assert_error(expired, 401, "AUTH_EXPIRED")

    assert await _requests_produced(settings) == []


async def test_malformed_and_oversize_are_refused_before_kafka(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = with_instance(
        isolated_settings(
            stack.kafka_bootstrap,
            stack.redis_url,
            models_dir,
            frontdoor={"max_body_bytes": 4096},
        )
    )
    token = await _token(settings)
    headers = {**bearer(token), "Content-Type": "application/json"}
    rows = _rows(1)
    async with serving(settings) as url, httpx.AsyncClient(base_url=url) as http:
        _assert_error(
            await http.post(INFER, content=b'{"inputs": [', headers=headers),
            400,
            "MALFORMED_JSON",
        )
        _assert_error(
            await http.post(INFER, json={"inputs": []}, headers=headers),
            400,
            "SCHEMA_INVALID",
        )
        _assert_error(
            await http.post(
                INFER, json={"inputs": [{"name": "pixels"}]}, headers=headers
            ),
            400,
            "SCHEMA_INVALID",
        )
        bad_shape = _body(rows)
        bad_shape["inputs"][0]["shape"] = [2, 64]
        _assert_error(
            await http.post(INFER, json=bad_shape, headers=headers),
            400,
            "SHAPE_MISMATCH",
        )
        ragged = _body(rows, nested=True)
        ragged["inputs"][0]["data"][0] = ragged["inputs"][0]["data"][0][:-1]
        _assert_error(
            await http.post(INFER, json=ragged, headers=headers), 400, "SHAPE_MISMATCH"
        )
        not_int = _body(rows)
        not_int["inputs"][0]["datatype"] = "INT32"
        not_int["inputs"][0]["data"][0] = 0.5
        _assert_error(
            await http.post(INFER, json=not_int, headers=headers), 400, "DTYPE_MISMATCH"
        )
        nan = (
            b'{"inputs": [{"name": "pixels", "shape": [1, 1], "datatype": "FP32",'
            b' "data": [NaN]}]}'
        )
        _assert_error(
            await http.post(INFER, content=nan, headers=headers), 400, "NON_FINITE"
        )
        _assert_error(
            await http.post("/v2/models/nope/infer", json=_body(rows), headers=headers),
            404,
            "UNKNOWN_MODEL",
        )

        big = b'{"inputs": [' + b" " * 8000 + b"]}"
        _assert_error(
            await http.post(INFER, content=big, headers=headers),
            413,
            "PAYLOAD_TOO_LARGE",
        )

        # No Content-Length: the guard counts the bytes as they arrive.
        async def chunks() -> Any:
            for _ in range(10):
                yield b" " * 1000

        chunked = await http.post(INFER, content=chunks(), headers=headers)
        _assert_error(chunked, 413, "PAYLOAD_TOO_LARGE")

    assert await _requests_produced(settings) == []


async def test_throttled_client_gets_429_with_retry_after_and_ratelimit(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = throttled_settings(stack, models_dir)
    token = await _token(settings)
    rows = _rows(1)
    async with (
        running_worker(settings),
        serving(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        first = await http.post(INFER, json=_body(rows), headers=bearer(token))
        second = await http.post(INFER, json=_body(rows), headers=bearer(token))
        third = await http.post(
            INFER, json=_body(rows, rid="r-throttled"), headers=bearer(token)
        )

        assert first.status_code == 200, first.text
        assert first.headers["RateLimit-Policy"] == '"burst";q=2;w=6'
        # One cell spent: full again one interval (3 s) after it was spent.
        assert first.headers["RateLimit"] in {f'"burst";r=1;t={t}' for t in (2, 3)}
        assert second.status_code == 200, second.text
        body = _assert_error(third, 429, "RATE_LIMITED")
        assert body["retriable"] is True
        # GCRA with a burst of 2: the third request may go one interval (3 s)
        # after the first, less the time the first two took.
        assert third.headers["Retry-After"] in {"2", "3"}
        assert third.headers["RateLimit-Policy"] == '"burst";q=2;w=6'
        # Full again 6 s (burst x interval) after the first, less time spent.
        assert third.headers["RateLimit"] in {f'"burst";r=0;t={t}' for t in (5, 6)}

        # Honouring Retry-After, the same request id is then served.
        await asyncio.sleep(int(third.headers["Retry-After"]))
        async with asyncio.timeout(10):
            while True:
                retry = await http.post(
                    INFER,
                    json=_body(rows, rid="r-throttled"),
                    headers=bearer(token),
                )
                if retry.status_code != 429:
                    break
                await asyncio.sleep(0.1)
        assert retry.status_code == 200, retry.text
        assert retry.json()["id"] == "r-throttled"


async def test_no_worker_means_504(stack: StackInfo, models_dir: Path) -> None:
    settings = with_instance(
        isolated_settings(
            stack.kafka_bootstrap,
            stack.redis_url,
            models_dir,
            frontdoor={"reply_timeout_s": 1.0},
        )
    )
    token = await _token(settings)
    async with serving(settings) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.post(INFER, json=_body(_rows(1)), headers=bearer(token))
    body = _assert_error(response, 504, "GATEWAY_TIMEOUT")
    assert body["retriable"] is True


async def test_two_front_doors_each_get_only_their_own_replies(
    settings: Settings,
) -> None:
    door_a = with_instance(settings, "t-a-" + settings.kafka.group_id[-10:])
    door_b = with_instance(settings, "t-b-" + settings.kafka.group_id[-10:])
    token = await _token(settings)
    rows = _rows(8)
    async with (
        serving(door_a) as url_a,
        serving(door_b) as url_b,
        running_worker(settings),
        httpx.AsyncClient(timeout=30) as http,
    ):

        async def send(url: str, tag: str, i: int) -> httpx.Response:
            return await http.post(
                url + INFER,
                json=_body(rows[i : i + 1], rid=f"{tag}-{i}"),
                headers=bearer(token),
            )

        answers = await asyncio.gather(
            *(send(url_a, "a", i) for i in range(8)),
            *(send(url_b, "b", i) for i in range(8)),
        )
        for response in answers:
            assert response.status_code == 200, response.text
        assert sorted(r.json()["id"] for r in answers) == sorted(
            [f"a-{i}" for i in range(8)] + [f"b-{i}" for i in range(8)]
        )
        # Each door's reply topic carries its own requests' answers only.
        on_a = await read_topic(
            door_a, reply_topic_for(door_a), until=lambda r: len(r) >= 8, timeout_s=10
        )
        on_b = await read_topic(
            door_b, reply_topic_for(door_b), until=lambda r: len(r) >= 8, timeout_s=10
        )
    assert sorted(r["request_id"] for r in on_a) == sorted(f"a-{i}" for i in range(8))
    assert sorted(r["request_id"] for r in on_b) == sorted(f"b-{i}" for i in range(8))


def test_reply_topics_are_per_instance(settings: Settings) -> None:
    a = reply_topic_for(with_instance(settings, "one"))
    b = reply_topic_for(with_instance(settings, "two"))
    assert a != b
    assert a.startswith(settings.worker.reply_topic_prefix + ".")


async def test_a_front_door_started_beside_a_busy_worker_gets_its_replies(
    settings: Settings,
) -> None:
    """The worker lists topics again at most every 2 s; a front door that
    started right after a listing still gets its first answers, because it
    is not ready until its reply topic is sure to be known."""
    first_door = with_instance(settings)
    # The configured default settle time: the point of this test.
    late = with_instance(settings, settle_s=FrontDoorConfig().reply_topic_settle_s)
    late = late.model_copy(
        update={"frontdoor": late.frontdoor.model_copy(update={"reply_timeout_s": 4.0})}
    )
    token = await _token(settings)
    body = _body(_rows(1))
    async with (
        running_worker(settings),
        serving(first_door) as url_a,
        httpx.AsyncClient(timeout=30) as http,
    ):
        # This request names a reply topic the worker does not know yet, so
        # the worker lists topics now, just before the late door starts.
        first = await http.post(url_a + INFER, json=body, headers=bearer(token))
        assert first.status_code == 200, first.text
        async with serving(late) as url_b:
            response = await http.post(url_b + INFER, json=body, headers=bearer(token))
    assert response.status_code == 200, response.text


async def _topic_exists(settings: Settings, topic: str) -> bool:
    return bool(await partitions_of(settings, topic))


async def test_a_generated_instance_removes_its_reply_topic_at_stop(
    settings: Settings,
) -> None:
    # No instance id configured: the default (host and pid) is generated.
    assert "instance_id" not in settings.frontdoor.model_fields_set
    door = FrontDoor(settings)
    assert door.owns_reply_topic
    async with door:
        assert await _topic_exists(settings, door.reply_topic)
    deadline = asyncio.get_running_loop().time() + 15
    while await _topic_exists(settings, door.reply_topic):
        assert asyncio.get_running_loop().time() < deadline, "reply topic left"
        await asyncio.sleep(0.2)

    # A configured instance id keeps its topic for the next process.
    named = with_instance(settings)
    kept = FrontDoor(named)
    assert not kept.owns_reply_topic
    try:
        async with kept:
            pass
        assert await _topic_exists(named, kept.reply_topic)
    finally:
        await delete_topics(named, [kept.reply_topic])
