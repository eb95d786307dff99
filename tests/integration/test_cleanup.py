"""A benchmark's clean-up removes everything its run wrote to Redis, the
fingerprint store's hash-tagged keys included, and nothing of another run."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cleanup import delete_run_data
from gateway.store import redis_from_settings
from tests.conftest import StackInfo
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
