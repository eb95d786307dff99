"""The local stack the harness starts: a real Kafka broker and a real Redis.

Uses the session ``stack`` fixture (tests/conftest.py), which holds the stack
through ``gateway.stack`` for the whole session.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from gateway import stack as stack_mod
from gateway.topics import delete_topics, ensure_topics, partitions_of
from tests.conftest import StackInfo
from tests.integration.helpers import isolated_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

_EXTERNAL = os.environ.get("MODELGATE_TEST_EXTERNAL_STACK") == "1"


async def _kafka_round_trip(bootstrap: str) -> None:
    topic = f"test.stack.{uuid.uuid4().hex[:12]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15_000)
    await admin.start()
    try:
        # Auto-creation is off on our broker, so the topic must exist before use.
        await admin.create_topics(
            [NewTopic(name=topic, num_partitions=1, replication_factor=1)]
        )
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            meta = await producer.send_and_wait(topic, b"ping", key=b"client-1")
        finally:
            await producer.stop()
        assert meta.offset == 0

        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
        )
        await consumer.start()
        try:
            record = await asyncio.wait_for(consumer.getone(), timeout=30)
        finally:
            await consumer.stop()
        assert (record.key, record.value) == (b"client-1", b"ping")
    finally:
        try:
            await admin.delete_topics([topic])
        finally:
            await admin.close()


async def _redis_ping(url: str) -> bool:
    client = aioredis.from_url(url, socket_timeout=5)
    try:
        return bool(await client.ping())
    finally:
        await client.aclose()


async def test_kafka_produce_consume_round_trip(stack: StackInfo) -> None:
    async with asyncio.timeout(90):
        await _kafka_round_trip(stack.kafka_bootstrap)


async def test_redis_answers_ping(stack: StackInfo) -> None:
    async with asyncio.timeout(15):
        assert await _redis_ping(stack.redis_url)


async def test_auto_topic_creation_is_off(stack: StackInfo) -> None:
    # A typo in a topic name must fail loudly, not create a new empty topic.
    topic = f"test.stack.never-created.{uuid.uuid4().hex[:12]}"
    producer = AIOKafkaProducer(
        bootstrap_servers=stack.kafka_bootstrap, request_timeout_ms=5_000
    )
    await producer.start()
    try:
        async with asyncio.timeout(30):
            with pytest.raises(KafkaError) as info:
                await producer.send_and_wait(topic, b"x")
    finally:
        await producer.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    await admin.start()
    try:
        assert topic not in await admin.list_topics(), repr(info.value)
    finally:
        await admin.close()


@pytest.mark.skipif(_EXTERNAL, reason="the stack is external; nothing to share")
async def test_second_holder_does_not_stop_the_stack(stack: StackInfo) -> None:
    # Another user arrives and leaves while the session fixture still holds the
    # stack; the services must survive its release.
    other = f"pytest-other-{uuid.uuid4().hex[:8]}"
    loop = asyncio.get_running_loop()
    info = await loop.run_in_executor(None, stack_mod.acquire, other)
    assert info.kafka_bootstrap == stack.kafka_bootstrap
    assert other in (await loop.run_in_executor(None, stack_mod.status)).holders
    await loop.run_in_executor(None, stack_mod.release, other)

    status = await loop.run_in_executor(None, stack_mod.status)
    assert other not in status.holders
    assert status.running, status
    async with asyncio.timeout(90):
        await _kafka_round_trip(stack.kafka_bootstrap)
        assert await _redis_ping(stack.redis_url)


@pytest.mark.skipif(_EXTERNAL, reason="the stack is external; nothing to share")
def test_concurrent_holder_in_another_process(stack: StackInfo) -> None:
    # A second process (another pytest, a demo) acquires and releases at the same
    # time as this session holds the stack, through the same code path.
    code = (
        "from gateway import stack\n"
        "with stack.hold('pytest-child-' + __import__('uuid').uuid4().hex[:8]) as i:\n"
        "    print(i.kafka_bootstrap)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == stack.kafka_bootstrap
    assert stack_mod.status().running, result.stderr


@pytest.mark.skipif(_EXTERNAL, reason="the stack is external; nothing to share")
def test_holder_of_a_dead_process_is_pruned(stack: StackInfo) -> None:
    # A process killed before it could release must not keep the stack alive
    # forever: its holder goes at the next stack operation.
    script = stack_mod.repo_root() / "infra" / "stack.sh"
    sleeper = subprocess.Popen(["sleep", "60"])
    holder = f"pytest-ghost-{uuid.uuid4().hex[:8]}"
    try:
        subprocess.run(
            ["bash", str(script), "acquire", holder, "--pid", str(sleeper.pid)],
            capture_output=True,
            check=True,
            timeout=300,
        )
        assert holder in stack_mod.status().holders
    finally:
        sleeper.kill()
        sleeper.wait()
    status = stack_mod.status()
    assert holder not in status.holders
    assert status.running, status


async def test_created_topics_are_ready_when_ensure_topics_returns(
    stack: StackInfo, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A client that looks a topic up right after it is created must find it
    # at once, without aiokafka's "not found in cluster metadata" errors.
    settings = isolated_settings(
        stack.kafka_bootstrap, stack.redis_url, models_dir, requests_partitions=4
    )
    await ensure_topics(settings)
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap)
    await producer.start()
    try:
        with caplog.at_level(logging.ERROR, logger="aiokafka"):
            async with asyncio.timeout(30):
                for topic in (
                    settings.kafka.topics.requests,
                    settings.kafka.topics.responses,
                ):
                    assert await producer.partitions_for(topic)
        assert await partitions_of(settings, settings.kafka.topics.requests) == [
            0, 1, 2, 3
        ]  # fmt: skip
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        await producer.stop()
        await delete_topics(
            settings,
            [settings.kafka.topics.requests, settings.kafka.topics.responses],
        )


async def test_request_times_are_the_brokers_not_the_producers(
    stack: StackInfo, models_dir: Path
) -> None:
    # Detectors read a request's record time as its arrival; a producer that
    # back-dates its records must not choose it (the broker stamps them).
    settings = isolated_settings(stack.kafka_bootstrap, stack.redis_url, models_dir)
    await ensure_topics(settings)
    topic = settings.kafka.topics.requests
    forged_ms = 1_000_000_000_000  # 2001
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap)
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=stack.kafka_bootstrap, auto_offset_reset="earliest"
    )
    await producer.start()
    await consumer.start()
    try:
        sent = await producer.send_and_wait(topic, b"{}", timestamp_ms=forged_ms)
        async with asyncio.timeout(30):
            record = await consumer.getone()
        assert record.offset == sent.offset
        assert record.timestamp_type == 1  # LogAppendTime
        assert record.timestamp > forged_ms
    finally:
        await consumer.stop()
        await producer.stop()
        topics = settings.kafka.topics
        await delete_topics(
            settings,
            [
                topics.requests,
                topics.responses,
                topics.alerts,
                topics.decisions,
                topics.deadletter,
            ],
        )
