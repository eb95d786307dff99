"""The policy ladder: resolution per model and plan, escalation, cool-down with
a controlled clock, shadow per rule and per detector, hidden suspicion."""

from __future__ import annotations

from typing import Any

import pytest

from detectors import DetectorScore
from gateway.config import PolicyConfig
from gateway.policy import Policy


class Clock:
    def __init__(self) -> None:
        self.now_s = 1_000.0

    def __call__(self) -> float:
        return self.now_s


def _score(
    value: float, detector: str = "ood", threshold: float = 0.5
) -> DetectorScore:
    return DetectorScore(
        detector=detector,
        score=value,
        threshold=threshold,
        flagged=value >= threshold,
        evidence=f"score {value}",
        warm=True,
    )


HOT = [_score(0.6)]  # risk 1.2: flagged
COLD = [_score(0.1)]  # risk 0.2

LADDER: list[dict[str, Any]] = [
    {"action": "flag", "risk_at": 1.0},
    {"action": "degrade", "after_flags": 2, "degrade": "rounded"},
    {"action": "block", "after_flags": 4},
]


def _policy(clock: Clock | None = None, **config: Any) -> Policy:
    return Policy(PolicyConfig(**config), clock=clock or Clock())


def test_flag_then_degrade_then_block_on_memory() -> None:
    policy = _policy(rules=LADDER, block_cooldown_s=10)
    verdicts = [policy.decide("c", HOT) for _ in range(4)]
    assert [v.enforced for v in verdicts] == ["flag", "degrade", "degrade", "block"]
    assert verdicts[1].degrade == "rounded"
    assert verdicts[3].cooldown_s == 10
    # Memory rules hold on clean queries too: a degraded client stays degraded.
    other = _policy(rules=LADDER)
    other.decide("d", HOT)
    other.decide("d", HOT)
    assert other.decide("d", COLD).enforced == "degrade"


def test_block_cools_down_and_releases_with_the_clock() -> None:
    clock = Clock()
    policy = _policy(clock, rules=LADDER, block_cooldown_s=5)
    for _ in range(4):
        policy.decide("c", HOT)
    clock.now_s += 4.0
    blocked = policy.decide("c", COLD)
    assert blocked.enforced == "block"
    assert any("cool-down" in r for r in blocked.reasons)
    clock.now_s += 1.5
    # Released, and escalation starts over: one flag is just a flag.
    assert policy.decide("c", COLD).enforced == "allow"
    assert policy.decide("c", HOT).enforced == "flag"


def test_flags_decay_with_half_life() -> None:
    clock = Clock()
    policy = _policy(clock, rules=LADDER, flag_half_life_s=10)
    policy.decide("c", HOT)
    clock.now_s += 30.0  # one flag decays to 1/8
    assert policy.decide("c", HOT).enforced == "flag"  # 1.125 < 2
    no_decay = _policy(clock, rules=LADDER)
    no_decay.decide("c", HOT)
    clock.now_s += 30.0
    assert no_decay.decide("c", HOT).enforced == "degrade"


def test_most_specific_override_wins() -> None:
    config = PolicyConfig(
        rules=[{"action": "flag", "risk_at": 1.0}],
        plans={"free": {"rules": [{"action": "throttle", "risk_at": 1.0}]}},
        models={"secret": {"rules": [{"action": "block", "risk_at": 1.0}]}},
    )
    policy = Policy(config, clock=Clock())
    assert policy.decide("a", HOT, model="digits", plan="default").action == "flag"
    assert policy.decide("b", HOT, model="digits", plan="free").action == "throttle"
    assert policy.decide("c", HOT, model="secret", plan="free").action == "block"
    # Fields not overridden come from the level below.
    assert config.resolve("secret", "free").block_cooldown_s == 600.0


def test_shadow_rule_records_but_does_not_enforce() -> None:
    rules = [
        {"action": "flag", "risk_at": 1.0},
        {"action": "block", "risk_at": 1.1, "shadow": True},
    ]
    policy = _policy(rules=rules)
    verdict = policy.decide("c", HOT)
    assert (verdict.action, verdict.enforced, verdict.shadow) == (
        "block",
        "flag",
        True,
    )
    # The would-be track keeps its own cool-down; the live one is not blocked.
    assert policy.decide("c", COLD).action == "block"
    assert policy.decide("c", COLD).enforced == "allow"


def test_shadow_detector_counts_for_would_be_risk_only() -> None:
    policy = _policy(
        rules=[{"action": "block", "risk_at": 1.0}], shadow_detectors=["prada"]
    )
    verdict = policy.decide("c", [_score(0.1), _score(0.9, detector="prada")])
    assert verdict.action == "block"
    assert verdict.risk == pytest.approx(1.8)
    assert verdict.enforced_risk == pytest.approx(0.2)
    assert verdict.enforced == "flag" and verdict.shadow
    assert not policy.good_standing("c")


def test_global_shadow_enforces_nothing() -> None:
    policy = _policy(rules=LADDER, shadow=True)
    enforced = {policy.decide("c", HOT).enforced for _ in range(6)}
    assert enforced == {"flag"}


def test_throttle_sets_rate_factor_until_it_expires() -> None:
    clock = Clock()
    policy = _policy(
        clock,
        rules=[{"action": "throttle", "risk_at": 1.0}],
        throttle_factor=8,
        throttle_s=20,
    )
    assert policy.rate_factor("c") == 1.0
    assert policy.decide("c", HOT).enforced == "throttle"
    assert policy.rate_factor("c") == 8.0
    assert policy.decide("c", COLD).enforced == "throttle"
    clock.now_s += 21
    assert policy.rate_factor("c") == 1.0
    assert policy.decide("c", COLD).enforced == "allow"


def test_hidden_suspicion_turns_refusals_into_slow_degraded_answers() -> None:
    policy = _policy(
        rules=[{"action": "block", "risk_at": 1.0}],
        hide_suspicion=True,
        hide_delay_s=0.5,
        hide_degrade="label",
    )
    verdict = policy.decide("c", HOT)
    assert verdict.action == "block"
    assert (verdict.enforced, verdict.degrade, verdict.delay_s) == (
        "degrade",
        "label",
        0.5,
    )
    assert verdict.hidden and not verdict.shadow
    # A hidden throttle needs no bucket: the delay is the slowing.
    throttled = _policy(
        rules=[{"action": "throttle", "risk_at": 1.0}], hide_suspicion=True
    )
    assert throttled.decide("c", HOT).enforced == "degrade"
    assert throttled.rate_factor("c") == 1.0
    # Nor does a mere flag show in the answer when suspicion is hidden.
    flagged = _policy(rules=[{"action": "flag", "risk_at": 1.0}], hide_suspicion=True)
    verdict = flagged.decide("c", HOT)
    assert verdict.enforced == "flag" and verdict.hidden and verdict.delay_s == 0
    assert not flagged.decide("d", COLD).hidden


def test_reconfigure_keeps_client_memory() -> None:
    policy = _policy(rules=LADDER)
    policy.decide("c", HOT)
    stricter = [
        {"action": "flag", "risk_at": 1.0},
        {"action": "block", "after_flags": 2},
    ]
    policy.reconfigure(PolicyConfig(rules=stricter))
    assert policy.decide("c", HOT).enforced == "block"


def test_state_round_trip_keeps_tracks() -> None:
    clock = Clock()
    first = _policy(clock, rules=LADDER)
    first.decide("c", HOT)
    blob = first.dump_state("c")
    assert blob is not None
    second = _policy(clock, rules=LADDER)
    second.load_state("c", blob)
    assert second.decide("c", HOT).enforced == "degrade"


def test_a_rule_needs_a_trigger() -> None:
    from gateway.config import load_settings
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError, match="risk_at or after_flags"):
        load_settings(policy={"rules": [{"action": "flag"}]})


def test_a_bad_override_fails_at_load() -> None:
    from gateway.config import load_settings
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError, match="block_at must be >= flag_at"):
        load_settings(policy={"flag_at": 1.0, "models": {"m": {"block_at": 0.5}}})


def test_snapshot_from_before_the_ladder_keeps_its_flags() -> None:
    import msgspec

    old = msgspec.msgpack.encode({"flags": 2, "queries": 9, "first_flag_query": 3})
    policy = _policy()  # default ladder: block after 3 flags
    policy.load_state("c", old)
    assert not policy.good_standing("c")
    assert policy.decide("c", HOT).enforced == "block"


def test_standing_judges_memory_alone_and_changes_nothing() -> None:
    clock = Clock()
    policy = _policy(clock, rules=LADDER, block_cooldown_s=5)
    assert policy.standing("c") is None
    policy.decide("c", HOT)
    assert policy.standing("c") is None  # one flag: memory says allow
    policy.decide("c", HOT)
    degraded = policy.standing("c")
    assert degraded is not None and degraded.enforced == "degrade"
    assert degraded.degrade == "rounded"
    blob = policy.dump_state("c")
    policy.standing("c")
    assert policy.dump_state("c") == blob  # looking counted nothing
    policy.decide("c", HOT)
    policy.decide("c", HOT)  # fourth flag: block
    blocked = policy.standing("c")
    assert blocked is not None and blocked.enforced == "block"
    assert blocked.cooldown_s == 0  # not a new block to store
    clock.now_s += 6
    assert policy.standing("c") is None


def test_standing_of_a_hidden_block_is_a_slow_degraded_answer() -> None:
    policy = _policy(
        rules=[{"action": "block", "risk_at": 1.0}], hide_suspicion=True, hide_delay_s=2
    )
    policy.decide("c", HOT)
    standing = policy.standing("c")
    assert standing is not None
    assert (standing.action, standing.enforced, standing.delay_s) == (
        "block",
        "degrade",
        2,
    )
