"""The Kafka clients of a consumer-group service: the worker and the guard.

Both read one topic in a consumer group, produce their verdicts and commit
offsets only after those are acknowledged, so both need the same producer
(idempotent, ``acks=all``), the same consumer (manual commits, fetches sized
for the largest message) and the same start-up order. Kept here so that a
fix to one (such as the metadata wait below) reaches the other.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from gateway.config import Settings
from gateway.errors import BrokerError
from gateway.store import RedisClient


def group_clients(
    settings: Settings, group_id: str
) -> tuple[AIOKafkaProducer, AIOKafkaConsumer]:
    """A producer and a consumer of ``group_id``, not yet started."""
    kafka = settings.kafka
    timeout_s = kafka.request_timeout_s
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=2,
        request_timeout_ms=int(timeout_s * 1000),
    )
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=kafka.session_timeout_ms,
        heartbeat_interval_ms=kafka.heartbeat_interval_ms,
        max_partition_fetch_bytes=max(kafka.max_message_bytes * 4, 1_048_576),
        # Backstop for the race start_group_clients waits out: a topic
        # (re)created later is seen within 10 s rather than the default 5
        # minutes.
        metadata_max_age_ms=10_000,
        request_timeout_ms=int(timeout_s * 1000) + 10_000,
    )
    return producer, consumer


async def start_group_clients(
    settings: Settings,
    producer: AIOKafkaProducer,
    consumer: AIOKafkaConsumer,
    topic: str,
    listener: ConsumerRebalanceListener,
) -> None:
    """Start both clients and subscribe ``consumer`` to ``topic``.

    Raises
    ------
    BrokerError
        Kafka could not be reached within ``kafka.request_timeout_s`` per
        step; the caller stops whatever did start.
    """
    timeout_s = settings.kafka.request_timeout_s
    try:
        await asyncio.wait_for(producer.start(), timeout_s)
        # Wait until the broker's metadata lists the topic. A consumer that
        # joins the group before then is assigned nothing and would only
        # notice the topic at its next metadata refresh.
        await asyncio.wait_for(producer.partitions_for(topic), timeout_s)
        await asyncio.wait_for(consumer.start(), timeout_s)
    except (KafkaError, TimeoutError, OSError) as exc:
        raise BrokerError(f"cannot reach Kafka at {settings.kafka.bootstrap}") from exc
    consumer.subscribe([topic], listener=listener)


MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 5.0


class Backoff:
    """The wait between retries while Kafka or Redis is in trouble: doubled
    by each failed batch up to ``MAX_BACKOFF_S``, reset by one that commits,
    so a service in trouble is not hammered and a recovered one is not
    kept waiting."""

    def __init__(self) -> None:
        self.delay_s = MIN_BACKOFF_S

    async def wait(self) -> None:
        await asyncio.sleep(self.delay_s)

    async def wait_longer(self) -> None:
        await self.wait()
        self.delay_s = min(self.delay_s * 2, MAX_BACKOFF_S)

    def reset(self) -> None:
        self.delay_s = MIN_BACKOFF_S


async def rewind(
    consumer: AIOKafkaConsumer,
    first_offsets: dict[TopicPartition, int],
    backoff: Backoff,
) -> None:
    """Seek each partition still owned back to its batch's first offset, so
    the whole batch comes again, then back off.

    A batch that failed may be half produced; delivering it again costs a
    duplicate downstream (which readers recognise by id), never a loss.
    """
    for tp, offset in first_offsets.items():
        if tp in consumer.assignment():
            consumer.seek(tp, offset)
    await backoff.wait_longer()


async def close_clients(
    consumer: AIOKafkaConsumer | None,
    producer: AIOKafkaProducer | None,
    redis: RedisClient | None,
    timeout_s: float,
) -> None:
    """Stop the consumer, then the producer, then close Redis, each even if
    the one before it failed; a client that is ``None`` was never made."""
    try:
        if consumer is not None:
            await asyncio.wait_for(consumer.stop(), timeout_s)
    finally:
        try:
            if producer is not None:
                await asyncio.wait_for(producer.stop(), timeout_s)
        finally:
            if redis is not None:
                await redis.aclose()
