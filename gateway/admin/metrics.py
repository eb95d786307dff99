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
        self.audit_produced = Counter(
            "modelgate_admin_audit_kafka_produced",
            "Audit entries the broker acknowledged on kafka.topics.audit.",
            registry=self.registry,
        )
        self.audit_missed = Counter(
            "modelgate_admin_audit_kafka_missed",
            "Audit entries not acknowledged on kafka.topics.audit (in the Redis "
            "stream and the log only), by reason: unavailable (no producer: "
            "Kafka unreachable at the last start attempt), timeout (no "
            "acknowledgement within admin.audit_kafka_timeout_s), or the "
            "broker's error class.",
            ["reason"],
            registry=self.registry,
        )
