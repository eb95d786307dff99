"""A live change of the limits reaches the policy throttle as well as admission."""

from __future__ import annotations

from gateway.config import PlanConfig, RateRule, load_settings
from gateway.store import redis_from_settings
from gateway.throttle import ThrottleStore, plan_rate
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


def test_plan_rate_is_the_slowest_rule() -> None:
    plan = PlanConfig(
        rules=(
            RateRule(limit=100, window_s=1.0, burst=50),
            RateRule(limit=600, window_s=60.0),
            RateRule(limit=100_000, window_s=86_400.0),
        )
    )
    rate, burst = plan_rate(plan) or (0.0, 0)
    assert abs(rate - 100_000 / 86_400) < 1e-12
    assert burst == 100_000
    assert plan_rate(PlanConfig(rules=())) is None
