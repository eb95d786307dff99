"""A benchmark's clean-up removes everything its run wrote to Redis, the
fingerprint store's hash-tagged keys included, and nothing of another run;
the test session's clean-up does the same for its isolated runs' topics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from gateway.cleanup import delete_run_data
from gateway.config import Settings
from gateway.store import redis_from_settings
from gateway.topics import (
    ensure_audit_topic,
    ensure_compacted_topic,
    ensure_topics,
)
from tests.conftest import StackInfo
from tests.integration import helpers
from tests.integration.helpers import isolated_settings

pytestmark = pytest.mark.integration


async def test_run_data_removal_takes_fingerprint_keys_too(
    stack: StackInfo, models_dir: Path
) -> None:
    mine = isolated_settings(stack.kafka_bootstrap, stack.redis_url, models_dir)
    other = isolated_settings(stack.kafka_bootstrap, stack.redis_url, models_dir)
    prefix, other_prefix = mine.redis.key_prefix, other.redis.key_prefix
    mine_keys = [f"{prefix}:{{c:a}}:tat:1000", f"{{{prefix}:fp}}:h:00ff"]
    other_keys = [f"{other_prefix}:{{c:a}}:tat:1000", f"{{{other_prefix}:fp}}:seq"]
    redis = redis_from_settings(mine)
    try:
        for key in mine_keys + other_keys:
            await redis.set(key, b"1", ex=300)
        await delete_run_data(mine, [])
        assert [await redis.exists(k) for k in mine_keys] == [0, 0]
        assert [await redis.exists(k) for k in other_keys] == [1, 1]
    finally:
        await redis.delete(*other_keys)
        await redis.aclose()


async def test_a_sessions_isolated_runs_leave_no_topics_or_keys(
    stack: StackInfo, models_dir: Path
) -> None:
    mine = isolated_settings(stack.kafka_bootstrap, stack.redis_url, models_dir)
    other = isolated_settings(stack.kafka_bootstrap, stack.redis_url, models_dir)
    # Registered, so the session's end deletes them (tests/conftest.py).
    assert mine in helpers._ISOLATED and other in helpers._ISOLATED
    await ensure_topics(mine)
    await ensure_compacted_topic(mine, mine.live.topic)
    await ensure_audit_topic(mine)
    mine_topics = helpers.isolated_topics(mine)
    assert mine.kafka.topics.audit in mine_topics
    mine_keys = [
        f"{mine.redis.key_prefix}:{{c:a}}:tat:1000",
        f"{{{mine.redis.key_prefix}:fp}}:h:1",
    ]
    other_key = f"{other.redis.key_prefix}:{{c:a}}:tat:1000"
    redis = redis_from_settings(mine)
    try:
        for key in [*mine_keys, other_key]:
            await redis.set(key, b"1", ex=300)
        # Created topics reach the broker's metadata cache a moment after the
        # create call returns (KRaft); wait for them to be listed, as below for
        # their deletion.
        deadline = asyncio.get_running_loop().time() + 30.0
        while not set(mine_topics) <= set(await list_topics(mine)):
            assert asyncio.get_running_loop().time() < deadline, "topics not listed"
            await asyncio.sleep(0.2)

        asked, unlinked = await helpers.drop_runs([mine])

        assert (asked, unlinked) == (len(mine_topics), 2)
        assert [await redis.exists(k) for k in mine_keys] == [0, 0]
        assert await redis.exists(other_key) == 1
        deadline = asyncio.get_running_loop().time() + 30.0
        while set(mine_topics) & set(await list_topics(mine)):
            assert asyncio.get_running_loop().time() < deadline, "topics still listed"
            await asyncio.sleep(0.2)
    finally:
        await redis.delete(other_key)
        await redis.aclose()


async def list_topics(settings: Settings) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await admin.start()
    try:
        return list(await admin.list_topics())
    finally:
        await admin.close()
