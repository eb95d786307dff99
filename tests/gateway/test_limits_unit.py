"""Pure parts of the limits: plan configuration and its rejections, plan
compilation and overrides, and the local limiter used without Redis."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import LimitsConfig, PlanConfig, load_settings
from gateway.errors import ERROR_CODES, ConfigError
from gateway.keys import canonical_overrides
from gateway.limits import LocalLimiter
from gateway.store import AdmitItem, apply_overrides, compile_plan


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
    return LocalLimiter(clock), compile_plan(limits, limits.plan("p"))


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


def test_new_codes_are_documented() -> None:
    for code in ("QUOTA_EXCEEDED", "TOO_MANY_IN_FLIGHT", "STORE_UNAVAILABLE"):
        assert code in ERROR_CODES
