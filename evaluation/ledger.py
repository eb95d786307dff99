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
# Decision actions (modelgate.decisions) that mean a detector fired on the
# query, and those that change what the client gets (enforcement).
FLAG_ACTIONS = frozenset({"flag", "degrade", "block"})
ENFORCE_ACTIONS = frozenset({"degrade", "block", "throttle"})
# Risk samples kept per client for the report's plot; counts go on past this.
_MAX_RISK_SAMPLES = 5000


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
    retries: int = 0
    first_flag_query: int | None = None
    first_enforced_query: int | None = None
    decisions: Counter[str] = field(default_factory=Counter)
    # One (seconds since traffic began, risk, action) per decision record.
    risk_series: list[tuple[float, float, str]] = field(default_factory=list)
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
                if response.action in FLAG_ACTIONS or response.action in (
                    ENFORCE_ACTIONS
                ):
                    position = self._ordinals.get(response.request_id) or self.requests
                    if response.action in FLAG_ACTIONS:
                        self.first_flag_query = _earliest(
                            self.first_flag_query, position
                        )
                    if response.action in ENFORCE_ACTIONS:
                        self.first_enforced_query = _earliest(
                            self.first_enforced_query, position
                        )
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
            if code in THROTTLE_CODES or code in BLOCK_CODES:
                position = (
                    self._ordinals.get(request_id) if request_id else None
                ) or self.requests
                self.first_enforced_query = _earliest(
                    self.first_enforced_query, position
                )

    def retried(self) -> None:
        """Count one retry (a request sent again under its own id)."""
        with self._lock:
            self.retries += 1

    def decided(self, record: dict[str, Any], at_s: float) -> None:
        """Count one decision record (``modelgate.decisions``) about this client.

        ``at_s`` is when it was made, in seconds since the run's traffic began.
        The query's position comes from its request id; a decision about a
        request of ours that is not known (yet) falls back to the count sent.
        """
        action = str(record.get("action", "?"))
        risk = float(record.get("risk") or 0.0)
        with self._lock:
            self.decisions[action] += 1
            if len(self.risk_series) < _MAX_RISK_SAMPLES:
                self.risk_series.append((round(at_s, 3), round(risk, 4), action))
            request_id = record.get("request_id")
            position = (
                self._ordinals.get(request_id) if request_id else None
            ) or self.requests
            if action in FLAG_ACTIONS:
                self.first_flag_query = _earliest(self.first_flag_query, position)
            if action in ENFORCE_ACTIONS:
                self.first_enforced_query = _earliest(
                    self.first_enforced_query, position
                )

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
            if position is not None:
                self.first_flag_query = _earliest(self.first_flag_query, position)
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
                "retries": self.retries,
                "first_flag_query": self.first_flag_query,
                "first_enforced_query": self.first_enforced_query,
                "decisions": dict(self.decisions),
            }


def _earliest(current: int | None, position: int) -> int:
    return position if current is None else min(current, position)
