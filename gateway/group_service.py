"""The consume loop of a consumer-group service: the worker and the guard.

Both services read one topic in batches and answer every record before they
commit, so both run the same loop: fetch a batch; under the batch lock keep
only the partitions this process still owns (a revoke may have run between
the fetch and the lock); handle the batch; commit its offsets only after
everything it produced is acknowledged (at-least-once); on a Kafka or Redis
failure rewind every partition to the batch's first offset and back off,
doubling the wait up to ``MAX_BACKOFF_S`` (gateway/group_clients.py).
Their rebalance listeners share a shape too: on revoke, wait for the batch
in hand to finish, then let the service drop (or hand over) the revoked
partitions' state; on assign, mark the service as assigned.

:class:`GroupService` holds that loop and the listener; a service says what
a batch is (:meth:`GroupService.process_records`), what happens around the
commit and on revoke. The loop also keeps three metrics every such service
exports (:class:`gateway.metrics.GroupMetrics`): consumer lag per partition,
the wall time of each batch, and the batches rewound by cause.

Imports aiokafka and the gateway's errors, clients and metrics; nothing of
either service.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from gateway.config import Settings
from gateway.errors import BrokerError, StoreError
from gateway.group_clients import Backoff, rewind
from gateway.metrics import GroupMetrics

logger = logging.getLogger(__name__)

Batch = dict[TopicPartition, list[Any]]


def failure_cause(exc: BaseException) -> str:
    """The ``cause`` label of a rewound batch: ``redis``, ``timeout`` or
    ``kafka`` (a bounded set, whatever the exception)."""
    if isinstance(exc, StoreError):
        return "redis"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "kafka"


class GroupService(abc.ABC):
    """A member of a consumer group that answers its records in batches.

    A subclass creates ``_consumer`` and ``_producer`` in its ``start``
    (subscribing with :meth:`rebalance_listener`), implements
    :meth:`process_records`, and may extend :meth:`_before_fetch`,
    :meth:`_commit`, :meth:`_on_revoked` and the revoke's wait.

    Parameters
    ----------
    settings
        Process settings; ``kafka.poll_timeout_ms`` and
        ``kafka.request_timeout_s`` are read here.
    metrics
        Where the loop's lag, batch time and rewinds go.
    service
        The service's name in log fields (``worker``, ``guard``).
    """

    def __init__(self, settings: Settings, metrics: GroupMetrics, service: str) -> None:
        self.settings = settings
        self._loop_metrics = metrics
        self._service = service
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._backoff = Backoff()
        # Held while a batch is in flight, so a revoke waits for it to commit.
        self._batch_lock = asyncio.Lock()
        # Set once the group has given this process its first assignment
        # (which may be empty when there are more members than partitions).
        self.assigned = asyncio.Event()
        self.batches_done = 0

    @property
    @abc.abstractmethod
    def max_batch_records(self) -> int:
        """Records fetched per batch at most."""

    @abc.abstractmethod
    async def process_records(
        self, records: Sequence[tuple[TopicPartition, Any]]
    ) -> None:
        """Answer one batch, producing everything it owes and waiting for the
        broker's acknowledgement.

        Raises
        ------
        BrokerError, StoreError, KafkaError, TimeoutError
            Kafka or Redis is in trouble: the batch is rewound and retried.
        """

    def rebalance_listener(self) -> ConsumerRebalanceListener:
        """The listener to subscribe with."""
        return _RebalanceListener(self)

    # -- the loop -----------------------------------------------------------------

    async def run(self, stop_event: asyncio.Event) -> None:
        """Consume until ``stop_event`` is set; each batch is committed before
        the next is fetched."""
        assert self._consumer is not None, "start() first"
        while not stop_event.is_set():
            await self._before_fetch()
            try:
                batch = await self._consumer.getmany(
                    timeout_ms=self.settings.kafka.poll_timeout_ms,
                    max_records=self.max_batch_records,
                )
            except KafkaError as exc:
                # The consumer reconnects by itself; a fetch error must not end
                # the service (a restart would only meet it again).
                logger.warning(
                    "fetch failed, retrying: %r", exc, extra={"service": self._service}
                )
                await self._backoff.wait()
                continue
            if not batch:
                continue
            async with self._batch_lock:
                # A revoke may have run between the fetch and the lock: those
                # records now belong to another member, which will answer them.
                owned = self._consumer.assignment()
                batch = {tp: rs for tp, rs in batch.items() if tp in owned}
                if batch:
                    await self._handle_batch(batch)

    async def _before_fetch(self) -> None:
        """Runs before each fetch, outside the batch lock."""
        return None

    async def _handle_batch(self, batch: Batch) -> None:
        assert self._consumer is not None
        started = time.perf_counter()
        first_offsets = {tp: records[0].offset for tp, records in batch.items()}
        last_offsets = {tp: records[-1].offset for tp, records in batch.items()}
        for tp, offset in last_offsets.items():
            # Lag as of this fetch: records on the broker behind this batch.
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                self._loop_metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                    max(highwater - offset - 1, 0)
                )
        try:
            await self.process_records(
                [(tp, r) for tp, records in batch.items() for r in records]
            )
            await self._commit({tp: off + 1 for tp, off in last_offsets.items()})
        except (BrokerError, StoreError, KafkaError, TimeoutError) as exc:
            # Kafka or Redis is in trouble. Answers may be half produced; rewind
            # so the whole batch comes again: readers tolerate a duplicate
            # answer (they recognise it by its id), never a missing one.
            logger.warning(
                "%s batch not committed, retrying in %.1f s: %r",
                self._service,
                self._backoff.delay_s,
                exc,
                extra={
                    "service": self._service,
                    "offsets": {tp.partition: o for tp, o in first_offsets.items()},
                },
            )
            self._loop_metrics.batch_rewinds.labels(failure_cause(exc)).inc()
            # Timed before the back-off: the histogram is the batch's work.
            self._loop_metrics.batch_seconds.observe(time.perf_counter() - started)
            await rewind(self._consumer, first_offsets, self._backoff)
            return
        self._loop_metrics.batch_seconds.observe(time.perf_counter() - started)
        self._backoff.reset()
        self.batches_done += 1

    async def _commit(self, next_offsets: dict[TopicPartition, int]) -> None:
        """Commit the batch's offsets, bounded by ``kafka.request_timeout_s``."""
        assert self._consumer is not None
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a
        # cancellation that arrives as the commit completes, and the cancelled
        # task runs on (a killed guard's run loop kept fetching).
        async with asyncio.timeout(self.settings.kafka.request_timeout_s):
            await self._consumer.commit(next_offsets)

    # -- rebalances ---------------------------------------------------------------

    def _revoke_wait_s(self) -> float | None:
        """Longest a revoke waits for the batch in hand, in seconds; None
        (this default) waits until the batch ends."""
        return None

    @abc.abstractmethod
    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Drop or hand over the state of ``revoked``; runs under the batch
        lock, after the batch in hand has committed or failed."""

    def _on_revoke_timed_out(self, revoked: set[TopicPartition]) -> None:
        """The batch in hand outlasted :meth:`_revoke_wait_s`: the revoke goes
        on without :meth:`_on_revoked`. The batch's records go to the new
        owner again; the state the batch is using is neither handed over nor
        forgotten, and the new owner starts those clients afresh rather than
        stall the group."""
        logger.warning(
            "revoke did not wait for the batch in flight",
            extra={
                "service": self._service,
                "partitions": sorted(tp.partition for tp in revoked),
            },
        )


class _RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]  # untyped base
    def __init__(self, service: GroupService) -> None:
        self._service = service

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        service = self._service
        lock = service._batch_lock
        try:
            await asyncio.wait_for(lock.acquire(), service._revoke_wait_s())
        except TimeoutError:
            service._on_revoke_timed_out(revoked)
            return
        try:
            await service._on_revoked(revoked)
        finally:
            lock.release()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._service.assigned.set()
        logger.info(
            "partitions assigned",
            extra={
                "service": self._service._service,
                "partitions": sorted(tp.partition for tp in assigned),
            },
        )
