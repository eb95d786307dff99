"""The admin API's Prometheus metrics: the HTTP ones of every app, plus the
audited actions (logins refused, configuration changes, ...).

Imports prometheus-client and the gateway's HTTP metrics only.
"""

from __future__ import annotations

from prometheus_client import Counter

from gateway.http_metrics import HttpMetrics


class AdminMetrics(HttpMetrics):
    """What one admin API process exports (docs/metrics.md)."""

    def __init__(self) -> None:
        super().__init__("admin")
        self.actions = Counter(
            "modelgate_admin_actions",
            "Audited admin actions, by action (login, logout, or METHOD and route "
            "template) and outcome (ok, denied, failed); counted as the audit "
            "entry is written.",
            ["action", "outcome"],
            registry=self.registry,
        )
