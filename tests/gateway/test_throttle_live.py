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
    # The tightest burst of the three (see the regression test below).
    assert burst == 50
    assert plan_rate(PlanConfig(rules=())) is None


def test_a_long_windows_burst_does_not_excuse_a_throttled_client() -> None:
    """Regression test: the penalty took the slowest rule's burst too. A day
    rule of 100,000 (burst 100,000 by default) then let a client throttled
    by 4 send 25,000 requests at the per-second rule's full speed before the
    penalty bit: longer than the 60 s throttle lasts, so it did nothing. The
    burst must be the tightest of the plan's rules."""
    plan = PlanConfig(
        rules=(
            RateRule(limit=100, window_s=1.0, burst=50),
            RateRule(limit=100_000, window_s=86_400.0),
        )
    )
    rate, burst = plan_rate(plan) or (0.0, 0)
    assert abs(rate - 100_000 / 86_400) < 1e-12
    assert burst == 50
