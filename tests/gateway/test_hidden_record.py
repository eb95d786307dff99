"""A block or throttle served hidden has a record of its own in Redis, so that
losing the policy's memory of it (a policy part refused, a snapshot deleted)
does not lift it: the verdict names what it hides, the policy takes it back
from the record, and the worker writes the record only when Redis lacks it.
Release markers and the record come back with each admission decision.
Through a real worker, Kafka and Redis: tests/integration/test_hidden_record.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from gateway import enforce
from gateway._admission import parse_reply
from gateway.batch import BatchItem
from gateway.clientview import ClientView
from gateway.config import PolicyConfig, load_settings
from gateway.keys import ApiKey
from gateway.policy import Policy, Verdict
from gateway.store import Admission, HiddenAction
from tests.gateway.test_ladder import COLD, HOT, Clock

HIDE: dict[str, Any] = {
    "rules": [{"action": "block", "risk_at": 1.0}],
    "block_cooldown_s": 60,
    "hide_suspicion": True,
    "hide_delay_s": 0.5,
    "hide_degrade": "label",
}


def _policy(clock: Clock, **config: Any) -> Policy:
    return Policy(PolicyConfig(**config), clock=clock)


# -- the verdict names what it hides ---------------------------------------------


def test_a_hidden_block_names_its_action_and_the_time_left() -> None:
    clock = Clock()
    policy = _policy(clock, **HIDE)
    first = policy.decide("c", HOT)
    assert first.enforced == "degrade" and first.hidden
    assert (first.hidden_action, first.hidden_s) == ("block", 60.0)
    clock.now_s += 20
    later = policy.decide("c", COLD)
    assert (later.hidden_action, later.hidden_s) == ("block", 40.0)
    # A redelivered record's standing names it too.
    standing = policy.standing("c")
    assert standing is not None and standing.hidden_action == "block"
    clock.now_s += 41
    assert policy.decide("c", COLD).hidden_action is None


def test_a_hidden_throttle_names_its_action() -> None:
    policy = _policy(
        Clock(),
        rules=[{"action": "throttle", "risk_at": 1.0}],
        throttle_s=30,
        hide_suspicion=True,
    )
    verdict = policy.decide("c", HOT)
    assert (verdict.hidden_action, verdict.hidden_s) == ("throttle", 30.0)


@pytest.mark.parametrize(
    "config",
    [
        # Visible: the Redis block key is its record.
        {**HIDE, "hide_suspicion": False},
        # Shadow: nothing is enforced, so nothing is recorded.
        {**HIDE, "shadow": True},
        {**HIDE, "rules": [{"action": "block", "risk_at": 1.0, "shadow": True}]},
        {**HIDE, "shadow_detectors": ["ood"]},
    ],
    ids=["visible", "shadow", "shadow-rule", "shadow-detector"],
)
def test_only_an_enforced_hidden_block_is_named(config: dict[str, Any]) -> None:
    verdict = _policy(Clock(), **config).decide("c", HOT)
    assert verdict.action == "block"
    assert verdict.hidden_action is None and verdict.hidden_s == 0.0


# -- the policy takes it back from the record ----------------------------------------


def test_a_lost_hidden_block_is_restored_from_its_record() -> None:
    clock = Clock()
    policy = _policy(clock, **HIDE)
    # The memory is gone (a fresh policy); the record says 30 s are left.
    policy.restore_hidden("c", "block", 30.0)
    verdict = policy.decide("c", COLD)
    assert (verdict.action, verdict.enforced) == ("block", "degrade")
    assert verdict.hidden and verdict.degrade == "label" and verdict.delay_s == 0.5
    assert verdict.cooldown_s == 0.0  # never a visible block key
    assert not verdict.shadow
    assert not policy.good_standing("c")
    clock.now_s += 31
    assert policy.decide("c", COLD).enforced == "allow"


def test_a_record_never_shortens_the_memory() -> None:
    clock = Clock()
    policy = _policy(clock, **HIDE)
    policy.decide("c", HOT)  # 60 s
    policy.restore_hidden("c", "block", 5.0)
    clock.now_s += 30
    assert policy.decide("c", COLD).hidden_s == pytest.approx(30.0)


def test_a_lost_hidden_throttle_is_restored_without_a_bucket() -> None:
    clock = Clock()
    policy = _policy(
        clock, rules=[{"action": "flag", "risk_at": 1.0}], hide_suspicion=True
    )
    policy.restore_hidden("c", "throttle", 10.0)
    verdict = policy.decide("c", COLD)
    assert (verdict.action, verdict.enforced, verdict.hidden) == (
        "throttle",
        "degrade",
        True,
    )
    assert policy.rate_factor("c") == 1.0  # slowed by the delay, not refused


@pytest.mark.parametrize(("action", "left_s"), [("allow", 1.0), ("block", 0.0)])
def test_a_bad_record_is_refused(action: str, left_s: float) -> None:
    with pytest.raises(ValueError):
        _policy(Clock(), **HIDE).restore_hidden("c", action, left_s)


# -- admission reports the record and the release marker ---------------------------


def test_the_reply_carries_the_record_and_the_marker_once_per_client() -> None:
    (plain,) = parse_reply("0 - 0\nok 0 3 10 9 100 1000 0")
    assert (plain.hidden, plain.hidden_ms, plain.released) == (None, 0, False)
    marked = parse_reply(
        "41250 block 1\nok 0 3 10 9 100 1000 0\nok 0 4 10 8 200 1000 0"
    )
    assert [(a.hidden, a.hidden_ms, a.released) for a in marked] == [
        ("block", 41250, True)
    ] * 2
    assert [a.client_requests for a in marked] == [3, 4]
    (refused,) = parse_reply("900 throttle 0\nblocked 5 3 0 0 0 0 0")
    assert (refused.outcome, refused.hidden) == ("blocked", "throttle")
    # Every field in its place (the parse builds the decision positionally).
    (held,) = parse_reply("7 block 0\nok 12 3 10 9 100 2500 1")
    assert held == Admission(
        outcome="ok",
        retry_after_ms=12,
        client_requests=3,
        limit=10,
        remaining=9,
        reset_ms=100,
        window_s=2.5,
        in_flight=True,
        without_store=False,
        hidden="block",
        hidden_ms=7,
        released=False,
    )


# -- the worker's steps ----------------------------------------------------------------


def _item(
    client: str,
    *,
    hidden: HiddenAction | None = None,
    hidden_ms: int = 0,
    released: bool = False,
    verdict: Verdict | None = None,
) -> BatchItem:
    item = BatchItem("requests", 0, 0, b"", "", None)
    item.key = ApiKey("k-" + client, client, b"s", (), "active", 0)  # type: ignore[arg-type]
    item.admission = Admission(
        "ok", 0, 1, hidden=hidden, hidden_ms=hidden_ms, released=released
    )
    item.verdict = verdict
    return item


def _hiding(action: str, left_s: float) -> Verdict:
    return Verdict(
        "block", "degrade", 2.0, hidden=True, hidden_action=action, hidden_s=left_s
    )


def test_restore_hidden_skips_a_released_client() -> None:
    clock = Clock()
    policy = _policy(clock, **HIDE)
    enforce.restore_hidden(
        [
            _item("kept", hidden="block", hidden_ms=20_000),
            _item("kept", hidden="block", hidden_ms=20_000),
            _item("freed", hidden="block", hidden_ms=20_000, released=True),
            _item("clean"),
        ],
        policy,
    )
    assert policy.decide("kept", COLD).hidden_action == "block"
    assert policy.decide("freed", COLD).enforced == "allow"
    assert policy.decide("clean", COLD).enforced == "allow"


class _Store:
    def __init__(self) -> None:
        self.written: list[dict[str, tuple[str, float]]] = []

    async def record_hidden(self, records: dict[str, tuple[str, float]]) -> None:
        self.written.append(dict(records))


async def test_record_hidden_writes_only_what_redis_lacks() -> None:
    store = _Store()
    items = [
        # New: nothing recorded yet.
        _item("new", verdict=_hiding("block", 60.0)),
        # Recorded, in its cool-down: no write per batch.
        _item(
            "steady", hidden="block", hidden_ms=40_300, verdict=_hiding("block", 40.0)
        ),
        # Recorded shorter than the policy's (the record lost, then a new
        # block started): extended.
        _item(
            "longer", hidden="block", hidden_ms=5_000, verdict=_hiding("block", 60.0)
        ),
        # A block over a recorded throttle.
        _item(
            "worse", hidden="throttle", hidden_ms=50_000, verdict=_hiding("block", 9.0)
        ),
        # A visible or no enforcement: nothing.
        _item("visible", verdict=Verdict("block", "block", 2.0, cooldown_s=60)),
        _item("allowed", verdict=Verdict("allow", "allow", 0.1)),
    ]
    await enforce.record_hidden(items, store)  # type: ignore[arg-type]
    assert store.written == [
        {"new": ("block", 60.0), "longer": ("block", 60.0), "worse": ("block", 9.0)}
    ]
    store.written.clear()
    await enforce.record_hidden(items[1:2], store)  # type: ignore[arg-type]
    assert store.written == []


async def test_record_hidden_keeps_the_most_severe_and_longest() -> None:
    store = _Store()
    await enforce.record_hidden(
        [
            _item("c", verdict=_hiding("throttle", 50.0)),
            _item("c", verdict=_hiding("block", 10.0)),
            _item("c", verdict=_hiding("block", 12.0)),
        ],
        store,  # type: ignore[arg-type]
    )
    assert store.written == [{"c": ("block", 12.0)}]


class _Scorer:
    def __init__(self) -> None:
        self.forgotten: list[str] = []

    def forget(self, client_id: str) -> None:
        self.forgotten.append(client_id)


def test_releases_are_applied_from_the_admission_reply() -> None:
    view = ClientView(_FakeRedis(), load_settings())  # type: ignore[arg-type]
    scorer = _Scorer()
    released = view.apply_releases(
        [_item("a", released=True), _item("a", released=True), _item("b")],
        scorer,  # type: ignore[arg-type]
    )
    assert released == ["a"] and scorer.forgotten == ["a"]
    assert view.released_key("a").endswith(":{c:a}:released")


class _FakeRedis:
    """Enough of a client for ClientView's constructor (no I/O here)."""

    def get_encoder(self) -> Any:
        return SimpleNamespace(decode_responses=False)
