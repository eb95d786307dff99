from __future__ import annotations

from detectors import DetectorScore
from gateway.config import PolicyConfig
from gateway.policy import Policy


def _score(value: float, *, threshold: float = 0.5, warm: bool = True) -> DetectorScore:
    return DetectorScore(
        detector="similarity",
        score=value,
        threshold=threshold,
        flagged=warm and value >= threshold,
        evidence=f"score {value}",
        warm=warm,
    )


def test_below_threshold_is_allowed() -> None:
    policy = Policy(PolicyConfig())
    verdict = policy.decide("c", [_score(0.2)])
    assert (verdict.action, verdict.enforced) == ("allow", "allow")
    assert verdict.risk == 0.4
    assert policy.good_standing("c")


def test_cold_detector_never_flags() -> None:
    policy = Policy(PolicyConfig())
    verdict = policy.decide("c", [_score(0.9, warm=False)])
    assert verdict.action == "allow"
    assert verdict.risk == 0.0


def test_flags_then_blocks_after_repeated_flags() -> None:
    policy = Policy(PolicyConfig(flag_at=1.0, block_at=10.0, block_after_flags=3))
    actions = [policy.decide("c", [_score(0.6)]).action for _ in range(3)]
    assert actions == ["flag", "flag", "block"]
    assert not policy.good_standing("c")
    assert policy.good_standing("other")


def test_high_risk_blocks_at_once() -> None:
    policy = Policy(PolicyConfig(flag_at=1.0, block_at=1.5))
    verdict = policy.decide("c", [_score(0.8)])
    assert verdict.action == "block"
    assert verdict.reasons == ("similarity: score 0.8",)


def test_shadow_mode_records_but_never_enforces() -> None:
    policy = Policy(PolicyConfig(flag_at=1.0, block_at=1.5, shadow=True))
    verdict = policy.decide("c", [_score(0.8)])
    assert verdict.action == "block"
    assert verdict.enforced == "flag"
    assert verdict.shadow


def test_state_round_trip_keeps_flag_count() -> None:
    config = PolicyConfig(flag_at=1.0, block_at=10.0, block_after_flags=2)
    first = Policy(config)
    first.decide("c", [_score(0.6)])
    blob = first.dump_state("c")
    assert blob is not None

    second = Policy(config)
    second.load_state("c", blob)
    assert second.decide("c", [_score(0.6)]).action == "block"
    assert first.dump_state("nobody") is None
