"""Prometheus metrics of the consumer-group services, each on a registry of
its own: :class:`WorkerMetrics` (the worker) and :class:`GuardMetrics` (the
poisoning guard), both built on :class:`GroupMetrics`, which holds what
the shared consume loop (gateway/group_service.py) moves, the /metrics
listener and the Redis breaker's collector.

A registry per process object (not the process-global default) lets tests
run several workers and guards in one process without metric name clashes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gateway.errors import ConfigError
from gateway.redis_breaker import STATE_LEVEL, RedisBreaker

logger = logging.getLogger(__name__)

# Stage latencies span ~10 µs (decode of one batch) to seconds (a stalled broker).
_STAGE_BUCKETS_S = (
    1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 5.0,
)  # fmt: skip
_SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# The alert forwarder's label values, created up front so every series exists
# (at 0) from the first scrape: increase() and rules see a start.
FORWARD_OUTCOMES = ("delivered", "refused", "duplicate", "filtered", "unreadable")
FORWARD_RETRY_CAUSES = ("status", "timeout", "transport")


def start_metrics_server(
    registry: CollectorRegistry, host: str, port: int, setting: str, owner: str
) -> WSGIServer:
    """Serve ``registry`` as /metrics on ``host:port`` (not 0) in a daemon
    thread; the one place every process's listener starts and logs its
    address. ``setting`` is the settings section of the port, ``owner``
    what each needs one of ("worker", "frontdoor process").

    Raises
    ------
    ConfigError
        The port is taken (or the host cannot be bound).
    """
    try:
        server, _ = _start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"{setting}.metrics_port {port} on {host} is not free "
            f"({exc.strerror}); give each {owner} on a host its own port, "
            "or 0 for none"
        ) from exc
    bound = int(server.server_port)
    logger.info(
        "metrics endpoint up on http://%s:%d/metrics",
        host,
        bound,
        extra={"host": host, "port": bound, "app": setting},
    )
    return server


def stop_metrics_server(server: WSGIServer | None) -> None:
    """Stop a listener :func:`start_metrics_server` started (None: none)."""
    if server is not None:
        server.shutdown()
        server.server_close()


class GroupMetrics:
    """What every consumer-group service exports: its consume loop's lag,
    batch time and rewinds, and its Redis client's breaker.

    Parameters
    ----------
    setting
        The settings section whose ``metrics_port`` is served (``worker``,
        ``feedback``), named when that port is taken.
    whose
        The owner of the Redis client, in the breaker's help text.
    """

    def __init__(self, setting: str, whose: str) -> None:
        self._setting = setting
        self._whose = whose
        self._server: WSGIServer | None = None
        self.registry = CollectorRegistry()
        self.consumer_lag = Gauge(
            "modelgate_consumer_lag",
            "Records behind the partition's high watermark after the last batch.",
            ["topic", "partition"],
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "modelgate_batch_seconds",
            "Wall time of one consumed batch, from the fetch to the commit "
            "(or to the failure that rewound it; the back-off excluded).",
            buckets=_STAGE_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_rewinds = Counter(
            "modelgate_batch_rewinds",
            "Batches not committed and rewound for another try, by cause "
            "(kafka, redis, timeout).",
            ["cause"],
            registry=self.registry,
        )
        self._redis_breaker: RedisBreakerCollector | None = None

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics on ``host:port`` in a daemon thread and return the
        bound port (port 0 means none: metrics stay in-process only).

        Raises
        ------
        ConfigError
            The port is taken (or the host cannot be bound).
        """
        if port == 0:
            return 0
        self._server = start_metrics_server(
            self.registry, host, port, self._setting, self._whose
        )
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop serving /metrics. Idempotent."""
        server, self._server = self._server, None
        stop_metrics_server(server)

    def watch_redis_breaker(self, breaker: RedisBreaker) -> None:
        """Export the state and counters of the service's Redis circuit
        breaker (``modelgate_redis_*``, read at each scrape). A later call
        replaces the breaker watched (a restarted service has a new client)."""
        if self._redis_breaker is not None:
            self.registry.unregister(self._redis_breaker)
        self._redis_breaker = RedisBreakerCollector(breaker, f"the {self._whose}'s")
        self.registry.register(self._redis_breaker)


class WorkerMetrics(GroupMetrics):
    """Counters, histograms and gauges a worker exports."""

    def __init__(self) -> None:
        super().__init__("worker", "worker")
        self.requests = Counter(
            "modelgate_requests",
            "Requests handled, by model, decision and error code ('' when none).",
            ["model", "decision", "code"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "modelgate_stage_seconds",
            "Wall time of each stage of one batch.",
            ["stage"],
            buckets=_STAGE_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "modelgate_batch_records",
            "Records per consumed batch.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=self.registry,
        )
        self.detector_score = Histogram(
            "modelgate_detector_score",
            "Detector scores relative to threshold (1.0 = at threshold), capped at 1.",
            ["detector"],
            buckets=_SCORE_BUCKETS,
            registry=self.registry,
        )
        self.alerts = Counter(
            "modelgate_alerts",
            "Alerts produced, by detector.",
            ["detector"],
            registry=self.registry,
        )
        self.deadletters = Counter(
            "modelgate_deadletters",
            "Records sent to the dead-letter topic, by code.",
            ["code"],
            registry=self.registry,
        )
        self.produce_failures = Counter(
            "modelgate_produce_failures",
            "Records the broker refused for good (retriable failures retry the batch).",
            ["error"],
            registry=self.registry,
        )
        self.clients = Gauge(
            "modelgate_clients_in_memory",
            "Clients whose detector state this worker holds.",
            registry=self.registry,
        )
        self.backend_seconds = Histogram(
            "modelgate_backend_seconds",
            "Wall time of one model backend call (all retries included).",
            ["model", "kind"],
            buckets=_STAGE_BUCKETS_S,
            registry=self.registry,
        )
        self.backend_errors = Counter(
            "modelgate_backend_errors",
            "Model backend calls that failed, by error code.",
            ["model", "kind", "code"],
            registry=self.registry,
        )
        self.backend_breaker_state = Gauge(
            "modelgate_backend_breaker_state",
            "Circuit breaker of a remote backend: 0 closed, 1 half-open, 2 open.",
            ["model"],
            registry=self.registry,
        )
        self.config_version = Gauge(
            "modelgate_config_version",
            "Live configuration version this worker runs (0: its settings file).",
            registry=self.registry,
        )
        self.config_refused = Counter(
            "modelgate_config_refused",
            "Live configuration versions this worker refused to apply.",
            registry=self.registry,
        )
        self.decisions_without_store = Counter(
            "modelgate_decisions_without_store",
            "Admission decisions made while Redis was unreachable, by fail mode "
            "(open: local per-worker cap; closed: refused STORE_UNAVAILABLE).",
            ["mode"],
            registry=self.registry,
        )
        self.replays = Counter(
            "modelgate_replayed_answers",
            "Retries of served request ids answered from the replay cache.",
            registry=self.registry,
        )
        self.policy_actions = Counter(
            "modelgate_policy_actions",
            "Policy verdicts per scored row, by would-be action and whether it "
            "was in shadow (differs from what was enforced).",
            ["action", "shadow"],
            registry=self.registry,
        )
        self.baseline_saves = Counter(
            "modelgate_baseline_saves",
            "Live detector baselines saved to Redis, by model, detector and "
            "outcome (ok, unavailable).",
            ["model", "detector", "outcome"],
            registry=self.registry,
        )
        self.baseline_loads = Counter(
            "modelgate_baseline_loads",
            "Live detector baselines sought at start and by the catch-up of "
            "unready ones, by model, detector and outcome (loaded, none, "
            "refused, unavailable; the catch-up counts loaded and refused).",
            ["model", "detector", "outcome"],
            registry=self.registry,
        )
        self.state_parts_refused = Counter(
            "modelgate_state_parts_refused",
            "Parts of client snapshots refused on load, by part (a detector's "
            "name, 'policy', or 'snapshot' for an unreadable whole); that part "
            "starts afresh for the client, the others load.",
            ["detector"],
            registry=self.registry,
        )
        self.state_parts_migrated = Counter(
            "modelgate_state_parts_migrated",
            "Detector parts of client snapshots written under an older layout "
            "and migrated on load, by detector.",
            ["detector"],
            registry=self.registry,
        )


class GuardMetrics(GroupMetrics):
    """Counters the poisoning guard exports (gateway/feedback.py).

    Every label value comes from a bounded set: ``model`` is one of the
    models the guard screens, or ``""`` for a record that named none of
    them or was not authenticated; ``code`` one of
    ``gateway.feedback_wire.FEEDBACK_CODES`` or ``""``; ``detector`` one of
    the guard's five checks or ``""``.
    """

    def __init__(self) -> None:
        super().__init__("feedback", "guard")
        self.records = Counter(
            "modelgate_feedback_records",
            "Verdicts produced, by model, verdict (accepted, rejected), code "
            "('' when accepted) and the check that refused ('' when none).",
            ["model", "verdict", "code", "detector"],
            registry=self.registry,
        )
        self.screened = Counter(
            "modelgate_feedback_screened",
            "Valid records the poisoning checks judged, by model.",
            ["model"],
            registry=self.registry,
        )
        self.would_reject = Counter(
            "modelgate_feedback_would_reject",
            "Records accepted in shadow mode that the checks would have "
            "refused, by model, code and check.",
            ["model", "code", "detector"],
            registry=self.registry,
        )


class ForwarderMetrics:
    """What the alert forwarder (gateway/alert_forward.py) exports, on a
    registry of its own: how each alert was settled, retries, when the last
    delivery succeeded, what is in hand and not settled, the back-off being
    waited, and how far behind the alerts topic it is.

    ``modelgate_consumer_lag`` has the workers' name and labels, but counts
    the alerts not yet *settled* (delivered or passed over), not merely not
    yet fetched: a forwarder stuck retrying one alert shows its backlog.
    """

    def __init__(self) -> None:
        self._server: WSGIServer | None = None
        self.registry = CollectorRegistry()
        self.alerts = Counter(
            "modelgate_forward_alerts",
            "Alert records settled, by outcome: delivered (2xx), refused (the "
            "receiver refused the event for good), duplicate, filtered (an "
            "action not forwarded), unreadable.",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in FORWARD_OUTCOMES:
            self.alerts.labels(outcome)
        self.retries = Counter(
            "modelgate_forward_retries",
            "POSTs that failed and will be tried again, by cause: status (an "
            "answer that is neither 2xx nor a refusal), timeout, transport "
            "(connection or protocol failure).",
            ["cause"],
            registry=self.registry,
        )
        for cause in FORWARD_RETRY_CAUSES:
            self.retries.labels(cause)
        self.last_success = Gauge(
            "modelgate_forward_last_success_timestamp_seconds",
            "Unix time of the last alert delivered (2xx); 0 before the first.",
            registry=self.registry,
        )
        self.pending = Gauge(
            "modelgate_forward_pending",
            "Alerts fetched from the topic and not yet settled.",
            registry=self.registry,
        )
        self.backoff_seconds = Gauge(
            "modelgate_forward_backoff_seconds",
            "The wait before the next attempt at an undelivered alert; 0 when "
            "not backing off.",
            registry=self.registry,
        )
        self.consumer_lag = Gauge(
            "modelgate_consumer_lag",
            "Alerts behind the partition's high watermark not yet settled.",
            ["topic", "partition"],
            registry=self.registry,
        )

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics on ``host:port`` in a daemon thread and return the
        bound port (0: none).

        Raises
        ------
        ConfigError
            The port is taken (or the host cannot be bound).
        """
        if port == 0:
            return 0
        self._server = start_metrics_server(
            self.registry, host, port, "forward", "alert forwarder"
        )
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop serving /metrics. Idempotent."""
        server, self._server = self._server, None
        stop_metrics_server(server)


def breaker_families(
    breakers: Iterable[tuple[list[str], RedisBreaker]],
    labels: list[str],
    whose: str,
) -> Iterator[Metric]:
    """The Redis circuit breakers' gauge and counters, one sample per breaker
    with its label values; ``whose`` names the client in the state's help
    ("the worker's"). The one place these names and help texts live, for the
    worker's collector and the HTTP apps' labelled one."""
    state = GaugeMetricFamily(
        "modelgate_redis_breaker_state",
        f"Circuit breaker of {whose} Redis client: 0 closed, 1 half-open, 2 open.",
        labels=labels,
    )
    opens = CounterMetricFamily(
        "modelgate_redis_breaker_opens",
        "Times the Redis breaker opened (failure threshold or failed probe).",
        labels=labels,
    )
    rejected = CounterMetricFamily(
        "modelgate_redis_breaker_rejected",
        "Redis calls failed at once (STORE_UNAVAILABLE) by the open breaker.",
        labels=labels,
    )
    waited = CounterMetricFamily(
        "modelgate_redis_waited_out",
        "Redis calls that failed only after waiting out their timeout.",
        labels=labels,
    )
    for values, breaker in breakers:
        stats = breaker.stats
        state.add_metric(values, STATE_LEVEL[breaker.state])
        opens.add_metric(values, stats.opens)
        rejected.add_metric(values, stats.rejected)
        waited.add_metric(values, stats.waited)
    yield from (state, opens, rejected, waited)


class RedisBreakerCollector(Collector):
    """The Redis circuit breaker's gauge and counters, read from the breaker at
    each scrape (it keeps its own counts, so the breaker needs no metrics);
    ``whose`` names the client in the state's help ("the worker's")."""

    def __init__(self, breaker: RedisBreaker, whose: str) -> None:
        self._breaker = breaker
        self._whose = whose

    def collect(self) -> Iterator[Metric]:
        return breaker_families([([], self._breaker)], [], self._whose)

    def describe(self) -> Iterator[Metric]:
        # Names for the registry's clash check; values are not read.
        return self.collect()
