"""Alerts as CloudEvents 1.0 JSON, and their rendering for people.

The event ``data`` names the client, the detector, its score and threshold, the
action taken and evidence a person can read. ``type`` is versioned so that a
consumer can refuse a shape it does not know.

Workers produce at least once: an alert can reach the topic twice (a batch
scored again after a failure). Both copies carry the same ``id``, derived
from the request record and the detector (:func:`alert_id`), so readers drop
the second by id (:class:`SeenAlerts`). Imports only the standard library.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

ALERT_TYPE = "dev.modelgate.alert.v1"

# uuid5 namespace of alert ids (a constant: every worker, of every version,
# must derive the same id for the same record and detector).
_ALERT_ID_NAMESPACE = uuid.UUID("ee600a60-6bd7-47f5-b2c6-198f45abf9f7")


def alert_id(
    *, topic: str, partition: int, offset: int, arrived_ms: int, detector: str
) -> str:
    """The CloudEvents ``id`` of the alert ``detector`` raises on one request
    record: the same for every copy of it, whichever worker produces it.

    The record's broker timestamp (``arrived_ms``; the requests topic stamps
    LogAppendTime) tells apart two records at the same offset of a topic that
    was deleted and created again.

    Examples
    --------
    >>> a = alert_id(topic="r", partition=0, offset=7, arrived_ms=1, detector="ood")
    >>> a == alert_id(topic="r", partition=0, offset=7, arrived_ms=1, detector="ood")
    True
    >>> a == alert_id(topic="r", partition=0, offset=8, arrived_ms=1, detector="ood")
    False
    """
    name = f"{topic}/{partition}/{offset}/{arrived_ms}/{detector}"
    return uuid.uuid5(_ALERT_ID_NAMESPACE, name).hex


def build_alert(
    *,
    worker_id: str,
    client_id: str,
    key_id: str,
    model: str,
    detector: str,
    score: float,
    threshold: float,
    action: str,
    evidence: str,
    request_id: str,
    query_index: int,
    shadow: bool,
    event_id: str | None = None,
) -> dict[str, Any]:
    """One CloudEvents 1.0 structured-mode event for one flagged query.

    ``event_id`` should come from :func:`alert_id`, so that a copy produced
    again keeps it; without one the id is random and copies cannot be told
    from new alerts.
    """
    return {
        "specversion": "1.0",
        "id": event_id or uuid.uuid4().hex,
        "source": f"modelgate/worker/{worker_id}",
        "type": ALERT_TYPE,
        "subject": client_id,
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "datacontenttype": "application/json",
        "data": {
            "client_id": client_id,
            "key_id": key_id,
            "model": model,
            "detector": detector,
            "score": round(score, 6),
            "threshold": threshold,
            "action": action,
            "shadow": shadow,
            "evidence": evidence,
            "request_id": request_id,
            "query_index": query_index,
        },
    }


def format_alert(event: dict[str, Any]) -> str:
    """One readable line: time, client, detector, score against threshold,
    action and evidence."""
    data = event.get("data") or {}
    shadow = " (shadow)" if data.get("shadow") else ""
    return (
        f"{event.get('time', '?')}  client={data.get('client_id', '?')}  "
        f"detector={data.get('detector', '?')}  "
        f"score={data.get('score', float('nan')):.3f}"
        f" ≥ {data.get('threshold', '?')}  "
        f"action={data.get('action', '?')}{shadow}"
        f"  query#{data.get('query_index', '?')}"
        f"  {data.get('evidence', '')}"
    )


class SeenAlerts:
    """The ids of the alerts already shown, to drop copies produced again.

    Keyed by ``id`` alone, not by (``source``, ``id``) as CloudEvents has it:
    a copy produced by another worker after a rebalance names that worker as
    its source, and :func:`alert_id` is unique without it.

    Parameters
    ----------
    capacity
        Ids remembered, the most recent kept (about 100 bytes each). A copy
        arrives within one batch retry or rebalance of the first, so a window
        of this many alerts catches it; one arriving later is shown again.

    Examples
    --------
    >>> seen = SeenAlerts()
    >>> [seen.first({"id": "a"}), seen.first({"id": "a"}), seen.first({})]
    [True, False, True]
    >>> seen.dropped
    1
    """

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self.dropped = 0
        self._ids: OrderedDict[str, None] = OrderedDict()

    def first(self, event: Mapping[str, Any]) -> bool:
        """True unless an alert with this event's ``id`` was seen; an event
        without a string id (not one of ours) always counts as new."""
        event_id = event.get("id")
        if not isinstance(event_id, str) or not event_id:
            return True
        if event_id in self._ids:
            self.dropped += 1
            return False
        self._ids[event_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True
