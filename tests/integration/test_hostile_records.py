"""More hostile Kafka records through a real worker: the cases
tests/integration/test_adversarial.py and test_worker.py leave out (no record
key, odd unicode in ids, impossible shapes, replayed and transplanted
signatures). Each gets its stable code, bad messages a dead letter, and the
partition keeps moving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Settings
from tests.conftest import StackInfo
from tests.integration.helpers import (
    RawKafka,
    create_key,
    read_topic,
    request_path_settings,
    running_worker,
)
from tests.integration.test_adversarial import _body, _signed, _valid

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def settings(stack: StackInfo, models_dir: Path) -> Settings:
    """The request-path settings (shadow policy, limits that never throttle)
    with one partition, so every record below shares one batch stream."""
    return request_path_settings(stack, models_dir, requests_partitions=1)


async def test_more_hostile_records_get_stable_codes(
    settings: Settings, kafka: RawKafka
) -> None:
    key_id, secret = await create_key(settings, "hal")
    topics = settings.kafka.topics
    expected: dict[str, str] = {}  # request id -> code ("" for ok)
    dead_expected: list[str] = []

    async def send(
        body: dict[str, Any], code: str, *, key: str | None = "hal", **kw: Any
    ) -> bytes:
        raw = kw.get("raw") or json.dumps(body).encode()
        headers = kw.get("headers", _signed(secret, raw))
        await kafka.producer.send_and_wait(
            topics.requests,
            raw,
            key=None if key is None else key.encode(),
            headers=headers,
        )
        expected[body["request_id"]] = code
        if code:  # every code sent here marks a bad message
            dead_expected.append(code)
        return bytes(raw)

    # No record key at all: the client's placement cannot be checked.
    await send(_body(key_id, request_id="no-key"), "AUTH_WRONG_PARTITION", key=None)
    # Unicode in ids: bidi override, NUL, astral plane, combining marks.
    for rid in ["\u202eevil", "nul\u0000id", "\U0001f600" * 30, "e\u0301"]:
        await send(_body(key_id, request_id=rid), "")
    await send(
        _body("mgk_\u00e9\u00e9\u00e9", request_id="uni-key"), "AUTH_UNKNOWN_KEY"
    )
    # Impossible shapes.
    for name, shape in {
        "neg": [-1, 64],
        "zero": [0, 64],
        "vast": [2**62, 64],
        "rank3": [1, 64, 1],
        "rank1": [64],
    }.items():
        body = _body(key_id, request_id=f"shape-{name}")
        body["inputs"][0]["shape"] = shape
        await send(body, "SHAPE_MISMATCH")
    no_inputs = _body(key_id, request_id="no-inputs")
    no_inputs["inputs"] = []
    await send(no_inputs, "TENSOR_NAME")
    two = _body(key_id, request_id="two-tensors")
    two["inputs"] = two["inputs"] * 2
    await send(two, "TENSOR_NAME")
    empty = _body(key_id, request_id="empty-data", data=[])
    await send(empty, "SHAPE_MISMATCH")
    # A captured record sent again byte for byte: the kept answer, not a new
    # query; its signature on another body: refused.
    original = _body(key_id, request_id="captured")
    raw = await send(original, "")
    await kafka.producer.send_and_wait(
        topics.requests, raw, key=b"hal", headers=_signed(secret, raw)
    )
    transplanted = _body(key_id, request_id="transplant")
    await send(transplanted, "AUTH_BAD_SIGNATURE", headers=_signed(secret, raw))
    last = await _valid(kafka, key_id, secret, "hal")

    async with running_worker(settings):
        records = await read_topic(
            settings,
            topics.responses,
            until=lambda r: (
                {x["request_id"] for x in r} >= {*expected, last}
                and sum(x["request_id"] == "captured" for x in r) >= 2
            ),
            timeout_s=30,
        )
        # Once answered, the same bytes again get the kept answer.
        await kafka.producer.send_and_wait(
            topics.requests, raw, key=b"hal", headers=_signed(secret, raw)
        )
        again = await read_topic(
            settings,
            topics.responses,
            until=lambda r: sum(x["request_id"] == "captured" for x in r) >= 3,
            timeout_s=30,
        )
        dead = await read_topic(
            settings,
            topics.deadletter,
            until=lambda r: len(r) >= len(dead_expected),
            timeout_s=10,
        )
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_id.setdefault(r["request_id"], []).append(r)
    for rid, code in expected.items():
        got = by_id[rid][0]
        assert (got.get("error") or {}).get("code", "") == code, (rid, got)
    # The copy in the same batch finds the first still in flight: a duplicate
    # (docs/client.md), never a second model query.
    captured = [r for r in again if r["request_id"] == "captured"]
    assert [c["status"] for c in captured] == ["ok", "error", "ok"], captured
    assert captured[1]["error"]["code"] == "DUPLICATE_REQUEST", captured[1]
    assert captured[2].get("replayed") is True, captured[2]
    assert captured[2]["outputs"] == captured[0]["outputs"]
    assert by_id[last][0]["status"] == "ok"
    assert sorted(d["code"] for d in dead) == sorted(dead_expected), dead


async def test_a_record_with_several_signatures_is_refused_and_answered(
    settings: Settings, kafka: RawKafka
) -> None:
    """Regression test: the worker used the last ``mg-sig`` header, so a record
    carrying a garbage signature and a good one was served. Several
    signatures are ambiguous: AUTH_BAD_SIGNATURE, answered, a dead letter, and
    the partition moves on."""
    key_id, secret = await create_key(settings, "sigs")
    topics = settings.kafka.topics
    sent: list[str] = []
    cases = {
        "good-then-garbage": lambda good: [good, b"0" * 64],
        "garbage-then-good": lambda good: [b"0" * 64, good],
        "good-twice": lambda good: [good, good],
        "null-then-good": lambda good: [None, good],
    }
    for rid, headers_of in cases.items():
        raw = json.dumps(_body(key_id, request_id=rid)).encode()
        good = _signed(secret, raw)[0][1]
        await kafka.producer.send_and_wait(
            topics.requests,
            raw,
            key=b"sigs",
            headers=[("mg-sig", value) for value in headers_of(good)],
        )
        sent.append(rid)
    last = await _valid(kafka, key_id, secret, "sigs")

    async with running_worker(settings):
        records = await read_topic(
            settings,
            topics.responses,
            until=lambda r: {x["request_id"] for x in r} >= {*sent, last},
            timeout_s=30,
        )
        dead = await read_topic(
            settings,
            topics.deadletter,
            until=lambda r: len(r) >= len(sent),
            timeout_s=10,
        )

    by_id = {r["request_id"]: r for r in records}
    for rid in sent:
        error = by_id[rid].get("error") or {}
        assert error.get("code") == "AUTH_BAD_SIGNATURE", by_id[rid]
        assert "2 mg-sig headers" in error.get("message", ""), by_id[rid]
    assert [d["code"] for d in dead] == ["AUTH_BAD_SIGNATURE"] * len(sent), dead
    assert by_id[last]["status"] == "ok", by_id[last]
