"""Watch the gateway's alert stream while the demo runs.

``AlertCollector`` reads ``modelgate.alerts`` (CloudEvents 1.0 JSON) from the
moment it starts, and credits each alert to the client it names, so the report
can say how many alerts each client drew and at which of its queries the first
one came. It is an ordinary consumer of the topic, as an operator's tooling
would be.

Imports the gateway's client library; nothing from the worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from evaluation.ledger import ClientLedger
from gateway.client import KafkaTransport, cancel_and_wait

logger = logging.getLogger(__name__)

# Alerts kept verbatim for the JSON report; counts go on past this.
_MAX_KEPT_EVENTS = 2000


class _TopicReader:
    """Read one topic from its end in a background task, feeding ``handle``.

    The collectors below differ only in what one record means; this holds the
    consumer, the task and the counts they share.
    """

    #: Names the records in logs ("alert") and the task ("alerts:<topic>").
    _kind = "record"

    def __init__(
        self,
        transport: KafkaTransport,
        topic: str,
        ledgers: dict[str, ClientLedger],
    ) -> None:
        self._transport = transport
        self.topic = topic
        self._ledgers = ledgers
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.total = 0
        self.foreign = 0
        self.undecodable = 0

    async def start(self) -> None:
        """Position at the end of the topic and start reading. Idempotent."""
        if self._task is not None:
            return
        self._consumer = await self._transport.tail(self.topic)
        self._task = asyncio.create_task(
            self._read(), name=f"{self._kind}s:{self.topic}"
        )

    async def stop(self) -> None:
        """Stop reading; counts stay readable. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                await asyncio.wait_for(
                    consumer.stop(), self._transport.settings.kafka.request_timeout_s
                )
            except (KafkaError, TimeoutError) as exc:
                logger.warning("%s consumer did not close cleanly: %r", self._kind, exc)

    async def _read(self) -> None:
        consumer = self._consumer
        assert consumer is not None  # set before the task starts
        poll_timeout_ms = self._transport.settings.kafka.poll_timeout_ms
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=poll_timeout_ms)
            except KafkaError as exc:
                logger.warning("%s poll failed: %r", self._kind, exc)
                await asyncio.sleep(poll_timeout_ms / 1000)
                continue
            for records in batches.values():
                for record in records:
                    self.handle(record.value)

    def handle(self, value: bytes | None) -> None:
        """Credit one record (public so it can be fed without Kafka)."""
        raise NotImplementedError


class AlertCollector(_TopicReader):
    """Credit alerts on ``topic`` to the ledgers of the clients they name.

    Parameters
    ----------
    transport
        A started transport; it supplies the topic's partitions.
    topic
        The alerts topic.
    ledgers
        Client id to ledger. Alerts about other clients are only counted.
    on_first_alert
        Called with the ledger and the alert's ``data`` the first time a client
        in ``ledgers`` is alerted, so a watcher can say so at once.
    """

    _kind = "alert"

    def __init__(
        self,
        transport: KafkaTransport,
        topic: str,
        ledgers: dict[str, ClientLedger],
        *,
        on_first_alert: Callable[[ClientLedger, dict[str, Any]], None] | None = None,
    ) -> None:
        super().__init__(transport, topic, ledgers)
        self._on_first_alert = on_first_alert
        self.by_detector: Counter[str] = Counter()
        self.events: list[dict[str, Any]] = []

    async def __aenter__(self) -> AlertCollector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def handle(self, value: bytes | None) -> None:
        """Credit one alert record (public so it can be fed without Kafka)."""
        try:
            event = json.loads(value or b"")
            data = event["data"]
            client_id = str(data.get("client_id") or event.get("subject"))
        except (ValueError, KeyError, TypeError, AttributeError):
            self.undecodable += 1
            return
        self.total += 1
        self.by_detector[str(data.get("detector", "?"))] += 1
        if len(self.events) < _MAX_KEPT_EVENTS:
            self.events.append(event)
        ledger = self._ledgers.get(client_id)
        if ledger is None:
            self.foreign += 1
            return
        ledger.alerted(data)
        if ledger.alerts == 1 and self._on_first_alert is not None:
            self._on_first_alert(ledger, data)


class DecisionCollector(_TopicReader):
    """Credit decision records (``modelgate.decisions``, one per request) to the
    ledgers of the clients they name: the action taken on every query and the
    risk policy saw, which the evaluation plots over time.

    Parameters
    ----------
    transport
        A started transport.
    topic
        The decisions topic.
    ledgers
        Client id to ledger; several ids may share one ledger (a distributed
        attacker's keys). Records about other clients are only counted.
    t0_ms
        Wall-clock origin (ms since the epoch) of the risk series' time axis.
    """

    _kind = "decision"

    def __init__(
        self,
        transport: KafkaTransport,
        topic: str,
        ledgers: dict[str, ClientLedger],
        *,
        t0_ms: int,
    ) -> None:
        super().__init__(transport, topic, ledgers)
        self.t0_ms = t0_ms
        self.by_action: Counter[str] = Counter()

    def handle(self, value: bytes | None) -> None:
        """Credit one decision record (public so it can be fed without Kafka)."""
        try:
            record = json.loads(value or b"")
            client_id = record.get("client_id")
            at_s = (int(record["ts_ms"]) - self.t0_ms) / 1000.0
        except (ValueError, KeyError, TypeError, AttributeError):
            self.undecodable += 1
            return
        self.total += 1
        self.by_action[str(record.get("action", "?"))] += 1
        ledger = self._ledgers.get(str(client_id))
        if ledger is None:
            self.foreign += 1
            return
        ledger.decided(record, at_s)
