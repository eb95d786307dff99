"""``modelgate feedback rejected`` against the real Kafka: records spread over
partitions print oldest first whatever partition a fetch returns first, and
the count reads as English."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from typer.testing import CliRunner

from gateway.config import Settings
from gateway.feedback_wire import RejectedFeedback, encode
from gateway.topics import delete_topics, ensure_topics
from tests.conftest import StackInfo
from tests.integration.helpers import isolated_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

T0_MS = 1_790_000_000_000


@pytest.fixture
def rejected_settings(stack: StackInfo, models_dir: Path) -> Iterator[Settings]:
    tag = uuid.uuid4().hex[:10]
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        kafka={"topics": {"feedback_rejected": f"test-{tag}.feedback.rejected"}},
    )
    topic = settings.kafka.topics.feedback_rejected
    asyncio.run(ensure_topics(settings, {topic: 3}))
    try:
        yield settings
    finally:
        asyncio.run(delete_topics(settings, [topic]))


async def _put(settings: Settings, records: list[tuple[int, int, str]]) -> None:
    """(partition, timestamp ms, feedback id) each, in this order."""
    topic = settings.kafka.topics.feedback_rejected
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap)
    await producer.start()
    try:
        for partition, ts_ms, feedback_id in records:
            value = encode(
                RejectedFeedback(
                    v=1,
                    code="UNKNOWN_LABEL",
                    message="label 11 is not a class of digits",
                    topic=settings.kafka.topics.feedback,
                    partition=partition,
                    offset=0,
                    ts_ms=ts_ms,
                    feedback_id=feedback_id,
                    client_id="fb-order",
                )
            )
            await producer.send_and_wait(
                topic, value, partition=partition, timestamp_ms=ts_ms
            )
    finally:
        await producer.stop()


def _read(settings: Settings, *args: str) -> tuple[list[str], str]:
    from evaluation.process import settings_env
    from gateway.cli import app

    result = CliRunner().invoke(
        app, ["feedback", "rejected", *args], env=settings_env(settings)
    )
    assert result.exit_code == 0, result.output
    ids = [
        line.split()[2]
        for line in result.stdout.splitlines()
        if "UNKNOWN_LABEL" in line
    ]
    return ids, result.stderr


def test_rejected_records_print_oldest_first_across_partitions(
    rejected_settings: Settings,
) -> None:
    # Partition 2 holds the oldest and the newest, partition 0 the middle
    # ones: partition order and timestamp order disagree.
    asyncio.run(
        _put(
            rejected_settings,
            [
                (2, T0_MS + 1_000, "first"),
                (0, T0_MS + 2_000, "second"),
                (1, T0_MS + 3_000, "third"),
                (0, T0_MS + 4_000, "fourth"),
                (2, T0_MS + 5_000, "fifth"),
            ],
        )
    )
    ids, summary = _read(rejected_settings)
    assert ids == ["first", "second", "third", "fourth", "fifth"], ids
    assert "5 rejected records on" in summary, summary
    ids, summary = _read(rejected_settings, "--limit", "2")
    assert ids == ["first", "second"], ids
    assert "2 rejected records on" in summary, summary
    ids, summary = _read(rejected_settings, "--limit", "1")
    assert ids == ["first"], ids
    assert "1 rejected record on" in summary, summary
