"""Producing one batch's messages: started without waiting, awaited together.

``Sends`` sorts produce failures into those that retry the whole batch (the
broker may take the record later) and those that no retry will cure (the
record itself is refused), so that one bad record never stalls a partition.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka import errors as aiokafka_errors
from aiokafka.errors import KafkaError

from gateway import protocol
from gateway.batch import BatchItem
from gateway.errors import BrokerError
from gateway.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

# Errors about one record that no retry will cure; any other produce error
# retries the whole batch (aiokafka marks timeouts as not retriable, too).
REFUSED_FOR_GOOD = (
    aiokafka_errors.MessageSizeTooLargeError,
    aiokafka_errors.RecordTooLargeError,
    aiokafka_errors.InvalidTopicError,
)


def internal_answer(item: BatchItem, now_ms: int) -> protocol.InferResponse:
    """The answer to a record whose own messages could not be built: built
    from nothing but its request id, so that it cannot fail the same way."""
    return protocol.InferResponse(
        v=protocol.SCHEMA_VERSION,
        request_id=item.request_id or "",
        status="error",
        ts_ms=now_ms,
        action="reject",
        error=protocol.ErrorBody("INTERNAL", "internal error", False),
    )


class Sends:
    """The produces of one batch: started without waiting, awaited together,
    and sorted into retry-the-batch failures and failures for good."""

    def __init__(self, producer: AIOKafkaProducer, metrics: WorkerMetrics) -> None:
        self._producer = producer
        self._metrics = metrics
        self._pending: list[
            tuple[Awaitable[Any], str, bytes, bytes | None, str | None]
        ] = []
        self._retry: BaseException | None = None

    async def send(
        self, topic: str, message: Any, key: str | None, *, fallback: str | None = None
    ) -> None:
        value = protocol.encode(message)
        encoded_key = key.encode("utf-8") if key else None
        try:
            future = await self._producer.send(topic, value, key=encoded_key)
        except KafkaError as exc:
            await self._failed(exc, topic, value, encoded_key, fallback)
            return
        self._pending.append((future, topic, value, encoded_key, fallback))

    async def wait(self, timeout_s: float) -> None:
        pending, self._pending = self._pending, []
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(p[0] for p in pending), return_exceptions=True),
                timeout_s,
            )
        except TimeoutError as exc:
            raise BrokerError("produce timed out") from exc
        for result, (_, topic, value, key, fallback) in zip(
            results, pending, strict=True
        ):
            if isinstance(result, KafkaError):
                await self._failed(result, topic, value, key, fallback)
            elif isinstance(result, Exception):
                # Not the broker's word on the record: assume the worst and
                # serve the batch again.
                self._retry = result
        if self._pending:  # fallbacks started by _failed
            await self.wait(timeout_s)
        if self._retry is not None:
            raise BrokerError(f"produce failed: {self._retry!r}") from self._retry

    async def _failed(
        self,
        exc: KafkaError,
        topic: str,
        value: bytes,
        key: bytes | None,
        fallback: str | None,
    ) -> None:
        permanent = isinstance(exc, REFUSED_FOR_GOOD)
        if not permanent and fallback is None:
            # Timeouts, a fenced or closed producer, a missing ACL...: the
            # broker may take the record later, so the batch is served again.
            self._retry = exc
            return
        self._metrics.produce_failures.labels(type(exc).__name__).inc()
        if fallback is not None:
            logger.warning(
                "reply topic %s refused an answer (%r); using %s", topic, exc, fallback
            )
            await self.send(
                fallback, msgspec.Raw(value), None if key is None else key.decode()
            )
            return
        logger.error(
            "record for %s refused by the broker and lost: %r",
            topic,
            exc,
            extra={"bytes": len(value)},
        )
