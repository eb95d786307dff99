"""The admin API's Prometheus metrics: the HTTP ones of every app, plus the
audited actions (logins refused, configuration changes, ...).

Imports prometheus-client and the gateway's HTTP metrics only.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

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
            "Audit entries not acknowledged on kafka.topics.audit when their "
            "action ran (in the Redis stream; the forwarder sends them again), "
            "by reason: unavailable (no producer: Kafka unreachable at the last "
            "start attempt), timeout (no acknowledgement within "
            "admin.audit_kafka_timeout_s), or the broker's error class.",
            ["reason"],
            registry=self.registry,
        )
        self.audit_resent = Counter(
            "modelgate_admin_audit_kafka_resent",
            "Audit entries the forwarder sent again and the broker acknowledged.",
            registry=self.registry,
        )
        self.audit_lost = Counter(
            "modelgate_admin_audit_kafka_lost",
            "Audit entries trimmed from the Redis stream (admin.audit_max_entries) "
            "before they reached kafka.topics.audit: a gap in seq after the "
            "forwarder's cursor, logged at ERROR with code AUDIT_ENTRIES_LOST.",
            registry=self.registry,
        )
        self.audit_backlog = Gauge(
            "modelgate_admin_audit_kafka_backlog",
            "Audit entries in the Redis stream not yet on kafka.topics.audit, "
            "older than admin.audit_kafka_timeout_s plus 1 s (counted over at "
            "most 1000 entries per pass); set by the replica holding the "
            "forwarder lease, 0 on the others.",
            registry=self.registry,
        )
        self.audit_forwarder = Gauge(
            "modelgate_admin_audit_forwarder_lease",
            "1 while this admin API process holds the audit forwarder's lease "
            "(re-sends what missed the topic), else 0.",
            registry=self.registry,
        )
