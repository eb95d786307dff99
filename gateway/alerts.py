"""Alerts as CloudEvents 1.0 JSON, and their rendering for people.

The event ``data`` names the client, the detector, its score and threshold, the
action taken and evidence a person can read. ``type`` is versioned so that a
consumer can refuse a shape it does not know.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

ALERT_TYPE = "dev.modelgate.alert.v1"


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
) -> dict[str, Any]:
    """One CloudEvents 1.0 structured-mode event for one flagged query."""
    return {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
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
