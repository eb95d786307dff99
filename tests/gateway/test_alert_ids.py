"""Alert ids survive a batch scored again, and readers drop the copies.

Workers produce at least once: a redelivered request record that is scored
again yields its alerts again. Their ids come from the record and the
detector, so each copy carries the first one's id and a reader can drop it.
"""

from __future__ import annotations

from typing import Any

import pytest

from detectors import DetectorScore
from gateway.alerts import SeenAlerts, alert_id, build_alert
from gateway.batch import BatchItem, alerts_for
from gateway.keys import ApiKey
from gateway.policy import Verdict


def _flagged_item(
    partition: int = 1, offset: int = 41, arrived_s: float = 1_764_940_000.123
) -> BatchItem:
    key = ApiKey("mgk_000000000001", "mallory", b"s" * 32, (), "active", 0)
    item = BatchItem(
        "modelgate.requests", partition, offset, b"", "mallory", None, key=key
    )
    item.arrived_s = arrived_s
    flagged = (
        DetectorScore("similarity", 0.9, 0.5, True, "near", True),
        DetectorScore("ood", 0.7, 0.3, True, "odd", True),
    )
    item.verdict = Verdict("flag", "flag", 1.2, flagged)
    return item


def test_the_same_record_scored_again_gives_its_alerts_the_same_ids() -> None:
    first = alerts_for(_flagged_item(), "worker-a")
    # Another worker after a rebalance, scoring the same record again.
    again = alerts_for(_flagged_item(), "worker-b")

    assert [e["id"] for e in first] == [e["id"] for e in again]
    assert first[0]["source"] != again[0]["source"]
    # One id per detector.
    assert len({e["id"] for e in first}) == 2


@pytest.mark.parametrize(
    "other",
    [
        {"partition": 2},
        {"offset": 42},
        # The topic deleted and created again: the offset comes back.
        {"arrived_s": 1_764_950_000.5},
    ],
    ids=["partition", "offset", "recreated-topic"],
)
def test_another_record_gives_other_ids(other: dict[str, Any]) -> None:
    ids = {e["id"] for e in alerts_for(_flagged_item(), "w")}
    other_ids = {e["id"] for e in alerts_for(_flagged_item(**other), "w")}

    assert not ids & other_ids


def test_alert_ids_are_uuid_hex_and_distinct_per_field() -> None:
    base: dict[str, Any] = {
        "topic": "r",
        "partition": 0,
        "offset": 7,
        "arrived_ms": 1000,
        "detector": "ood",
    }
    ids = {alert_id(**base)}
    for name, value in [
        ("topic", "s"),
        ("partition", 1),
        ("offset", 8),
        ("arrived_ms", 1001),
        ("detector", "knn"),
    ]:
        ids.add(alert_id(**{**base, name: value}))

    assert len(ids) == 6
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_an_alert_built_without_an_id_gets_a_random_one() -> None:
    fields: dict[str, Any] = {
        "worker_id": "w",
        "client_id": "c",
        "key_id": "k",
        "model": "digits",
        "detector": "ood",
        "score": 0.5,
        "threshold": 0.3,
        "action": "flag",
        "evidence": "",
        "request_id": "r",
        "query_index": 1,
        "shadow": False,
    }
    one, two = build_alert(**fields), build_alert(**fields)

    assert one["id"] != two["id"]
    assert build_alert(**fields, event_id="abc")["id"] == "abc"


def test_seen_alerts_drops_copies_and_passes_events_without_an_id() -> None:
    seen = SeenAlerts()

    events: list[dict[str, Any]] = [
        {"id": "a"},
        {"id": "b"},
        {"id": "a"},
        {},
        {},
        {"id": 7},
    ]
    shown = [seen.first(event) for event in events]

    assert shown == [True, True, False, True, True, True]
    assert seen.dropped == 1


def test_seen_alerts_forgets_the_oldest_past_its_capacity() -> None:
    seen = SeenAlerts(capacity=2)
    for event_id in ("a", "b", "c"):
        assert seen.first({"id": event_id})

    # "a" has left the window: a copy this late is shown again.
    assert seen.first({"id": "a"})
    assert not seen.first({"id": "c"})
    with pytest.raises(ValueError, match="capacity"):
        SeenAlerts(capacity=0)
