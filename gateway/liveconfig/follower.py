"""The worker's side of live configuration: follow the topic, apply, acknowledge.

A ``ConfigFollower`` reads ``live.topic`` with a consumer of its own (no
group, from the beginning, so a worker starting late still finds the newest
version) and keeps the newest valid record it has seen as *pending*. The
worker calls :meth:`ConfigFollower.apply_pending` between batches, so a batch
never runs half on one version and half on the next. Each applied or refused
version is acknowledged in the Redis hash ``{prefix}:config:acks`` and
re-stated every ``live.heartbeat_s``.

Imports Kafka, Redis and the gateway's config; never the worker itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from gateway.config import Settings
from gateway.errors import BrokerError, ConfigError, StoreError
from gateway.liveconfig.document import ConfigRecord, LiveConfig
from gateway.liveconfig.service import WorkerAck, acks_key
from gateway.metrics import WorkerMetrics
from gateway.store import RedisClient, redis_guard
from gateway.topics import ensure_compacted_topic

logger = logging.getLogger(__name__)

_FETCH_WAIT_MS = 100
_RETRY_S = 1.0
# Acknowledgements of workers gone this long are removed from the hash.
_FORGET_AFTER_TTLS = 20


class ConfigFollower:
    """Follows the configuration topic for one worker.

    Parameters
    ----------
    settings
        ``live.*``, ``kafka.bootstrap``, ``redis.key_prefix``.
    redis
        The worker's Redis client (acknowledgements go there).
    worker_id
        Key of this worker's acknowledgement.
    apply
        Called with a new document between batches; raises ``ValueError`` or
        ``ConfigError`` to refuse it, having changed nothing.
    metrics
        ``config_version`` and ``config_refused`` are kept up to date.
    """

    def __init__(
        self,
        settings: Settings,
        redis: RedisClient,
        worker_id: str,
        apply: Callable[[LiveConfig], None],
        metrics: WorkerMetrics,
    ) -> None:
        self.settings = settings
        self.version = 0
        self.applied_at_ms = int(time.time() * 1000)
        self._redis = redis
        self._worker_id = worker_id
        self._apply = apply
        self._metrics = metrics
        self._tp = TopicPartition(settings.live.topic, 0)
        self._consumer: AIOKafkaConsumer | None = None
        self._pending: ConfigRecord | None = None
        self._newest_seen = 0
        self._refused: tuple[int, str] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Read the topic to its end, so that the newest version is pending
        before the worker serves anything, then follow it in the background."""
        if self._consumer is not None:
            return
        s = self.settings
        timeout_s = s.kafka.request_timeout_s
        await ensure_compacted_topic(s, s.live.topic)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka.bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=_FETCH_WAIT_MS,
            request_timeout_ms=int(timeout_s * 1000) + 10_000,
        )
        try:
            await asyncio.wait_for(consumer.start(), timeout_s)
            consumer.assign([self._tp])
            await consumer.seek_to_beginning(self._tp)
            async with asyncio.timeout(timeout_s):
                end = (await consumer.end_offsets([self._tp]))[self._tp]
                while await consumer.position(self._tp) < end:
                    await self._fetch(consumer)
        except (KafkaError, TimeoutError, OSError) as exc:
            await consumer.stop()
            raise BrokerError(
                f"cannot read the configuration topic {self._tp.topic}: {exc!r}"
            ) from exc
        self._consumer = consumer
        self._tasks = [
            asyncio.create_task(self._follow(), name="config-follow"),
            asyncio.create_task(self._heartbeat(), name="config-heartbeat"),
        ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        # gather, not a suppress around each await: a cancellation of stop()
        # itself must still propagate.
        await asyncio.gather(*tasks, return_exceptions=True)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await asyncio.wait_for(
                consumer.stop(), self.settings.kafka.request_timeout_s
            )

    async def apply_pending(self) -> bool:
        """Apply the newest version seen, if newer than the one running.
        Returns whether a version was applied. Call between batches only."""
        record, self._pending = self._pending, None
        if record is None or record.version <= self.version:
            return False
        try:
            self._apply(record.document)
        except (ConfigError, ValueError) as exc:
            reason = exc.message if isinstance(exc, ConfigError) else str(exc)
            self._refuse(record.version, reason)
            await self.acknowledge()
            return False
        self.version = record.version
        self.applied_at_ms = int(time.time() * 1000)
        self._metrics.config_version.set(record.version)
        logger.info(
            "configuration version %d applied (by %s: %s)",
            record.version,
            record.author,
            record.summary,
            extra={"version": record.version, "worker": self._worker_id},
        )
        await self.acknowledge()
        return True

    # -- background ----------------------------------------------------------------

    async def _fetch(self, consumer: AIOKafkaConsumer) -> None:
        batch = await consumer.getmany(self._tp, timeout_ms=_FETCH_WAIT_MS * 5)
        for message in batch.get(self._tp, []):
            try:
                record = ConfigRecord.decode(message.value or b"")
            except ConfigError as exc:
                # Refused here too, whoever wrote it: the running version stays.
                key = (message.key or b"").decode(errors="replace")
                version = int(key[1:]) if key[1:].isdigit() else -1
                self._refuse(version, exc.message)
                continue
            if record.version > self._newest_seen:
                self._newest_seen = record.version
                self._pending = record

    async def _follow(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            try:
                await self._fetch(consumer)
            except KafkaError as exc:
                # The consumer reconnects by itself; keep following.
                logger.warning("configuration fetch failed, retrying: %r", exc)
                await asyncio.sleep(_RETRY_S)
            except Exception:
                # A bug here must not silently end live updates for good.
                logger.exception("configuration follower failed; retrying")
                await asyncio.sleep(_RETRY_S)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.live.heartbeat_s)
            try:
                await self.acknowledge(prune=True)
            except Exception:
                logger.exception("configuration heartbeat failed; retrying")

    def _refuse(self, version: int, reason: str) -> None:
        self._refused = (version, reason[:1000])
        self._metrics.config_refused.inc()
        logger.error(
            "configuration version %d refused, keeping version %d: %s",
            version,
            self.version,
            reason,
            extra={"version": version, "worker": self._worker_id},
        )

    async def acknowledge(self, prune: bool = False) -> None:
        """Write this worker's running version; Redis trouble is logged, and
        the next heartbeat tries again."""
        now_ms = int(time.time() * 1000)
        ack = WorkerAck(
            worker_id=self._worker_id,
            version=self.version,
            applied_at_ms=self.applied_at_ms,
            seen_at_ms=now_ms,
            refused_version=self._refused[0] if self._refused else None,
            refused_reason=self._refused[1] if self._refused else None,
        )
        key = acks_key(self.settings)
        try:
            async with redis_guard(
                "config ack", self.settings.redis.socket_timeout_s, self._redis
            ):
                await self._redis.hset(key, self._worker_id, ack.model_dump_json())
                if prune:
                    await self._prune(key, now_ms)
        except StoreError as exc:
            logger.warning(
                "configuration acknowledgement not written: %s",
                exc.message,
                extra={"worker": self._worker_id},
            )

    async def _prune(self, key: str, now_ms: int) -> None:
        forget_ms = self.settings.live.ack_ttl_s * _FORGET_AFTER_TTLS * 1000
        gone = []
        for field, blob in (await self._redis.hgetall(key)).items():
            try:
                seen = WorkerAck.model_validate_json(blob).seen_at_ms
            except ValueError:
                seen = 0
            if now_ms - seen > forget_ms:
                gone.append(field)
        if gone:
            await self._redis.hdel(key, *gone)
