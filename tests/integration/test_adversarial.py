"""Adversarial inputs against a real worker on the real broker and Redis.

Each test sends hostile bytes (or takes Redis away) and then checks what a
client must see: the documented error code, and that the partition keeps
moving, i.e. the next valid request is still answered. Tests that fail today
are regressions for bugs found by this file; see the docstring of each.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from gateway import protocol
from gateway.config import Settings
from gateway.models import digits_split
from gateway.topics import partitions_of
from gateway.worker import Worker
from tests.conftest import StackInfo
from tests.integration.helpers import (
    RawKafka,
    create_key,
    isolated_settings,
    read_topic,
    request_path_settings,
    responses_for,
    running_worker,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

X_TEST = digits_split()[1]
# How long a test waits for an answer that a healthy worker gives in well
# under a second; long enough for a loaded 2-core machine.
ANSWER_S = 25.0


@pytest.fixture
def settings(stack: StackInfo, models_dir: Path) -> Settings:
    """One requests partition: these tests put several clients' records in
    one batch of one partition on purpose, to show a bad one stalls no other."""
    return request_path_settings(stack, models_dir, requests_partitions=1)


def _body(
    key_id: str,
    *,
    request_id: str | None = None,
    data: Any = None,
    **fields: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": 1,
        "request_id": request_id or uuid.uuid4().hex,
        "key_id": key_id,
        "ts_ms": protocol.now_ms(),
        "model": "digits",
        "inputs": [
            {
                "name": "pixels",
                "shape": [1, 64],
                "datatype": "FP32",
                "data": [float(x) for x in X_TEST[0]] if data is None else data,
            }
        ],
    }
    body.update(fields)
    return body


def _signed(secret: bytes, raw: bytes) -> list[tuple[str, bytes]]:
    return [(protocol.SIGNATURE_HEADER, protocol.sign(secret, raw).encode())]


async def _valid(kafka: RawKafka, key_id: str, secret: bytes, client: str) -> str:
    rid = await kafka.send_request(key_id, secret, X_TEST[7:8], client_id=client)
    await kafka.flush()
    return rid


# -- (a) records that kill the worker -----------------------------------------


@pytest.mark.timeout(90)
async def test_invalid_utf8_is_malformed_json_and_the_worker_survives(
    settings: Settings, kafka: RawKafka
) -> None:
    """Regression test for a fixed bug.

    msgspec raises UnicodeDecodeError (not DecodeError) for bytes that
    are not UTF-8 inside a JSON string. decode_record does not catch it and
    runs outside process_records' try, so the worker task dies; the record is
    never committed, so every restart dies on it again."""
    key_id, secret = await create_key(settings, "utf8-victim")
    bad = b'{"v":1,"request_id":"r-\xff\xfe","key_id":"mgk_000000000000"}'
    async with running_worker(settings):
        await kafka.send_raw(bad, key="utf8-victim")
        good = await _valid(kafka, key_id, secret, "utf8-victim")
        answers = await responses_for(settings, [good], timeout_s=ANSWER_S)
        dead = await read_topic(
            settings, settings.kafka.topics.deadletter, until=bool, timeout_s=10
        )
    assert answers[good]["status"] == "ok", answers[good]
    assert [d["code"] for d in dead] == ["MALFORMED_JSON"], dead


@pytest.mark.timeout(90)
async def test_deeply_nested_json_is_refused_and_the_worker_survives(
    settings: Settings, kafka: RawKafka
) -> None:
    """Regression test for a fixed bug.

    1,200 nested brackets (2.4 KB, unauthenticated) in an unknown
    field: the strict decoder refuses the field, then decode_envelope recurses
    into it to skip it and raises RecursionError, which nobody catches."""
    key_id, secret = await create_key(settings, "deep-victim")
    depth = 1200
    bad = b'{"request_id":"deep","zz":' + b"[" * depth + b"]" * depth + b"}"
    async with running_worker(settings):
        await kafka.send_raw(bad, key="deep-victim")
        good = await _valid(kafka, key_id, secret, "deep-victim")
        answers = await responses_for(settings, [good], timeout_s=ANSWER_S)
        dead = await read_topic(
            settings, settings.kafka.topics.deadletter, until=bool, timeout_s=10
        )
    assert answers[good]["status"] == "ok", answers[good]
    assert [d["code"] for d in dead] in (["SCHEMA_INVALID"], ["MALFORMED_JSON"]), dead


@pytest.mark.timeout(90)
async def test_a_request_with_an_invalid_key_id_is_still_answered(
    settings: Settings, kafka: RawKafka
) -> None:
    """Regression test for a fixed bug (session 12's attack pass).

    A record whose key id fails its own check (empty, 10,000 characters, a
    number) failed the whole best-effort envelope, so its valid request id
    was lost with it and the sender got no answer at all."""
    key_id, secret = await create_key(settings, "keyless-victim")
    bad = {
        f"badkey-{i}": b'{"v":1,"request_id":"badkey-%d","key_id":%s}' % (i, k)
        for i, k in enumerate([b'""', b'"' + b"k" * 10_000 + b'"', b"7"])
    }
    async with running_worker(settings):
        for value in bad.values():
            await kafka.send_raw(value, key="keyless-victim")
        good = await _valid(kafka, key_id, secret, "keyless-victim")
        answers = await responses_for(settings, [*bad, good], timeout_s=ANSWER_S)
    assert answers[good]["status"] == "ok", answers[good]
    for rid in bad:
        assert answers[rid]["status"] == "error", answers[rid]
        assert answers[rid]["error"]["code"] == "SCHEMA_INVALID", answers[rid]


@pytest.mark.timeout(120)
async def test_oversized_record_is_dead_lettered_without_stalling_the_partition(
    settings: Settings, kafka: RawKafka
) -> None:
    """Regression test for a fixed bug.

    a 900 KB record (the broker accepts up to ~1 MB) is refused as
    PAYLOAD_TOO_LARGE, but its dead-letter record carries the whole value in
    base64 (1.2 MB), over the producer's max_request_size. producer.send
    raises MessageSizeTooLargeError, _handle_batch rewinds and retries the
    batch forever: the partition stalls and the rest of the batch is answered
    again every 0.5 s."""
    key_id, secret = await create_key(settings, "big-victim")
    # All three in the log before the worker starts, so they form one batch.
    before = await _valid(kafka, key_id, secret, "big-victim")
    await kafka.send_raw(b"x" * 900_000, key="big-victim")
    after = await _valid(kafka, key_id, secret, "big-victim")
    async with running_worker(settings) as worker:
        answers = await responses_for(settings, [before, after], timeout_s=ANSWER_S)
        dead = await read_topic(
            settings, settings.kafka.topics.deadletter, until=bool, timeout_s=10
        )
        await _assert_answered_once(settings, before, worker)
    assert answers[after]["status"] == "ok", answers[after]
    assert [d["code"] for d in dead] == ["PAYLOAD_TOO_LARGE"], [d["code"] for d in dead]


@pytest.mark.timeout(120)
async def test_schema_error_whose_message_expands_does_not_stall_the_partition(
    settings: Settings, kafka: RawKafka
) -> None:
    """Regression test for a fixed bug.

    same stall from a record *within* the 256 KiB limit and without
    any key. msgspec's "Invalid enum value" message holds repr() of the bad
    value; repr writes U+F0000 (4 UTF-8 bytes) as a 10-character escape, 11
    bytes once JSON-escaped. The SCHEMA_INVALID dead letter (base64 value + that
    message) is ~1.07 MB, over max_request_size: rewind forever."""
    key_id, secret = await create_key(settings, "enum-victim")
    body = _body("mgk_000000000000", request_id="enum-bomb")
    body["inputs"][0]["datatype"] = "DT"
    frame = json.dumps(body).encode()
    room = settings.kafka.max_message_bytes - len(frame)
    char = chr(0xF0000).encode()  # 4 bytes of UTF-8, a 10-character repr escape
    raw = frame.replace(b'"DT"', b'"' + char * (room // 4) + b'"')
    assert len(raw) <= settings.kafka.max_message_bytes
    async with running_worker(settings):
        await kafka.send_raw(raw, key="enum-victim")
        good = await _valid(kafka, key_id, secret, "enum-victim")
        answers = await responses_for(settings, ["enum-bomb", good], timeout_s=ANSWER_S)
    assert answers["enum-bomb"]["error"]["code"] == "SCHEMA_INVALID"
    assert answers[good]["status"] == "ok", answers[good]


async def _assert_answered_once(
    settings: Settings, request_id: str, worker: Worker
) -> None:
    """After a settle, ``request_id`` has exactly one answer (a batch rewound
    again and again answers it again and again) and a batch was committed.

    The settle is the point of the check: a stalled partition shows up only as
    a second answer some time after the first.
    """
    await asyncio.sleep(2)
    records = await read_topic(settings, settings.kafka.topics.responses, timeout_s=2)
    count = sum(r["request_id"] == request_id for r in records)
    done = worker.batches_done
    assert count == 1, f"answered {count} times; batches committed: {done}"
    assert done >= 1


@pytest.mark.timeout(120)
async def test_reply_topic_that_refuses_records_does_not_stall_the_partition(
    settings: Settings, kafka: RawKafka
) -> None:
    """Regression test for a fixed bug.

    a client names an existing reply topic under the prefix whose
    broker config refuses the answer (here max.message.bytes=64; equally a
    compacted topic and a keyless record, or a missing ACL). The produce
    fails with a non-retriable error, the whole batch is rewound and retried
    forever, and other clients on the partition are never answered."""
    key_id, secret = await create_key(settings, "tiny-sender")
    other_id, other_secret = await create_key(settings, "tiny-bystander")
    tiny = settings.kafka.topics.responses + ".tiny"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await asyncio.wait_for(admin.start(), 30)
    try:
        await admin.create_topics(
            [NewTopic(tiny, 1, 1, topic_configs={"max.message.bytes": "64"})]
        )
        request, value, headers = protocol.build_request(
            key_id=key_id,
            secret=secret,
            model="digits",
            inputs={"pixels": X_TEST[:1]},
            reply_to=tiny,
        )
        async with running_worker(settings) as worker:
            await kafka.send_raw(value, key="tiny-sender", headers=headers)
            _, value2, headers2 = protocol.build_request(
                key_id=other_id,
                secret=other_secret,
                model="digits",
                inputs={"pixels": X_TEST[1:2]},
            )
            bystander = json.loads(value2)["request_id"]
            await kafka.send_raw(value2, key="tiny-bystander", headers=headers2)
            # The bystander must be answered; the sender's answer falls back to
            # the shared responses topic rather than being lost.
            answers = await responses_for(
                settings, [bystander, request.request_id], timeout_s=ANSWER_S
            )
            await _assert_answered_once(settings, bystander, worker)
    finally:
        try:
            await admin.delete_topics([tiny])
        finally:
            await admin.close()
    assert answers[bystander]["status"] == "ok", answers[bystander]


# -- (e) wrong or unstable codes -----------------------------------------------


@pytest.mark.parametrize("digits", [400, 5000])
async def test_integer_too_big_for_a_double_is_non_finite_for_that_request_only(
    settings: Settings, kafka: RawKafka, digits: int
) -> None:
    """Regression test for a fixed bug (400 digits).

    msgspec keeps a JSON integer literal of up to 4300
    digits as a Python int; validate_request's np.asarray(..., float64) raises
    OverflowError, which is not a ValidationError, so process_records answers
    INTERNAL for every request of the batch, other clients' included.
    (5000 digits): msgspec says "Integer value out of range" and the request
    is SCHEMA_INVALID, while 1e999 is NON_FINITE: the same overflow gets three
    different codes."""
    m_id, m_secret = await create_key(settings, "mallory")
    v_id, v_secret = await create_key(settings, "victor")
    raw = json.dumps(_body(m_id, data=["HUGE"] + [0.0] * 63)).encode()
    raw = raw.replace(b'"HUGE"', b"9" * digits)
    huge_rid = json.loads(raw.replace(b"9" * digits, b"0"))["request_id"]
    # Both in the log before the worker starts: one batch, one partition.
    await kafka.send_raw(raw, key="mallory", headers=_signed(m_secret, raw))
    good_raw = json.dumps(_body(v_id)).encode()
    good = json.loads(good_raw)["request_id"]
    await kafka.send_raw(good_raw, key="victor", headers=_signed(v_secret, good_raw))
    async with running_worker(settings):
        answers = await responses_for(settings, [huge_rid, good], timeout_s=ANSWER_S)
    assert answers[good]["status"] == "ok", answers[good]
    assert answers[huge_rid]["error"]["code"] == "NON_FINITE", answers[huge_rid]


@pytest.mark.parametrize(
    ("field", "literal"),
    [("ts_ms", b"1e999"), ("v", b"1e999"), ("shape", b"[1e999, 64]")],
)
async def test_overflowing_literal_in_an_integer_field_is_schema_invalid(
    settings: Settings, kafka: RawKafka, field: str, literal: bytes
) -> None:
    """Regression test for a fixed bug.

    decode_record maps every msgspec "Number out of range" to
    NON_FINITE, which README reserves for tensor values. ts_ms=1e300 is
    SCHEMA_INVALID (a float where an int belongs) but ts_ms=1e999 is
    NON_FINITE; shape [1e999, 64] is NON_FINITE rather than SCHEMA_INVALID."""
    key_id, secret = await create_key(settings, "literal")
    body = _body(key_id)
    if field == "shape":
        body["inputs"][0]["shape"] = "LIT"
    else:
        body[field] = "LIT"
    raw = json.dumps(body).encode().replace(b'"LIT"', literal)
    async with running_worker(settings):
        await kafka.send_raw(raw, key="literal", headers=_signed(secret, raw))
        await kafka.flush()
        answer = (await responses_for(settings, [body["request_id"]]))[
            body["request_id"]
        ]
    assert answer["error"]["code"] == "SCHEMA_INVALID", answer


async def test_booleans_are_not_fp32_values(
    settings: Settings, kafka: RawKafka
) -> None:
    """Regression test for a fixed bug.

    Tensor.data is list[float | int | bool], so an FP32 tensor of
    JSON true/false is served as 1.0/0.0 instead of being refused."""
    key_id, secret = await create_key(settings, "booler")
    body = _body(key_id, data=[True] * 32 + [False] * 32)
    raw = json.dumps(body).encode()
    async with running_worker(settings):
        await kafka.send_raw(raw, key="booler", headers=_signed(secret, raw))
        await kafka.flush()
        answer = (await responses_for(settings, [body["request_id"]]))[
            body["request_id"]
        ]
    assert answer["status"] == "error", answer
    assert answer["error"]["code"] in ("DTYPE_MISMATCH", "SCHEMA_INVALID"), answer


# -- (d) unbounded state an unauthenticated sender controls ---------------------


async def test_unauthenticated_model_names_do_not_grow_metric_series(
    settings: Settings, kafka: RawKafka
) -> None:
    """Regression test for a fixed bug.

    the model label of modelgate_requests_total is item.model_name,
    which falls back to the request's own unchecked "model" string even when
    the request was refused before validation. Unsigned requests with made-up
    model names (now at most 128 characters) add one series each, for the life of the
    worker: unbounded memory and /metrics size."""
    n = 40
    ids: list[str] = []
    for i in range(n):
        body = _body("mgk_000000000000", model=f"made-up-{i}-" + "m" * 100)
        ids.append(body["request_id"])
        await kafka.send_raw(json.dumps(body).encode(), key="nobody")  # unsigned
    async with running_worker(settings) as worker:
        answers = await responses_for(settings, ids, timeout_s=ANSWER_S)
        models = {
            sample.labels["model"]
            for metric in worker.metrics.registry.collect()
            if metric.name == "modelgate_requests"
            for sample in metric.samples
            if "model" in sample.labels
        }
    assert all(a["error"]["code"] == "AUTH_MISSING" for a in answers.values())
    assert len(models) <= 2, f"{len(models)} distinct model label values"


# -- (b) who an answer claims to be for ---------------------------------------


async def test_unauthenticated_answer_is_not_keyed_as_the_claimed_client(
    settings: Settings, kafka: RawKafka
) -> None:
    """Regression test for a fixed bug.

    the answer to a record that failed authentication is
    keyed with the record's own, unchecked Kafka key (worker.py _produce:
    ``key = item.client_id or item.record_key``), and echoes any request_id
    and honours reply_to. Anyone can thus put an answer keyed "victim" with
    the victim's request id on the victim's reply topic; KafkaTransport
    matches replies by request_id only, so it takes the forged answer."""
    victim = "victim-" + uuid.uuid4().hex[:6]
    body = _body("mgk_000000000000", request_id="victims-pending-id")
    await kafka.send_raw(json.dumps(body).encode(), key=victim)  # unsigned
    async with running_worker(settings):
        await responses_for(settings, ["victims-pending-id"], timeout_s=ANSWER_S)
    keys = await _keys_on(settings, settings.kafka.topics.responses)
    assert victim.encode() not in keys, keys


async def _keys_on(settings: Settings, topic: str) -> list[bytes | None]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap, enable_auto_commit=False
    )
    await asyncio.wait_for(consumer.start(), 30)
    try:
        tps = [TopicPartition(topic, p) for p in await partitions_of(settings, topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        keys: list[bytes | None] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                keys.extend(r.key for r in records)
            if keys and not batch:
                break
        return keys
    finally:
        await consumer.stop()


# -- coverage: hostile records that are handled correctly today ----------------


@pytest.mark.timeout(120)
async def test_hostile_envelopes_get_stable_codes_and_the_partition_moves_on(
    settings: Settings, kafka: RawKafka
) -> None:
    """Tombstones, empty values, junk signature headers, glob/hash-tag key ids,
    request-id length limits, reply_to aimed at internal topics, far-future
    timestamps and one request id used by two clients."""
    a_id, a_secret = await create_key(settings, "alpha")
    b_id, b_secret = await create_key(settings, "beta")
    topics = settings.kafka.topics
    expected: dict[str, str] = {}  # request_id -> code ("" for ok)

    async def send(
        body: dict[str, Any], secret: bytes | None, code: str, **kw: Any
    ) -> None:
        raw = json.dumps(body).encode()
        headers = kw.get("headers", _signed(secret, raw) if secret else [])
        await kafka.send_raw(raw, key=kw.get("key", "hostile"), headers=headers)
        expected[body["request_id"]] = code

    # No value at all, and an empty one: dead letters only (nobody to answer).
    await kafka.producer.send_and_wait(topics.requests, None, key=b"hostile")
    await kafka.send_raw(b"", key="hostile")
    await send(
        _body(a_id, request_id="non-ascii-sig"),
        None,
        "AUTH_BAD_SIGNATURE",
        headers=[(protocol.SIGNATURE_HEADER, "é".encode() * 32)],
    )
    for odd in ("mgk_*", "mgk_{x}", "mgk_000000000000}{", "*"):
        await send(_body(odd, request_id=f"glob-{odd}"), a_secret, "AUTH_UNKNOWN_KEY")
    # Over 128 characters the codec refuses the id itself, so there is no
    # id to answer to: a dead letter only (checked by the count below).
    await send(_body(a_id, request_id="r" * 129), a_secret, "SCHEMA_INVALID")
    expected.pop("r" * 129)
    await send(
        _body(a_id, request_id="{c:beta}" + "r" * 120), a_secret, "", key="alpha"
    )
    await send(
        _body(a_id, request_id="future", ts_ms=protocol.now_ms() + 3_600_000),
        a_secret,
        "AUTH_STALE",
    )
    for target in (topics.requests, topics.alerts, topics.deadletter, "x" * 200):
        await send(_body(a_id, reply_to=target), a_secret, "", key="alpha")
    # One request id, two clients: each is its own client's first use.
    await send(_body(a_id, request_id="shared-id"), a_secret, "", key="alpha")
    await send(_body(b_id, request_id="shared-id"), b_secret, "", key="beta")
    expected.pop("shared-id")
    last = await _valid(kafka, b_id, b_secret, "beta")

    async with running_worker(settings):
        records = await read_topic(
            settings,
            topics.responses,
            until=lambda r: (
                {x["request_id"] for x in r} >= {*expected, last}
                and sum(x["request_id"] == "shared-id" for x in r) >= 2
            ),
            timeout_s=ANSWER_S,
        )
        dead = await read_topic(
            settings, topics.deadletter, until=lambda r: len(r) >= 8, timeout_s=10
        )
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_id.setdefault(r["request_id"], []).append(r)
    for rid, code in expected.items():
        got = by_id[rid][0]
        assert (got.get("error") or {}).get("code", "") == code, (rid, got)
    assert [r["status"] for r in by_id["shared-id"]] == ["ok", "ok"]
    assert by_id[last][0]["status"] == "ok"
    assert sorted(d["code"] for d in dead).count("MALFORMED_JSON") == 2, dead
    # Nothing was written back onto the requests topic by a reply_to.
    requests_back = await _keys_on(settings, topics.requests)
    # Sent: the expected answers, 2 valueless records, the 2 shared-id
    # requests, the over-long id and the last valid one; nothing more.
    assert len(requests_back) == len(expected) + 2 + 2 + 1 + 1, len(requests_back)


# -- Redis outage mid-stream ----------------------------------------------------


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError("no free port")


class OwnRedis:
    """A redis-server of this test's own, on loopback, persisted to a dir so a
    restart brings the API keys back."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server not installed"
        self.proc = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.directory),
                "--dbfilename",
                "dump.rdb",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("own redis did not start")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path, _free_port(16499))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.mark.timeout(150)
async def test_redis_outage_holds_the_batch_and_serves_it_on_recovery(
    stack: StackInfo, models_dir: Path, own_redis: OwnRedis
) -> None:
    """While Redis hangs or is down the worker neither answers nor commits; it
    retries the batch with back-off, and once Redis is back every request is
    served (the admission script sees the same record as a redelivery)."""
    from gateway.store import redis_from_settings

    settings = isolated_settings(
        stack.kafka_bootstrap,
        own_redis.url,
        models_dir,
        policy={"shadow": True},
        limits={"rate_per_s": 10_000, "burst": 10_000},
    )
    settings = settings.model_copy(
        update={"redis": settings.redis.model_copy(update={"socket_timeout_s": 1.0})}
    )
    key_id, secret = await create_key(settings, "outage")
    cache_ttl = settings.auth.key_cache_ttl_s

    async def send(rows: slice) -> str:
        rid = await raw.send_request(key_id, secret, X_TEST[rows], client_id="outage")
        await raw.flush()
        return rid

    async def answer(rid: str) -> dict[str, Any]:
        return (await responses_for(settings, [rid], timeout_s=ANSWER_S))[rid]

    async with RawKafka(settings) as raw, running_worker(settings):
        assert (await answer(await send(slice(0, 1))))["status"] == "ok"

        # Hung Redis at the key lookup (cache expired): served after it wakes.
        own_redis.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(cache_ttl + 0.2)
            hung = await send(slice(1, 2))
        finally:
            own_redis.signal(signal.SIGCONT)
        assert (await answer(hung))["status"] == "ok"

        # Hung again while the key is cached: admission times out this time.
        own_redis.signal(signal.SIGSTOP)
        try:
            admit_hung = await send(slice(10, 11))
        finally:
            own_redis.signal(signal.SIGCONT)
        assert (await answer(admit_hung))["status"] == "ok"
        # The cancelled pipeline must not leave a reply behind on a pooled
        # connection for the next call to read.
        for i in range(11, 14):
            assert (await answer(await send(slice(i, i + 1))))["status"] == "ok"

        # Dead Redis, then a restarted one (script cache empty, old sockets
        # broken): the request sent meanwhile is served after the restart.
        client = redis_from_settings(settings)
        try:
            await client.save()
        finally:
            await client.aclose()
        own_redis.kill()
        await asyncio.sleep(cache_ttl + 0.2)
        down = await send(slice(3, 4))
        own_redis.start()
        assert (await answer(down))["status"] == "ok"
        for i in range(5, 10):
            assert (await answer(await send(slice(i, i + 1))))["status"] == "ok"

    records = await read_topic(settings, settings.kafka.topics.responses, timeout_s=2)
    # Retried batches may answer a request twice, but never as a refusal.
    assert all(r["status"] == "ok" for r in records), [
        r.get("error") for r in records if r["status"] != "ok"
    ]


async def test_client_does_not_take_a_strangers_answer_for_its_own(
    settings: Settings, kafka: RawKafka
) -> None:
    """Regression test for a fixed bug.

    a client retrying under a request id that is
    visible on the shared responses topic (the documented way to retry after
    RATE_LIMITED or TIMEOUT) gets whatever answer carries that id first. An
    unsigned record with that id and the victim's record key, sent just before
    the retry, is answered AUTH_MISSING, keyed with the victim's name, and
    KafkaTransport._deliver (matching on request_id alone) hands that forged
    answer to the victim instead of its own prediction."""
    from gateway.client import GatewayClient, KafkaTransport

    key_id, secret = await create_key(settings, "victim")
    rid = "retry-" + uuid.uuid4().hex[:8]
    forged = _body("mgk_000000000000", request_id=rid)
    async with KafkaTransport(settings) as transport:
        client = GatewayClient(transport, key_id, secret, "victim", "digits")
        await kafka.send_raw(json.dumps(forged).encode(), key="victim")  # unsigned
        call = asyncio.create_task(
            client.infer(X_TEST[:1], request_id=rid, timeout_s=ANSWER_S)
        )
        try:
            # Let the victim's record reach the log behind the forged one.
            await asyncio.sleep(1.5)
            assert transport.pending_count == 1
            async with running_worker(settings):
                response = await asyncio.wait_for(call, ANSWER_S + 5)
        finally:
            call.cancel()
    assert response.status == "ok", response.error
