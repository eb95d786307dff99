"""Per-client bookkeeping of what was sent and what the gateway answered.

A ``ClientLedger`` counts one client's requests by outcome and its alerts, and
remembers which request id was the client's n-th query so an alert can be placed
on the client's own timeline. Pure Python; imports only the wire formats.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from gateway.protocol import InferResponse

# Error codes that mean policy refused the request, as opposed to a fault.
THROTTLE_CODES = frozenset({"RATE_LIMITED"})
BLOCK_CODES = frozenset({"BLOCKED"})


@dataclass
class ClientLedger:
    """Outcomes of one client's requests, counted as the replies arrive.

    ``requests`` counts requests sent; each ends as exactly one of ``allowed``
    (an ``ok`` answer, flagged or degraded ones included), ``throttled``,
    ``blocked`` or ``errors`` (any other code, timeouts included).
    ``first_alert_query`` is the 1-based position, in this client's own stream,
    of the query the first alert named (the worker's ``query_index`` when the
    request id is not one of ours).

    Thread-safe: attacks run in threads and record from there.
    """

    client_id: str
    role: str
    key_id: str = ""
    requests: int = 0
    allowed: int = 0
    flagged: int = 0
    degraded: int = 0
    throttled: int = 0
    blocked: int = 0
    errors: int = 0
    alerts: int = 0
    first_alert_query: int | None = None
    first_alert_detector: str | None = None
    first_alert_evidence: str | None = None
    first_refusal_query: int | None = None
    error_codes: Counter[str] = field(default_factory=Counter)
    alert_detectors: Counter[str] = field(default_factory=Counter)
    _ordinals: dict[str, int] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def sent(self, request_id: str) -> int:
        """Register a request about to be sent; return its 1-based position."""
        with self._lock:
            self.requests += 1
            self._ordinals[request_id] = self.requests
            return self.requests

    def ordinal_of(self, request_id: str) -> int | None:
        with self._lock:
            return self._ordinals.get(request_id)

    def answered(self, response: InferResponse) -> None:
        """Count one reply."""
        if response.status == "ok":
            with self._lock:
                self.allowed += 1
                if response.action == "flag":
                    self.flagged += 1
                elif response.action == "degrade":
                    self.degraded += 1
            return
        code = response.error.code if response.error is not None else "UNKNOWN"
        self.failed(code, response.request_id)

    def failed(self, code: str, request_id: str | None = None) -> None:
        """Count one request that ended in error ``code`` (``TIMEOUT`` included)."""
        with self._lock:
            if code in THROTTLE_CODES:
                self.throttled += 1
            elif code in BLOCK_CODES:
                self.blocked += 1
            else:
                self.errors += 1
                self.error_codes[code] += 1
            if (code in THROTTLE_CODES or code in BLOCK_CODES) and (
                self.first_refusal_query is None
            ):
                self.first_refusal_query = (
                    self._ordinals.get(request_id) if request_id else None
                ) or self.requests

    def alerted(self, data: dict[str, Any]) -> None:
        """Count one alert event's ``data`` for this client."""
        detector = str(data.get("detector", "?"))
        with self._lock:
            self.alerts += 1
            self.alert_detectors[detector] += 1
            request_id = data.get("request_id")
            position = self._ordinals.get(request_id) if request_id else None
            if position is None and isinstance(data.get("query_index"), int):
                position = int(data["query_index"])
            if position is not None and (
                self.first_alert_query is None or position < self.first_alert_query
            ):
                self.first_alert_query = position
                self.first_alert_detector = detector
                self.first_alert_evidence = str(data.get("evidence", ""))

    def summary(self) -> dict[str, Any]:
        """Plain-data view for the report."""
        with self._lock:
            return {
                "client": self.client_id,
                "role": self.role,
                "requests": self.requests,
                "allowed": self.allowed,
                "flagged": self.flagged,
                "degraded": self.degraded,
                "throttled": self.throttled,
                "blocked": self.blocked,
                "errors": self.errors,
                "error_codes": dict(self.error_codes),
                "alerts": self.alerts,
                "alert_detectors": dict(self.alert_detectors),
                "first_alert_query": self.first_alert_query,
                "first_alert_detector": self.first_alert_detector,
                "first_alert_evidence": self.first_alert_evidence,
                "first_refusal_query": self.first_refusal_query,
            }
