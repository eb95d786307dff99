"""Policy on fused, decaying risk and on a linked group's risk."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from detectors import DetectorScore
from gateway.batch import BatchItem
from gateway.config import PolicyConfig
from gateway.policy import GROUP, Policy


class Clock:
    def __init__(self) -> None:
        self.now_s = 1_000.0

    def __call__(self) -> float:
        return self.now_s


def s(name: str, value: float, threshold: float = 0.5) -> DetectorScore:
    return DetectorScore(
        name, value, threshold, value >= threshold, f"{name} said so", True
    )


def test_risk_decays_with_half_life_and_names_top_detectors() -> None:
    clock = Clock()
    policy = Policy(PolicyConfig(risk_half_life_s=60.0, block_at=100.0), clock=clock)
    first = policy.decide("c", [s("ood", 0.9), s("margin", 0.6), s("knn", 0.1)])
    assert first.action == "flag"
    assert first.risk == 1.8
    assert [name for name, _ in first.top] == ["ood", "margin", "knn"]
    clock.now_s += 60.0
    calm = policy.decide("c", [s("ood", 0.0), s("margin", 0.0)])
    # Remembered, halved, and not a new flag: no detector flagged this query.
    assert calm.risk == 0.9 and calm.action == "allow"
    clock.now_s += 600.0
    assert policy.decide("c", [s("ood", 0.1)]).risk == 0.2


def test_no_half_life_is_the_query_alone() -> None:
    policy = Policy(PolicyConfig(risk_half_life_s=0.0, block_at=100.0), clock=Clock())
    assert policy.decide("c", [s("ood", 0.9)]).risk == 1.8
    assert policy.decide("c", [s("ood", 0.1)]).risk == 0.2


def test_detector_weights_scale_contributions() -> None:
    policy = Policy(PolicyConfig(detector_weights={"traffic": 0.5}), clock=Clock())
    verdict = policy.decide("c", [s("traffic", 0.75)])
    assert verdict.risk == 0.75 and verdict.action == "allow"


def test_group_risk_drives_a_quiet_member() -> None:
    clock = Clock()
    policy = Policy(PolicyConfig(flag_at=1.0, block_at=1.5), clock=clock)
    assert policy.decide("quiet", [s("ood", 0.1)]).action == "allow"
    policy.note_group("quiet", "loud", 2.0)
    verdict = policy.decide("quiet", [s("ood", 0.1)])
    assert verdict.action == "block"
    assert verdict.risk == 2.0 and verdict.top[0] == (GROUP, 2.0)
    assert [f.detector for f in verdict.flagged] == [GROUP]
    assert not policy.good_standing("quiet")


def test_group_risk_can_be_shadowed_or_turned_off() -> None:
    shadowed = Policy(PolicyConfig(shadow_detectors=[GROUP]), clock=Clock())
    shadowed.note_group("quiet", "loud", 2.0)
    verdict = shadowed.decide("quiet", [s("ood", 0.1)])
    assert verdict.action == "block" and verdict.enforced == "flag" and verdict.shadow

    off = Policy(PolicyConfig(group_risk=False), clock=Clock())
    off.note_group("quiet", "loud", 2.0)
    assert off.decide("quiet", [s("ood", 0.1)]).action == "allow"


def test_a_group_made_risky_by_the_client_itself_adds_nothing() -> None:
    clock = Clock()
    policy = Policy(PolicyConfig(block_at=100.0, block_after_flags=100), clock=clock)
    assert policy.decide("loud", [s("ood", 0.9)]).action == "flag"
    policy.note_group("loud", "loud", 1.8)
    clock.now_s += 1.0
    verdict = policy.decide("loud", [s("ood", 0.0)])
    assert verdict.action == "allow" and not verdict.flagged


def test_group_risk_decays() -> None:
    clock = Clock()
    policy = Policy(PolicyConfig(risk_half_life_s=60.0), clock=clock)
    policy.note_group("quiet", "loud", 1.2)
    clock.now_s += 60.0
    verdict = policy.decide("quiet", [s("ood", 0.0)])
    assert verdict.risk == 0.6 and verdict.action == "allow"


def test_scorer_note_groups_keeps_the_largest_group_risk_per_client() -> None:
    from gateway.scoring import Scorer

    recorded: list[tuple[str, str | None, float]] = []

    class Recorder:
        def note_group(self, client: str, group: str | None, risk: float) -> None:
            recorded.append((client, group, risk))

    def item(client: str, group: str | None, risk: float) -> BatchItem:
        it = BatchItem("t", 0, 0, b"", "", None)
        it.envelope = None
        it.verdict = Policy(PolicyConfig()).decide(client, [])
        it.group_id, it.group_risk = group, risk
        return it

    scorer = Scorer.__new__(Scorer)
    scorer.policy = Recorder()  # type: ignore[assignment]
    items = [item("a", "g", 0.5), item("a", "g", 1.5), item("b", None, 0.0)]
    for it, client in zip(items, ["a", "a", "b"], strict=True):
        it.key = cast(Any, SimpleNamespace(client_id=client, plan=None, key_id=client))
    scorer.note_groups(items)
    assert sorted(recorded) == [("a", "g", 1.5), ("b", None, 0.0)]
