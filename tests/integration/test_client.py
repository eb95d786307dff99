"""The Kafka client library on the real broker, against a real worker process.

The transport must be positioned at the end of the reply topic before its first
send (so an old reply is never taken for a new one, and a fast reply is never
missed), and must hand each reply to the request with its id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from evaluation.process import WorkerProcess
from gateway import protocol
from gateway.client import (
    GatewayClient,
    GatewayRequestError,
    KafkaTransport,
    probabilities,
)
from gateway.config import Settings
from gateway.errors import BrokerError
from gateway.models import digits_split, ensure_digits_model, load_model
from gateway.topics import ensure_topics
from tests.conftest import StackInfo
from tests.integration.helpers import create_key, isolated_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

X_TEST = digits_split()[1]


@pytest.fixture(scope="module")
def client_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("client")
    ensure_digits_model(directory / "models")
    return directory


@pytest.fixture(scope="module")
def settings(stack: StackInfo, client_dir: Path) -> Settings:
    # Shadow mode and a generous limit: these tests are about the transport, so
    # detection and throttling must not turn answers into refusals.
    return isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        client_dir / "models",
        policy={"shadow": True},
        limits={"rate_per_s": 10_000, "burst": 10_000},
        auth={"server_key_file": str(client_dir / "server.key")},
    )


@pytest.fixture(scope="module")
async def worker(settings: Settings, client_dir: Path) -> AsyncIterator[WorkerProcess]:
    await ensure_topics(settings)
    async with WorkerProcess(settings, client_dir / "worker.log") as proc:
        yield proc
    assert proc.returncode == 0, proc.log_tail()


@pytest.fixture
async def transport(settings: Settings) -> AsyncIterator[KafkaTransport]:
    await ensure_topics(settings)
    async with KafkaTransport(settings) as started:
        yield started


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    raw = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap)
    await asyncio.wait_for(raw.start(), 30)
    try:
        yield raw
    finally:
        await raw.stop()


def _reply(request_id: str, code: str) -> bytes:
    return protocol.encode(
        protocol.InferResponse(
            v=1,
            request_id=request_id,
            status="error",
            ts_ms=protocol.now_ms(),
            error=protocol.ErrorBody(code=code, message="planted by the test"),
        )
    )


async def _client(
    settings: Settings, transport: KafkaTransport, name: str
) -> GatewayClient:
    key_id, secret = await create_key(settings, name)
    return GatewayClient(transport, key_id, secret, name, "digits")


async def _serving(client: GatewayClient, worker: WorkerProcess) -> None:
    """Wait until the worker has joined its group and answers."""
    for _ in range(40):
        worker.check_alive()
        try:
            await client.infer(X_TEST[:1], timeout_s=3.0)
            return
        except GatewayRequestError as exc:
            assert exc.code == "TIMEOUT", exc
    pytest.fail(f"worker never answered; log tail:\n{worker.log_tail()}")


async def test_replies_already_on_the_topic_are_not_taken_for_new_ones(
    settings: Settings, worker: WorkerProcess, producer: AIOKafkaProducer
) -> None:
    # A reply for this id sits on the topic before the transport starts; a
    # transport that read from the beginning would return it.
    request_id = protocol.new_request_id()
    await producer.send_and_wait(
        settings.kafka.topics.responses, _reply(request_id, "STALE"), key=b"x"
    )

    async with KafkaTransport(settings) as transport:
        client = await _client(settings, transport, "stale-check")
        await _serving(client, worker)
        response = await client.infer(X_TEST[:1], request_id=request_id)

    assert response.status == "ok", response
    assert response.request_id == request_id


async def test_a_reply_produced_right_after_start_is_not_missed(
    settings: Settings, transport: KafkaTransport, producer: AIOKafkaProducer
) -> None:
    # No worker involved: the "reply" is produced the moment the request is
    # enqueued, as fast as any worker could.
    request_id = protocol.new_request_id()
    _, reply = await transport.send(
        key=b"k", value=b"{}", headers=[], request_id=request_id
    )
    await producer.send_and_wait(
        settings.kafka.topics.responses, _reply(request_id, "FAST"), key=b"k"
    )
    response = await asyncio.wait_for(reply, 30)
    assert response.error is not None and response.error.code == "FAST"
    assert transport.pending_count == 0


async def test_concurrent_replies_reach_their_own_requests(
    settings: Settings,
    worker: WorkerProcess,
    transport: KafkaTransport,
    producer: AIOKafkaProducer,
    client_dir: Path,
) -> None:
    client = await _client(settings, transport, "many")
    await _serving(client, worker)
    rows = X_TEST[:40]
    # A reply nobody asked for, in the middle of the traffic, is ignored.
    await producer.send_and_wait(
        settings.kafka.topics.responses,
        _reply(protocol.new_request_id(), "NOBODY"),
        key=b"x",
    )

    responses = await client.infer_many(rows, concurrency=16)

    expected = load_model(client_dir / "models", "digits").predict_proba(rows)
    assert len({r.request_id for r in responses}) == len(rows)
    for i, response in enumerate(responses):
        np.testing.assert_array_equal(
            probabilities(response)[0], expected[i], err_msg=str(response)
        )
    assert transport.pending_count == 0


async def test_one_request_with_several_rows(
    settings: Settings,
    worker: WorkerProcess,
    transport: KafkaTransport,
    client_dir: Path,
) -> None:
    client = await _client(settings, transport, "batch")
    await _serving(client, worker)
    response = await client.infer(X_TEST[5:9])
    expected = load_model(client_dir / "models", "digits").predict_proba(X_TEST[5:9])
    np.testing.assert_array_equal(probabilities(response), expected)


async def test_error_answer_raises_with_its_code(
    settings: Settings, worker: WorkerProcess, transport: KafkaTransport
) -> None:
    good = await _client(settings, transport, "good")
    await _serving(good, worker)
    stranger = GatewayClient(
        transport, "mgk_000000000000", b"\x01" * 32, "stranger", "digits"
    )

    response = await stranger.infer(X_TEST[:1])

    with pytest.raises(GatewayRequestError) as info:
        probabilities(response)
    assert info.value.code == "AUTH_UNKNOWN_KEY", response
    assert info.value.request_id == response.request_id


async def test_no_reply_is_a_retriable_timeout(settings: Settings) -> None:
    # Requests go to a topic no worker reads, so no reply can come.
    topics = settings.kafka.topics.model_copy(
        update={"requests": settings.kafka.topics.deadletter}
    )
    unread = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"topics": topics})}
    )
    await ensure_topics(unread)
    async with KafkaTransport(unread) as silent:
        client = GatewayClient(silent, "mgk_000000000000", b"s", "t", "digits")
        with pytest.raises(GatewayRequestError) as info:
            await client.infer(X_TEST[:1], timeout_s=0.5)
        assert silent.pending_count == 0
    assert info.value.code == "TIMEOUT"
    assert info.value.retriable


async def test_stop_fails_pending_requests_and_is_idempotent(
    settings: Settings,
) -> None:
    await ensure_topics(settings)
    transport = KafkaTransport(settings)
    await transport.start()
    await transport.start()  # idempotent
    _, reply = await transport.send(
        key=b"k", value=b"{}", headers=[], request_id=protocol.new_request_id()
    )

    await transport.stop()
    await transport.stop()  # idempotent

    with pytest.raises(GatewayRequestError) as info:
        await reply
    assert info.value.code == "TRANSPORT_CLOSED"
    with pytest.raises(GatewayRequestError):
        await transport.send(key=b"k", value=b"{}", headers=[], request_id="x")


async def test_a_reply_topic_not_created_yet_is_awaited_quietly(
    stack: StackInfo, client_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client started before any worker (a first start): it waited on the
    producer's metadata, and aiokafka logged an ERROR "Topic ... not found"
    every 100 ms (about 300 lines in 30 s). Now it asks the admin client,
    quietly: it starts once the topic appears, or fails with a message
    saying who creates it."""
    fresh = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        client_dir / "models",
        kafka={"request_timeout_s": 3.0},
    )
    caplog.set_level(logging.INFO)
    with pytest.raises(BrokerError, match=r"a worker .* creates"):
        await KafkaTransport(fresh).start()

    # Created a moment after the client starts waiting: it starts.
    async def create_soon() -> None:
        await asyncio.sleep(1.0)
        await ensure_topics(fresh)

    creating = asyncio.create_task(create_soon())
    async with KafkaTransport(fresh) as started:
        assert started.started
    await creating

    noise = [r for r in caplog.records if r.name.startswith("aiokafka")]
    assert not [r for r in noise if r.levelno >= logging.ERROR], [
        r.getMessage() for r in noise
    ]
