"""The admin audit log's Kafka copy: each entry also goes to
``kafka.topics.audit``, keyed by its actor.

The Redis stream (``gateway.admin.audit``) stays the record an admin action
depends on: if it cannot be written the action fails. The topic is the copy
with a long retention (``kafka.topics.audit_retention_ms``) that the stream's
cap does not give. When Kafka cannot take an entry (not reachable, no
acknowledgement within ``admin.audit_kafka_timeout_s``, or the record is
refused) the action still proceeds, and the miss is logged at WARNING with the
entry's id, actor and action and counted in
``modelgate_admin_audit_kafka_missed_total``: the entry is in the stream, and
:class:`~gateway.admin.audit_forward.AuditForwarder` sends it again later
with :meth:`AuditTopic.resend` (docs/admin.md, "The audit topic").

Ordering: records are keyed by actor, so one actor's entries land on one
partition; :class:`~gateway.admin.audit.AuditLog` appends to the stream and
hands the record to the producer under one lock, so the topic holds them in
the stream's order. An entry whose acknowledgement timed out may still arrive
later, out of that order, and so does a re-sent one; its ``entry_id`` (the
stream id) and ``seq`` order it, and a copy has the same ``entry_id``.

Imports aiokafka and the gateway's config, topics and admin metrics; nothing
from FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from gateway.config import Settings
from gateway.errors import BrokerError
from gateway.topics import ensure_audit_topic

if TYPE_CHECKING:
    from gateway.admin.audit import AuditEntry
    from gateway.admin.metrics import AdminMetrics

logger = logging.getLogger(__name__)

# After a failed start, entries within this many seconds are missed at once
# rather than each waiting for another connection attempt (as the admin
# API's live configuration does, gateway/admin/live.py).
START_RETRY_S = 5.0
# Version of the record's JSON layout: 2 added the chain (seq, prev, hash,
# mac; gateway/admin/audit_chain.py), 3 the signing key's id (kid).
RECORD_VERSION = 3


@dataclass(frozen=True, slots=True)
class Pending:
    """An entry handed to the producer, or the reason it could not be."""

    entry: AuditEntry
    deadline: float
    delivery: asyncio.Future[object] | None = None
    missed: str | None = None


def encode(entry: AuditEntry) -> bytes:
    """The record value: the entry as JSON, with ``v`` its layout version."""
    return json.dumps(
        {"v": RECORD_VERSION, **asdict(entry)}, sort_keys=True, separators=(",", ":")
    ).encode()


class AuditTopic:
    """One producer for the admin API's life, started in the background.

    Parameters
    ----------
    settings
        ``kafka`` (bootstrap, ``topics.audit``) and
        ``admin.audit_kafka_timeout_s``.
    metrics
        Where misses and produced entries are counted; None counts nothing.
    retry_s
        Seconds after a failed start during which no new attempt is made.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: AdminMetrics | None = None,
        *,
        retry_s: float = START_RETRY_S,
    ) -> None:
        self._settings = settings
        self._topic = settings.kafka.topics.audit
        self._timeout_s = settings.admin.audit_kafka_timeout_s
        self._metrics = metrics
        self._retry_s = retry_s
        self._producer: AIOKafkaProducer | None = None
        self._starting: asyncio.Task[bool] | None = None
        self._failed_at: float | None = None
        self._closed = False

    @property
    def topic(self) -> str:
        return self._topic

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def wait_started(self) -> bool:
        """Wait for the start attempt under way, if any; True once the
        producer is started."""
        task = self._starting
        if self._producer is None and task is not None:
            await asyncio.shield(task)
        return self._producer is not None

    def start_soon(self) -> None:
        """Begin connecting without waiting (the app's startup)."""
        self._start_task()

    def _start_task(self) -> asyncio.Task[bool] | None:
        """The start attempt under way, a new one, or None while a failed
        attempt is recent (or the producer is closed)."""
        if self._closed or self._producer is not None:
            return None
        if self._starting is not None and not self._starting.done():
            return self._starting
        now = time.monotonic()
        if self._failed_at is not None and now - self._failed_at < self._retry_s:
            return None
        self._starting = asyncio.create_task(self._start())
        return self._starting

    async def _start(self) -> bool:
        settings = self._settings
        timeout_s = settings.kafka.request_timeout_s
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka.bootstrap,
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=int(timeout_s * 1000),
        )
        try:
            await ensure_audit_topic(settings)
            await asyncio.wait_for(producer.start(), timeout_s)
        except asyncio.CancelledError:
            # close() during the attempt: release what start() may hold.
            with contextlib.suppress(KafkaError, TimeoutError, OSError):
                await asyncio.wait_for(producer.stop(), timeout_s)
            raise
        except (BrokerError, KafkaError, TimeoutError, OSError) as exc:
            self._failed_at = time.monotonic()
            with contextlib.suppress(KafkaError, TimeoutError, OSError):
                await asyncio.wait_for(producer.stop(), timeout_s)
            logger.warning(
                "audit topic unavailable: %r", exc, extra={"topic": self._topic}
            )
            return False
        if self._closed:
            await asyncio.wait_for(producer.stop(), timeout_s)
            return False
        self._producer = producer
        logger.info("audit topic producer started", extra={"topic": self._topic})
        return True

    def deadline(self) -> float:
        """When an entry whose action begins now stops waiting for Kafka
        (``time.monotonic()`` plus ``admin.audit_kafka_timeout_s``)."""
        return time.monotonic() + self._timeout_s

    async def enqueue(
        self, entry: AuditEntry, deadline: float | None = None
    ) -> Pending:
        """Hand ``entry`` to the producer, waiting until ``deadline`` at most
        (default: :meth:`deadline` now) for a start under way or for the
        producer's buffer; never raises for Kafka's sake.

        Call it in the order the entries must keep (the stream's), then
        :meth:`confirm` each result. Take ``deadline`` before queueing for
        that order, so that entries queued behind a slow one do not each
        wait a whole timeout more.
        """
        if deadline is None:
            deadline = self.deadline()
        if time.monotonic() >= deadline:
            return Pending(entry, deadline, missed="timeout")
        if self._producer is None:
            task = self._start_task()
            if task is None:
                return Pending(entry, deadline, missed="unavailable")
            try:
                started = await asyncio.wait_for(
                    asyncio.shield(task), deadline - time.monotonic()
                )
            except TimeoutError:
                return Pending(entry, deadline, missed="timeout")
            if not started or self._producer is None:
                return Pending(entry, deadline, missed="unavailable")
        producer = self._producer
        try:
            delivery = await asyncio.wait_for(
                producer.send(
                    self._topic, encode(entry), key=entry.actor.encode("utf-8")
                ),
                max(0.0, deadline - time.monotonic()),
            )
        except TimeoutError:
            return Pending(entry, deadline, missed="timeout")
        except KafkaError as exc:
            return Pending(entry, deadline, missed=type(exc).__name__)
        return Pending(entry, deadline, delivery=delivery)

    async def confirm(self, pending: Pending) -> bool:
        """Wait (until the entry's deadline) for the broker's acknowledgement.

        Returns
        -------
        bool
            True once the broker has the entry; False on a miss, which is
            then logged at WARNING and counted (the forwarder sends it again).
        """
        missed = pending.missed
        delivery = pending.delivery
        if missed is None and delivery is not None:
            try:
                # Shielded: on a timeout the record may still be delivered;
                # cancelling its future would not take it back.
                await asyncio.wait_for(
                    asyncio.shield(delivery),
                    max(0.0, pending.deadline - time.monotonic()),
                )
            except TimeoutError:
                missed = "timeout"
                delivery.add_done_callback(_late(pending.entry))
            except KafkaError as exc:
                missed = type(exc).__name__
        if missed is None:
            if self._metrics is not None:
                self._metrics.audit_produced.inc()
            return True
        self._missed(pending.entry, missed)
        return False

    async def resend(self, entries: Sequence[AuditEntry]) -> int:
        """Produce ``entries`` again, in order, waiting at most
        ``kafka.request_timeout_s`` in all; never raises for Kafka's sake.

        Returns
        -------
        int
            How many of ``entries``, from the first, the broker acknowledged.
            An entry acknowledged after an unacknowledged one is not counted:
            the caller sends from the first unacknowledged again, so the
            topic may then hold that entry twice (same ``entry_id``).
        """
        if not entries:
            return 0
        timeout_s = self._settings.kafka.request_timeout_s
        deliveries: list[asyncio.Future[object]] = []
        acknowledged = 0
        try:
            async with asyncio.timeout(timeout_s):
                if self._producer is None:
                    task = self._start_task()
                    if task is None or not await asyncio.shield(task):
                        return 0
                producer = self._producer
                if producer is None:
                    return 0
                for entry in entries:
                    deliveries.append(
                        await producer.send(
                            self._topic, encode(entry), key=entry.actor.encode("utf-8")
                        )
                    )
                for delivery in deliveries:
                    # Shielded: on a timeout the record may still be
                    # delivered; cancelling its future would not take it back.
                    await asyncio.shield(delivery)
                    acknowledged += 1
        except (TimeoutError, KafkaError) as exc:
            logger.warning(
                "audit topic took %d of %d re-sent entries: %r",
                acknowledged,
                len(entries),
                exc,
                extra={"topic": self._topic, "entry_id": entries[0].entry_id},
            )
        if self._metrics is not None and acknowledged:
            self._metrics.audit_resent.inc(acknowledged)
        return acknowledged

    async def scan(
        self, on_record: Callable[[TopicRecord], None], *, since_ms: int
    ) -> bool:
        """:func:`scan_topic` of this topic from ``since_ms`` (the
        forwarder's first pass: which stream entries it already holds)."""
        return await scan_topic(self._settings, on_record, since_ms=since_ms)

    def _missed(self, entry: AuditEntry, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.audit_missed.labels(reason).inc()
        logger.warning(
            "audit entry %s not written to Kafka (%s); it is in the Redis stream "
            "and will be sent again",
            entry.entry_id,
            reason,
            extra={
                "topic": self._topic,
                "entry_id": entry.entry_id,
                "actor": entry.actor,
                "action": entry.action,
                "outcome": entry.outcome,
                "reason": reason,
            },
        )

    async def close(self) -> None:
        """Stop the producer, delivering what it holds within
        ``kafka.request_timeout_s``; idempotent."""
        self._closed = True
        task, self._starting = self._starting, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await asyncio.wait_for(
                    producer.stop(), self._settings.kafka.request_timeout_s
                )
            except (KafkaError, TimeoutError, OSError) as exc:
                logger.error(
                    "audit producer did not stop cleanly; entries it held may "
                    "be missing from Kafka: %r",
                    exc,
                    extra={"topic": self._topic},
                )


def _late(entry: AuditEntry) -> Callable[[asyncio.Future[object]], None]:
    def done(delivery: asyncio.Future[object]) -> None:
        if not delivery.cancelled() and delivery.exception() is None:
            logger.warning(
                "audit entry %s reached Kafka after its timeout",
                entry.entry_id,
                extra={"entry_id": entry.entry_id, "actor": entry.actor},
            )

    return done


@dataclass(frozen=True, slots=True)
class TopicRecord:
    """One record read back from the audit topic."""

    partition: int
    offset: int
    key: str
    entry: dict[str, object]


async def read_topic(
    settings: Settings, *, limit: int | None = None
) -> list[TopicRecord]:
    """Every record on ``kafka.topics.audit`` (the newest ``limit`` per
    partition if given), read from the start up to the end offsets seen at
    the call, without a consumer group; partition by partition, each in its
    order. A record that is not JSON is returned with ``{"undecodable": ...}``.

    Raises
    ------
    BrokerError
        Kafka could not be reached or the topic does not exist, within
        ``kafka.request_timeout_s``.
    """
    records: list[TopicRecord] = []
    found = await scan_topic(settings, records.append, limit=limit)
    if not found:
        raise BrokerError(
            f"the audit topic {settings.kafka.topics.audit} does not exist"
        )
    records.sort(key=lambda r: (r.partition, r.offset))
    return records


async def scan_topic(
    settings: Settings,
    on_record: Callable[[TopicRecord], None],
    *,
    limit: int | None = None,
    since_ms: int | None = None,
) -> bool:
    """Hand each record on ``kafka.topics.audit`` to ``on_record``, up to the
    end offsets seen at the call, keeping none: the newest ``limit`` per
    partition, or those timestamped ``since_ms`` or later (the producer's
    clock), or all. No consumer group.

    Returns
    -------
    bool
        False when the topic does not exist (nothing was read).

    Raises
    ------
    BrokerError
        Kafka could not be reached, or sent nothing for
        ``kafka.request_timeout_s`` before the end.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from gateway.topics import partitions_of

    topic = settings.kafka.topics.audit
    timeout_s = settings.kafka.request_timeout_s
    partitions = [
        TopicPartition(topic, p) for p in await partitions_of(settings, topic)
    ]
    if not partitions:
        return False
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap,
        enable_auto_commit=False,
        request_timeout_ms=int(timeout_s * 1000) + 10_000,
    )
    try:
        await asyncio.wait_for(consumer.start(), timeout_s)
        consumer.assign(partitions)
        ends = await asyncio.wait_for(consumer.end_offsets(partitions), timeout_s)
        starts = await asyncio.wait_for(
            consumer.beginning_offsets(partitions), timeout_s
        )
        if since_ms is not None:
            found = await asyncio.wait_for(
                consumer.offsets_for_times(dict.fromkeys(partitions, since_ms)),
                timeout_s,
            )
            # None: no record that new in the partition.
            starts = {
                tp: ends[tp] if at is None else at.offset for tp, at in found.items()
            }
        wanted: set[TopicPartition] = set()
        for tp in partitions:
            first = starts[tp] if limit is None else max(starts[tp], ends[tp] - limit)
            consumer.seek(tp, first)
            if first < ends[tp]:
                wanted.add(tp)
        # The limit is on a stall, not on the whole read: a topic holding a
        # long stream's worth of records may take longer than one request.
        progress_at = time.monotonic()
        while wanted:
            batches = await asyncio.wait_for(
                consumer.getmany(*wanted, timeout_ms=200), timeout_s
            )
            if batches:
                progress_at = time.monotonic()
            elif time.monotonic() - progress_at > timeout_s:
                raise TimeoutError(f"no record for {timeout_s} s before the end")
            for tp, messages in batches.items():
                for message in messages:
                    if message.offset >= ends[tp]:
                        continue
                    on_record(
                        _record(
                            message.partition,
                            message.offset,
                            message.key,
                            message.value,
                        )
                    )
                if await consumer.position(tp) >= ends[tp]:
                    wanted.discard(tp)
    except (KafkaError, TimeoutError, OSError) as exc:
        raise BrokerError(
            f"cannot read {topic} on {settings.kafka.bootstrap}: {exc!r}"
        ) from exc
    finally:
        with contextlib.suppress(KafkaError, TimeoutError, OSError):
            await asyncio.wait_for(consumer.stop(), timeout_s)
    return True


def _record(
    partition: int, offset: int, key: bytes | None, value: bytes | None
) -> TopicRecord:
    try:
        decoded = json.loads(value or b"")
        entry = (
            decoded if isinstance(decoded, dict) else {"undecodable": repr(value)[:200]}
        )
    except ValueError:
        entry = {"undecodable": repr(value)[:200]}
    return TopicRecord(
        partition, offset, (key or b"").decode("utf-8", "replace"), entry
    )
