"""Answers held back by hidden suspicion, and the offsets they keep uncommitted.

Policy may delay a suspicious client's answer (``item.delay_s``) without
telling it why. The worker must not wait for that delay: the batch moves on,
the answer is sent later by its own task, and the partition's committed
offset stays below the held record until then, so that a crash in between
redelivers the record and the client is answered after all (at least once,
as every answer).

``HeldAnswers`` owns those tasks and the last offsets each partition's batches
answered; the worker asks it what it may commit (``committable``) and has it
send and commit what is held when partitions leave (``drain``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from gateway import protocol
from gateway.batch import BatchItem, response_for
from gateway.metrics import WorkerMetrics
from gateway.produce import Sends

logger = logging.getLogger(__name__)

# hide_delay_s is at most 30 s in every override.
_MAX_HOLD_S = 30.0


class HeldAnswers:
    """The answers a worker holds back, per partition and offset.

    Parameters
    ----------
    producer
        Returns the worker's producer at send time (``None`` once stopped).
    metrics
        The worker's metrics (produce failures are counted there).
    request_timeout_s
        Time limit, in seconds, of one produce or commit
        (``kafka.request_timeout_s``).
    """

    def __init__(
        self,
        producer: Callable[[], AIOKafkaProducer | None],
        metrics: WorkerMetrics,
        request_timeout_s: float,
    ) -> None:
        self._producer = producer
        self._metrics = metrics
        self._timeout_s = request_timeout_s
        # A partition's commit stops below the first of these until it is sent.
        self._delayed: dict[TopicPartition, dict[int, asyncio.Task[None]]] = {}
        self._next_offsets: dict[TopicPartition, int] = {}

    def partitions(self) -> set[TopicPartition]:
        """Partitions that have (or had) answers held back."""
        return set(self._delayed)

    def send_later(
        self,
        item: BatchItem,
        reply_to: str,
        fallback: str | None,
        block_cooldown_ms: int,
    ) -> None:
        """Send this answer after ``item.delay_s`` without holding the batch.

        The partition's committed offset stays below the record until the
        answer is sent (``committable``), so a crash in between redelivers it
        and the client is answered then: at least once, as every answer.
        """
        tp = TopicPartition(item.topic, item.partition)
        pending = self._delayed.setdefault(tp, {})
        if item.offset in pending:
            return  # a retried batch: the first copy is still on its way

        async def send() -> None:
            try:
                await asyncio.sleep(item.delay_s)
                producer = self._producer()
                assert producer is not None
                sends = Sends(producer, self._metrics)
                response = response_for(item, protocol.now_ms(), block_cooldown_ms)
                await sends.send(reply_to, response, item.client_id, fallback=fallback)
                await sends.wait(self._timeout_s)
            except Exception:
                # Known gap: the decision record already went out; this answer
                # is lost and the client's own timeout must cover it.
                logger.warning(
                    "delayed answer not sent",
                    extra={"client": item.client_id, "request": item.request_id},
                    exc_info=True,
                )
            finally:
                pending.pop(item.offset, None)

        pending[item.offset] = asyncio.create_task(send())

    def committable(
        self, next_offsets: dict[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        """Offsets to commit: no further than the first answer still held back."""
        out = {}
        for tp, offset in next_offsets.items():
            held = self._delayed.get(tp)
            out[tp] = min(offset, min(held)) if held else offset
        return out

    def answered(self, next_offsets: dict[TopicPartition, int]) -> None:
        """Note the offsets a committed batch answered up to (exclusive)."""
        self._next_offsets.update(next_offsets)

    async def drain(self, consumer: AIOKafkaConsumer, tps: set[TopicPartition]) -> None:
        """Send the held-back answers of these partitions (at most the delay),
        then commit what the batches already answered."""
        tasks = [t for tp in tps for t in self._delayed.get(tp, {}).values()]
        if tasks:
            await asyncio.wait(tasks, timeout=_MAX_HOLD_S + self._timeout_s)
        done = {
            tp: off
            for tp, off in self._next_offsets.items()
            if tp in tps and not self._delayed.get(tp)
        }
        for tp in tps:
            self._delayed.pop(tp, None)
        if done:
            try:
                await asyncio.wait_for(consumer.commit(done), self._timeout_s)
            except (KafkaError, TimeoutError):
                logger.warning("commit after delayed answers failed; redelivery")
