"""Pure parts of the limits: plan configuration and its rejections, plan
compilation and overrides, and the local limiter used without Redis."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter
from redis.asyncio import Redis

from gateway.config import LimitsConfig, PlanConfig, load_settings
from gateway.errors import ERROR_CODES, ConfigError, StoreError
from gateway.keys import canonical_overrides
from gateway.limits import Admitter, LocalLimiter
from gateway.store import (
    Admission,
    AdmitItem,
    CounterStore,
    apply_overrides,
    compile_plan,
)


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        ({"plans": {"p": {"rules": [{"limit": 0, "window_s": 1}]}}}, "limit"),
        ({"plans": {"p": {"rules": [{"limit": 1, "window_s": 0}]}}}, "window_s"),
        (
            {"plans": {"p": {"rules": [{"limit": 1, "window_s": 1, "burst": 0}]}}},
            "burst",
        ),
        (
            {"plans": {"p": {"rules": [{"limit": 1, "window_s": 1}] * 2}}},
            "same window_s",
        ),
        ({"plans": {"p": {"quota": {"daily": 0}}}}, "daily"),
        ({"plans": {"p": {"in_flight": {"limit": 0}}}}, "in_flight"),
        ({"plans": {"p": {"fail_mode": "maybe"}}}, "fail_mode"),
        ({"fail_mode": "sometimes"}, "fail_mode"),
        ({"plans": {"bad name": {}}}, "plans"),
        ({"plans": {"p": {"rulez": []}}}, "rulez"),
    ],
)
def test_bad_limits_are_refused(limits: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(limits=limits)
    assert info.value.code == "CONFIG_INVALID"
    assert field in info.value.message, info.value.message


def test_default_plan_is_the_old_single_limit() -> None:
    limits = load_settings(limits={"rate_per_s": 7, "burst": 3}).limits
    (rule,) = limits.plan("default").rules
    assert (rule.limit, rule.window_s, rule.effective_burst) == (7, 1.0, 3)
    assert limits.plan("unknown") == limits.plan("default")


def test_compiled_fail_modes_inherit() -> None:
    limits = LimitsConfig.model_validate(
        {
            "fail_mode": "closed",
            "plans": {
                "p": {
                    "fail_mode": "open",
                    "rules": [
                        {"limit": 1, "window_s": 1},
                        {"limit": 9, "window_s": 60, "fail_mode": "retry"},
                    ],
                    "quota": {"daily": 5},
                    "in_flight": {"limit": 2},
                },
                "empty": {},
            },
        }
    )
    plan = compile_plan(limits, limits.plan("p"))
    assert plan.fail_modes == ("open", "retry", "open", "open")
    assert plan.tat_suffixes == ("tat:1000", "tat:60000")
    assert compile_plan(limits, limits.plan("empty")).fail_modes == ("closed",)


def test_overrides_replace_whole_fields() -> None:
    plan = PlanConfig.model_validate(
        {"rules": [{"limit": 5, "window_s": 1}], "quota": {"daily": 10}}
    )
    changed = apply_overrides(plan, canonical_overrides({"quota": {"daily": 99}}))
    assert changed.quota is not None and changed.quota.daily == 99
    assert changed.rules == plan.rules
    assert apply_overrides(plan, "") is plan
    with pytest.raises(ValueError):
        apply_overrides(plan, "[1]")
    with pytest.raises(ValueError):
        canonical_overrides({"quota": {"daily": -1}})
    assert canonical_overrides({"quota": {"daily": 1}}) == ('{"quota":{"daily":1}}')


class FakeClock:
    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def local(plan: dict[str, Any], clock: FakeClock) -> tuple[LocalLimiter, Any]:
    limits = LimitsConfig.model_validate({"plans": {"p": plan}})
    return LocalLimiter(backlog_s=900.0, clock_s=clock), compile_plan(
        limits, limits.plan("p")
    )


def test_local_limiter_applies_rate_quota_and_in_flight() -> None:
    clock = FakeClock(86_400.0 * 100 + 86_399.0)  # one second before midnight
    limiter, plan = local(
        {
            "rules": [{"limit": 8, "window_s": 1, "burst": 4, "local_fraction": 0.5}],
            "quota": {"daily": 3},
            "in_flight": {"limit": 2},
        },
        clock,
    )
    item = AdmitItem("c", "r", "0:0", plan="p")
    first = [limiter.decide(item, plan).outcome for _ in range(3)]
    # burst 4 x 0.5 = 2 at once; then the in-flight cap would also bind.
    assert first == ["ok", "ok", "rate_limited"]
    clock.now_s += 0.25  # one local interval (1 / (8 x 0.5) s)
    decision = limiter.decide(item, plan)
    assert decision.outcome == "too_many_in_flight"  # 2 held
    limiter.release("c")
    decision = limiter.decide(item, plan)
    assert decision.outcome == "ok" and decision.without_store and decision.in_flight
    limiter.release("c")
    clock.now_s += 0.375
    quota = limiter.decide(item, plan)
    assert quota.outcome == "quota_exceeded"
    assert quota.retry_after_ms == 375  # until midnight UTC
    clock.now_s += 0.375
    assert limiter.decide(item, plan).outcome == "ok"  # a new day


async def test_without_redis_a_backlog_is_judged_over_the_replay_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """admit.lua judges a request at its broker time, no further back than
    auth.replay_window_s; the local limiter standing in for it must use the
    same bound, not one of its own (it used a fixed 300 s)."""
    settings = load_settings(
        auth={"replay_window_s": 1200},
        limits={
            "plans": {
                "default": {
                    "rules": [{"limit": 1, "window_s": 1, "burst": 1}],
                    "fail_mode": "open",
                }
            }
        },
    )
    # Never connected: admit_batch is replaced by a Redis outage below. The
    # address is loopback all the same, so nothing could leave the machine.
    store = CounterStore(Redis(host="127.0.0.1", port=36379), settings)

    async def redis_down(items: Sequence[AdmitItem]) -> list[Admission]:
        raise StoreError("redis unreachable (test)")

    monkeypatch.setattr(store, "admit_batch", redis_down)
    counter = Counter("t", "t", ["mode"], registry=CollectorRegistry())
    admitter = Admitter(store, counter)

    def sent(client: str, seconds_ago: float, n: int) -> AdmitItem:
        return AdmitItem(
            client, f"r{n}", f"0:{n}", sent_us=(time.time() - seconds_ago) * 1e6
        )

    # Sent 1000 s and 998 s ago, inside the 1200 s window: judged 2 s apart,
    # so both pass a 1/s bucket (a 300 s bound judged both at now - 300 s,
    # the second refused).
    inside = await admitter.admit([sent("a", 1000, 0), sent("a", 998, 1)])
    assert [a.outcome for a in inside] == ["ok", "ok"], inside
    assert all(a.without_store for a in inside)
    # Older than the window: both judged at now - 1200 s, as admit.lua would.
    beyond = await admitter.admit([sent("b", 1500, 2), sent("b", 1400, 3)])
    assert [a.outcome for a in beyond] == ["ok", "rate_limited"], beyond


def test_local_limiter_refuses_a_backlog_bound_that_is_not_one() -> None:
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="backlog_s"):
            LocalLimiter(backlog_s=bad)


def test_new_codes_are_documented() -> None:
    for code in ("QUOTA_EXCEEDED", "TOO_MANY_IN_FLIGHT", "STORE_UNAVAILABLE"):
        assert code in ERROR_CODES
