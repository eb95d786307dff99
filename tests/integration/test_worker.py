"""The request path on the real broker and Redis: answers, refusals, dead
letters, rate limits, duplicates, restarts and shutdown."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
from pathlib import Path

import numpy as np
import pytest

from gateway import protocol
from gateway.config import Settings
from gateway.models import digits_split, load_model
from tests.conftest import StackInfo
from tests.integration.helpers import (
    RawKafka,
    create_key,
    isolated_settings,
    read_topic,
    responses_for,
    running_worker,
    start_worker_process,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

X_TEST = digits_split()[1]


async def test_valid_request_gets_exactly_the_models_prediction(
    settings: Settings, kafka: RawKafka, models_dir: Path
) -> None:
    key_id, secret = await create_key(settings, "alice")
    rows = X_TEST[:3]
    async with running_worker(settings):
        request_ids = [
            await kafka.send_request(key_id, secret, rows[i : i + 1], client_id="alice")
            for i in range(3)
        ]
        await kafka.flush()
        answers = await responses_for(settings, request_ids)

    expected = load_model(models_dir, "digits").predict_proba(rows)
    for i, request_id in enumerate(request_ids):
        answer = answers[request_id]
        assert answer["status"] == "ok", answer
        outputs = {o["name"]: o for o in answer["outputs"]}
        got = np.asarray(outputs["probabilities"]["data"], dtype=np.float32)
        np.testing.assert_array_equal(got, expected[i])
        assert outputs["label"]["data"] == [int(expected[i].argmax())]


async def test_each_bad_input_gets_its_code_and_a_dead_letter(
    settings: Settings, kafka: RawKafka
) -> None:
    key_id, secret = await create_key(settings, "bob")
    _, value, _ = protocol.build_request(
        key_id=key_id,
        secret=secret,
        model="digits",
        inputs={"pixels": X_TEST[:1]},
        request_id="good-template",
    )
    template = json.loads(value)

    def signed(body: dict[str, object]) -> tuple[bytes, list[tuple[str, bytes]]]:
        raw = json.dumps(body).encode()
        return raw, [(protocol.SIGNATURE_HEADER, protocol.sign(secret, raw).encode())]

    def variant(request_id: str, **changes: object) -> dict[str, object]:
        body = json.loads(json.dumps(template))
        body["request_id"] = request_id
        tensor = body["inputs"][0]
        for name, change in changes.items():
            if name in tensor:
                tensor[name] = change
            else:
                body[name] = change
        return body

    nan_body = variant("nan")
    nan_raw = json.dumps(nan_body).encode().replace(b"[0.0,", b"[NaN,", 1)
    huge_raw = json.dumps(variant("inf")).encode().replace(b"[0.0,", b"[1e999,", 1)
    cases: dict[str, tuple[bytes, list[tuple[str, bytes]]]] = {
        "SCHEMA_INVALID": signed(variant("schema", extra_field=1)),
        "UNSUPPORTED_VERSION": signed(variant("version", v=2)),
        "UNKNOWN_MODEL": signed(variant("model", model="nope")),
        "SHAPE_MISMATCH": signed(variant("shape", shape=[1, 63])),
        "DTYPE_MISMATCH": signed(variant("dtype", datatype="INT64")),
        "OUT_OF_RANGE": signed(variant("range", data=[99.0] * 64)),
        "NON_FINITE": (
            huge_raw,
            [(protocol.SIGNATURE_HEADER, protocol.sign(secret, huge_raw).encode())],
        ),
        "AUTH_UNKNOWN_KEY": signed(variant("unknown", key_id="mgk_000000000000")),
        "AUTH_BAD_SIGNATURE": (
            json.dumps(variant("badsig")).encode(),
            [(protocol.SIGNATURE_HEADER, b"0" * 64)],
        ),
        "AUTH_MISSING": (json.dumps(variant("nosig")).encode(), []),
        "AUTH_STALE": signed(variant("stale", ts_ms=1)),
    }
    async with running_worker(settings):
        await kafka.send_raw(b"{not json", key="bob")
        await kafka.send_raw(nan_raw, key="bob")
        await kafka.send_raw(b"x" * (settings.kafka.max_message_bytes + 1), key="bob")
        for value_bytes, hdrs in cases.values():
            await kafka.send_raw(value_bytes, key="bob", headers=hdrs)
        # The partition keeps moving: a valid request after all of that.
        good = await kafka.send_request(key_id, secret, X_TEST[5:6], client_id="bob")
        await kafka.flush()

        ids = {code: json.loads(v)["request_id"] for code, (v, _) in cases.items()}
        answers = await responses_for(settings, [*ids.values(), good])
        dead = await read_topic(
            settings,
            settings.kafka.topics.deadletter,
            until=lambda r: len(r) >= len(cases) + 3,
        )

    assert answers[good]["status"] == "ok", answers[good]
    for code, request_id in ids.items():
        answer = answers[request_id]
        assert answer["status"] == "error", answer
        assert answer["error"]["code"] == code, answer
    dead_codes = sorted(d["code"] for d in dead)
    expected_codes = sorted(
        [*cases, "MALFORMED_JSON", "MALFORMED_JSON", "PAYLOAD_TOO_LARGE"]
    )
    # NaN is not JSON, so that message is MALFORMED_JSON like "{not json".
    assert dead_codes == expected_codes, dead
    not_json = next(d for d in dead if d["code"] == "MALFORMED_JSON")
    assert base64.b64decode(not_json["value_b64"]) in (b"{not json", nan_raw)


async def test_integers_for_a_float_model_are_converted_as_at_the_front_door(
    settings: Settings, kafka: RawKafka, models_dir: Path
) -> None:
    # The front door converts INT data exact in the model's FP32
    # (gateway.frontdoor.tensors); a request produced straight to Kafka gets
    # the same rule (gateway.validation.exact_floats), not DTYPE_MISMATCH.
    key_id, secret = await create_key(settings, "ivan")
    rows = X_TEST[:2]
    assert np.array_equal(rows, rows.round())  # digit pixels are whole numbers

    def signed(request_id: str, datatype: str, data: list[object]) -> bytes:
        _, value, _ = protocol.build_request(
            key_id=key_id,
            secret=secret,
            model="digits",
            inputs={"pixels": rows},
            request_id=request_id,
        )
        body = json.loads(value)
        body["inputs"][0].update(datatype=datatype, data=data)
        return json.dumps(body).encode()

    whole = [int(v) for v in rows.ravel()]
    cases = {
        "int64": signed("int64", "INT64", whole),
        "int32": signed("int32", "INT32", whole),
        # Not integers, or not INT32, or not exact in FP32: refused alike.
        "half": signed("half", "INT64", [0.5, *whole[1:]]),
        "wide": signed("wide", "INT32", [2**31, *whole[1:]]),
        "inexact": signed("inexact", "INT64", [2**24 + 1, *whole[1:]]),
    }
    async with running_worker(settings):
        for raw in cases.values():
            sig = protocol.sign(secret, raw).encode()
            await kafka.send_raw(
                raw, key="ivan", headers=[(protocol.SIGNATURE_HEADER, sig)]
            )
        await kafka.flush()
        answers = await responses_for(settings, list(cases))

    expected = load_model(models_dir, "digits").predict_proba(rows)
    for request_id in ("int64", "int32"):
        answer = answers[request_id]
        assert answer["status"] == "ok", answer
        outputs = {o["name"]: o for o in answer["outputs"]}
        got = np.asarray(outputs["probabilities"]["data"], dtype=np.float32)
        np.testing.assert_array_equal(got.reshape(expected.shape), expected)
    for request_id in ("half", "wide", "inexact"):
        answer = answers[request_id]
        assert answer["status"] == "error", answer
        assert answer["error"]["code"] == "DTYPE_MISMATCH", answer


async def test_revoked_key_is_refused(settings: Settings, kafka: RawKafka) -> None:
    from gateway.keys import KeyStore
    from gateway.store import redis_from_settings

    key_id, secret = await create_key(settings, "carol")
    redis = redis_from_settings(settings)
    try:
        await KeyStore(redis, settings).revoke(key_id)
    finally:
        await redis.aclose()
    async with running_worker(settings):
        rid = await kafka.send_request(key_id, secret, X_TEST[:1], client_id="carol")
        await kafka.flush()
        answer = (await responses_for(settings, [rid]))[rid]
    assert answer["error"]["code"] == "AUTH_REVOKED", answer


async def test_per_client_limit_throttles_at_the_configured_rate(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        policy={"shadow": True},
        limits={"rate_per_s": 2, "burst": 5},
    )
    key_id, secret = await create_key(settings, "dave")
    other_id, other_secret = await create_key(settings, "erin")
    async with RawKafka(settings) as kafka, running_worker(settings):
        ids = [
            await kafka.send_request(
                key_id, secret, X_TEST[i : i + 1], client_id="dave"
            )
            for i in range(20)
        ]
        other = await kafka.send_request(
            other_id, other_secret, X_TEST[:1], client_id="erin"
        )
        await kafka.flush()
        answers = await responses_for(settings, [*ids, other])

    statuses = [answers[i]["status"] for i in ids]
    served = statuses.count("ok")
    # GCRA: the burst passes at once, then one request per 1/rate seconds; the
    # 20 requests arrive well within one emission interval (500 ms) of each
    # other, so at most one more can pass.
    assert 5 <= served <= 6, statuses
    assert statuses[:5] == ["ok"] * 5, statuses
    refused = [answers[i] for i in ids if answers[i]["status"] == "error"]
    assert all(a["error"]["code"] == "RATE_LIMITED" for a in refused), refused
    assert all(0 < a["retry_after_ms"] <= 10_000 for a in refused), refused
    assert all(a["action"] == "throttle" for a in refused), refused
    # Another client's budget is its own.
    assert answers[other]["status"] == "ok"


async def test_duplicate_request_id_is_recognised(
    settings: Settings, kafka: RawKafka
) -> None:
    # A resend of the same body is a retry, answered again from the replay
    # cache (tests/integration/test_replay.py); another body under a used
    # id is the duplicate.
    key_id, secret = await create_key(settings, "frank")
    request, value, headers = protocol.build_request(
        key_id=key_id, secret=secret, model="digits", inputs={"pixels": X_TEST[:1]}
    )
    _, other_value, other_headers = protocol.build_request(
        key_id=key_id,
        secret=secret,
        model="digits",
        inputs={"pixels": X_TEST[2:3]},
        request_id=request.request_id,
    )
    async with running_worker(settings):
        await kafka.send_raw(value, key="frank", headers=headers)
        await kafka.send_raw(other_value, key="frank", headers=other_headers)
        follow = await kafka.send_request(
            key_id, secret, X_TEST[1:2], client_id="frank"
        )
        await kafka.flush()
        await responses_for(settings, [request.request_id, follow])
        records = await read_topic(
            settings,
            settings.kafka.topics.responses,
            until=lambda r: sum(x["request_id"] == request.request_id for x in r) >= 2,
        )
    mine = [r for r in records if r["request_id"] == request.request_id]
    assert [r["status"] for r in mine] == ["ok", "error"], mine
    assert mine[1]["error"]["code"] == "DUPLICATE_REQUEST"


async def test_restarted_worker_leaves_no_request_unanswered(
    settings: Settings, kafka: RawKafka, tmp_path: Path
) -> None:
    clients = [await create_key(settings, f"client-{n}") for n in range(4)]
    ids: list[str] = []
    first = start_worker_process(settings, tmp_path / "first.log")
    try:
        for i in range(400):
            key_id, secret = clients[i % 4]
            ids.append(
                await kafka.send_request(
                    key_id, secret, X_TEST[i : i + 1], client_id=f"client-{i % 4}"
                )
            )
        await kafka.flush()
        # Kill the first worker once it is part-way through: no graceful exit,
        # so whatever it had not committed must be served again by the next.
        await read_topic(
            settings,
            settings.kafka.topics.responses,
            until=lambda r: len(r) >= 50,
            timeout_s=60,
        )
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    second = start_worker_process(settings, tmp_path / "second.log")
    try:
        answers = await responses_for(settings, ids, timeout_s=90)
    finally:
        second.terminate()
        second.wait(timeout=30)
    assert all(a["status"] == "ok" for a in answers.values())


async def test_sigterm_finishes_commits_and_exits_zero(
    settings: Settings, kafka: RawKafka, tmp_path: Path
) -> None:
    key_id, secret = await create_key(settings, "gina")
    worker = start_worker_process(settings, tmp_path / "worker.log")
    try:
        ids = [
            await kafka.send_request(
                key_id, secret, X_TEST[i : i + 1], client_id="gina"
            )
            for i in range(30)
        ]
        await kafka.flush()
        await responses_for(settings, ids, timeout_s=60)
        worker.send_signal(signal.SIGTERM)
        code = await asyncio.get_running_loop().run_in_executor(
            None, lambda: worker.wait(timeout=30)
        )
    finally:
        if worker.poll() is None:
            worker.kill()
    log = (tmp_path / "worker.log").read_text()
    assert code == 0, log[-3000:]

    # Everything answered was committed: a new worker re-answers nothing.
    async with running_worker(settings) as again:
        late = await kafka.send_request(key_id, secret, X_TEST[40:41], client_id="gina")
        await kafka.flush()
        await responses_for(settings, [late])
    # Checked after the worker stopped: the answer is visible before the commit.
    assert again.batches_done >= 1
    records = await read_topic(settings, settings.kafka.topics.responses, timeout_s=2)
    counts = [sum(r["request_id"] == i for r in records) for i in ids]
    assert counts == [1] * len(ids), counts


async def test_metrics_endpoint_reports_requests_stages_and_lag(
    stack: StackInfo, models_dir: Path, free_port: int
) -> None:
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        policy={"shadow": True},
        worker={"metrics_port": free_port},
    )
    key_id, secret = await create_key(settings, "hana")
    async with RawKafka(settings) as kafka, running_worker(settings) as worker:
        ok = await kafka.send_request(key_id, secret, X_TEST[:1], client_id="hana")
        await kafka.send_raw(b"{oops", key="hana")
        await kafka.flush()
        await responses_for(settings, [ok])
        port = worker.metrics_port
        body = await asyncio.get_running_loop().run_in_executor(
            None, lambda: _http_get(f"http://127.0.0.1:{port}/metrics")
        )
    assert 'modelgate_requests_total{code="",decision="allow",model="digits"} 1.0' in (
        body
    ), body[:3000]
    assert 'code="MALFORMED_JSON"' in body, body[:2000]
    assert 'modelgate_stage_seconds_count{stage="admit"}' in body
    assert "modelgate_consumer_lag{" in body
    assert 'modelgate_detector_score_count{detector="ood"}' in body


def _http_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


@pytest.fixture
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_second_worker_on_a_taken_metrics_port_fails_clearly(
    stack: StackInfo, models_dir: Path, free_port: int
) -> None:
    from gateway.errors import ConfigError
    from gateway.worker import Worker

    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        worker={"metrics_port": free_port},
    )
    async with running_worker(settings):
        second = Worker(settings)
        with pytest.raises(ConfigError) as info:
            await second.start()
        await second.stop()
    assert "worker.metrics_port" in info.value.message


async def test_records_must_be_keyed_and_partitioned_by_their_client(
    settings: Settings, kafka: RawKafka
) -> None:
    from aiokafka.partitioner import DefaultPartitioner

    key_id, secret = await create_key(settings, "ivy")
    topic = settings.kafka.topics.requests
    partitions = sorted(await kafka.producer.partitions_for(topic))
    home = DefaultPartitioner()(b"ivy", partitions, partitions)
    elsewhere = next(p for p in partitions if p != home)

    def signed(request_id: str) -> tuple[bytes, list[tuple[str, bytes]]]:
        _, value, headers = protocol.build_request(
            key_id=key_id,
            secret=secret,
            model="digits",
            inputs={"pixels": X_TEST[:1]},
            request_id=request_id,
        )
        return value, headers

    async with running_worker(settings):
        value, headers = signed("wrong-key")
        await kafka.send_raw(value, key="someone-else", headers=headers)
        value, headers = signed("wrong-partition")
        await kafka.producer.send_and_wait(
            topic, value, key=b"ivy", partition=elsewhere, headers=headers
        )
        value, headers = signed("right")
        await kafka.send_raw(value, key="ivy", headers=headers)
        answers = await responses_for(
            settings, ["wrong-key", "wrong-partition", "right"]
        )
    assert answers["right"]["status"] == "ok", answers["right"]
    for rid in ("wrong-key", "wrong-partition"):
        assert answers[rid]["error"]["code"] == "AUTH_WRONG_PARTITION", answers[rid]
