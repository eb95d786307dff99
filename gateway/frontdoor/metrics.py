"""The front door's Prometheus metrics: the HTTP ones of every app, plus its
Kafka round trip, the answers it awaits and its readiness.

Imports prometheus-client and the gateway's HTTP metrics; the ``FrontDoor``
only for annotations, since the service module imports this one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gateway.http_metrics import LATENCY_BUCKETS_S, HttpMetrics

if TYPE_CHECKING:
    from gateway.frontdoor.service import FrontDoor

# Outcomes of one Kafka round trip (``round_trip`` label values).
ANSWERED = "answered"
TIMEOUT = "timeout"
BROKER_ERROR = "broker_error"


class FrontDoorMetrics(HttpMetrics):
    """What one front door process exports (docs/metrics.md)."""

    def __init__(self) -> None:
        super().__init__("frontdoor")
        self.round_trip = Histogram(
            "modelgate_frontdoor_round_trip_seconds",
            "Wall time from sending a request to Kafka to the workers' answer, "
            "by outcome (answered, timeout: no answer within "
            "frontdoor.reply_timeout_s, broker_error: not delivered).",
            ["outcome"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )

    def watch_door(self, door: FrontDoor) -> None:
        """Export ``door``'s awaited answers and readiness, and its Redis
        client's breaker (``client="frontdoor"``), read at each scrape."""
        self.registry.register(_DoorCollector(door))
        self.watch_redis({"frontdoor": lambda: door.redis})


# The gauges read from the door at each scrape (for what names exist before a
# door does: gateway.monitoring).
PENDING_GAUGE = "modelgate_frontdoor_replies_pending"
READY_GAUGE = "modelgate_frontdoor_ready"


class _DoorCollector(Collector):
    def __init__(self, door: FrontDoor) -> None:
        self._door = door

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            PENDING_GAUGE,
            "Requests sent through Kafka whose answer this front door awaits.",
            value=self._door.pending_count,
        )
        yield GaugeMetricFamily(
            READY_GAUGE,
            "1 when the front door answers inference (Kafka and Redis set up, "
            "reply topic settled), else 0; as /v2/health/ready.",
            value=1 if self._door.ready else 0,
        )

    def describe(self) -> Iterator[Metric]:
        return self.collect()
