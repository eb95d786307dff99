"""A live change of the limits reaches the policy throttle as well as admission."""

from __future__ import annotations

from gateway.config import load_settings
from gateway.store import redis_from_settings
from gateway.throttle import ThrottleStore
from gateway.worker import Worker


async def test_worker_set_limits_reaches_the_throttle() -> None:
    settings = load_settings(limits={"rate_per_s": 50, "burst": 100})
    worker = Worker(settings)
    redis = redis_from_settings(settings)  # never connects: no call is made
    try:
        throttle = ThrottleStore(redis, settings)
        worker._throttle = throttle
        worker.set_limits(settings.limits.model_copy(update={"rate_per_s": 5.0}))
        assert throttle._rate_per_s == 5.0
        assert throttle._burst == 100
    finally:
        await redis.aclose()
