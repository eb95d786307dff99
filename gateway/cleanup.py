"""Best-effort removal of what one benchmark run made: its topics and keys.

Benchmarks run on topics, a consumer group and a Redis key prefix of their own
(gateway/bench.py, gateway/frontdoor/bench.py, gateway/fingerprint_bench.py)
and remove them when done. A failure here is logged and the results stand:
the leftover keys expire by themselves and the topics are named by run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from redis.exceptions import RedisError

from gateway.config import Settings
from gateway.errors import BrokerError
from gateway.store import RedisClient, redis_from_settings
from gateway.topics import delete_topics

logger = logging.getLogger(__name__)

# Keys listed per SCAN step and unlinked per command.
_KEYS_PER_CALL = 1000


async def unlink_matching(redis: RedisClient, match: str) -> int:
    """Unlink every key matching the glob ``match``; returns how many.

    The caller bounds the time (``asyncio.timeout``): a large keyspace takes
    one SCAN step per 1,000 keys.
    """
    keys = [k async for k in redis.scan_iter(match=match, count=_KEYS_PER_CALL)]
    for start in range(0, len(keys), _KEYS_PER_CALL):
        await redis.unlink(*keys[start : start + _KEYS_PER_CALL])
    return len(keys)


async def delete_run_data(settings: Settings, topics: Sequence[str]) -> None:
    """Delete ``topics`` and every Redis key under ``redis.key_prefix``,
    the fingerprint store's included.

    Connecting to Kafka, and the whole key deletion, each take at most
    ``kafka.request_timeout_s``; a failure of either is logged at WARNING, not
    raised.
    """
    try:
        await delete_topics(settings, list(topics))
    except BrokerError as exc:
        logger.warning(
            "bench topics not deleted: %r", exc, extra={"topics": list(topics)}
        )

    redis = redis_from_settings(settings)
    try:
        async with asyncio.timeout(settings.kafka.request_timeout_s):
            prefix = settings.redis.key_prefix
            await unlink_matching(redis, f"{prefix}:*")
            # The fingerprint store's keys share one hash tag, so they start
            # with "{" (gateway/fingerprints.py).
            await unlink_matching(redis, f"{{{prefix}:fp}}:*")
            # And the region store's (gateway/regions.py).
            await unlink_matching(redis, f"{{{prefix}:rg}}:*")
    except (RedisError, OSError, TimeoutError) as exc:
        logger.warning("bench redis keys not all deleted: %r", exc)
    finally:
        await redis.aclose()
