"""The gateway worker: consume requests in batches, decide, answer, commit.

One batch flows through fixed steps: decode, authenticate, validate, answer
retries of already served requests from the replay cache (gateway/replay.py),
admit (one Redis round trip), score with the detectors, apply policy, run the model
once per model, produce every response, alert, decision and dead-letter record,
and only then commit the batch's offsets. A crash anywhere before the commit
means the batch is delivered again (at-least-once); the admission script tells
a redelivery from a replay by the record's partition and offset.

This module owns Kafka and Redis I/O; detection lives in ``detectors`` and the
action ladder in ``gateway.policy``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Sequence
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from gateway import protocol
from gateway.backends import ModelBackend, close_backends, load_backends
from gateway.batch import (
    BatchItem,
    alerts_for,
    deadletter_for,
    decision_for,
    decode_record,
    response_for,
)
from gateway.clientview import ClientView
from gateway.config import LimitsConfig, Settings
from gateway.errors import (
    AuthError,
    BrokerError,
    ModelgateError,
    PolicyError,
    StoreError,
    ValidationError,
)
from gateway.groups import CrossClient
from gateway.keys import KeyStore, authenticate, load_server_key
from gateway.limits import Admitter
from gateway.liveconfig.document import LiveConfig
from gateway.liveconfig.follower import ConfigFollower
from gateway.metrics import WorkerMetrics
from gateway.produce import Sends, internal_answer
from gateway.replay import ReplayCache
from gateway.scoring import Scorer
from gateway.store import AdmitItem, CounterStore, RedisClient, redis_from_settings
from gateway.throttle import ThrottleCheck, ThrottleStore
from gateway.topics import ensure_topics
from gateway.validation import validate_request

logger = logging.getLogger(__name__)

_STATE_TTL_S = 7 * 86_400
_TOPIC_REFRESH_S = 30.0
# The producer's default partitioner (murmur2, as Kafka's Java client), so
# that the partition a client's records must be on is the one they land on.
_PARTITIONER = DefaultPartitioner()
_MIN_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 5.0
_UNKNOWN_REFRESH_S = 2.0


def _under_prefix(topic: str, prefix: str) -> bool:
    return topic == prefix or topic.startswith(prefix + ".")


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # untyped base
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._worker._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._worker.assigned.set()
        logger.info(
            "partitions assigned",
            extra={"partitions": sorted(tp.partition for tp in assigned)},
        )


class Worker:
    """A gateway worker: one member of the ``kafka.group_id`` consumer group.

    Use as ``async with Worker(settings) as w: await w.run(stop_event)``.
    ``start``/``stop`` are idempotent. ``run`` returns after ``stop_event`` is
    set and the batch in hand has been answered and committed.
    """

    def __init__(
        self, settings: Settings, *, models: dict[str, ModelBackend] | None = None
    ) -> None:
        self.settings = settings
        self.metrics = WorkerMetrics()
        self._models = models
        # Backends this worker opened (not ones passed in) are closed by stop().
        self._owns_models = models is None
        self._scorer: Scorer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._redis: RedisClient | None = None
        self._keys: KeyStore | None = None
        self._store: CounterStore | None = None
        self._live: ConfigFollower | None = None
        self._admitter: Admitter | None = None
        self._replays: ReplayCache | None = None
        self._throttle: ThrottleStore | None = None
        # Answers held back by hidden suspicion, per partition and offset; a
        # partition's commit stops below the first of them until it is sent.
        self._delayed: dict[TopicPartition, dict[int, asyncio.Task[None]]] = {}
        self._next_offsets: dict[TopicPartition, int] = {}
        self._clientview: ClientView | None = None
        self._cross: CrossClient | None = None
        # Held while a batch is in flight, so a revoke waits for it to commit.
        self._batch_lock = asyncio.Lock()
        self._client_tp: dict[str, TopicPartition] = {}
        self._reply_topics: set[str] = set()
        self._reply_topics_at = 0.0
        self._started = False
        self.batches_done = 0
        self.metrics_port = 0
        self._backoff_s = _MIN_BACKOFF_S
        # Set once the group has given this worker its first assignment (which
        # may be empty when there are more workers than partitions).
        self.assigned = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._started:
            return
        s = self.settings
        timeout_s = s.kafka.request_timeout_s

        # Models and detectors first: a bad model file should fail before we
        # join the group and take partitions we cannot serve.
        loop = asyncio.get_running_loop()
        if self._models is None:
            self._models = await loop.run_in_executor(None, self._load_models)
        # File I/O (and an fsync when the key is new): off the event loop.
        server_key = await loop.run_in_executor(None, load_server_key, s)
        self._scorer = Scorer(s, self._models, self.metrics)
        # Before joining the group: a port clash (ConfigError) should stop the
        # worker before it takes partitions it could not report on.
        self.metrics_port = self.metrics.serve(
            s.worker.metrics_host, s.worker.metrics_port
        )

        self._redis = redis_from_settings(s)
        self._keys = KeyStore(self._redis, s, server_key=server_key)
        self._store = CounterStore(self._redis, s)
        self._admitter = Admitter(self._store, self.metrics.decisions_without_store)
        self._replays = ReplayCache(self._redis, self._store, s)
        self._throttle = ThrottleStore(self._redis, s)
        self._clientview = ClientView(self._redis, s)
        self._cross = CrossClient(self._redis, s)

        try:
            await ensure_topics(s)
            # The newest live configuration before serving anything, so a
            # worker started late runs the same version as the others.
            self._live = ConfigFollower(
                s, self._redis, s.worker.worker_id, self._apply_live, self.metrics
            )
            await self._live.start()
            await self._live.apply_pending()
            await self._live.acknowledge()
        except BaseException:
            await self.stop()  # the metrics port and Redis pool are open
            raise
        self._producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            request_timeout_ms=int(timeout_s * 1000),
        )
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka.bootstrap,
            group_id=s.kafka.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=s.kafka.session_timeout_ms,
            heartbeat_interval_ms=s.kafka.heartbeat_interval_ms,
            max_partition_fetch_bytes=max(s.kafka.max_message_bytes * 4, 1_048_576),
            # Backstop for the same race: a topic (re)created later is seen
            # within 10 s rather than the default 5 minutes.
            metadata_max_age_ms=10_000,
            request_timeout_ms=int(timeout_s * 1000) + 10_000,
        )
        try:
            await asyncio.wait_for(self._producer.start(), timeout_s)
            # Wait until the broker's metadata lists the requests topic. A
            # consumer that joins the group before then is assigned nothing
            # and would only notice the topic at its next metadata refresh.
            await asyncio.wait_for(
                self._producer.partitions_for(s.kafka.topics.requests), timeout_s
            )
            await asyncio.wait_for(self._consumer.start(), timeout_s)
        except (KafkaError, TimeoutError, OSError) as exc:
            await self.stop()
            raise BrokerError(f"cannot reach Kafka at {s.kafka.bootstrap}") from exc
        self._consumer.subscribe([s.kafka.topics.requests], listener=_Rebalance(self))
        self._started = True
        logger.info(
            "worker started",
            extra={"worker": s.worker.worker_id, "group": s.kafka.group_id},
        )

    @property
    def config_version(self) -> int:
        """Live configuration version in force (0: the settings file's)."""
        return self._live.version if self._live is not None else 0

    def _apply_live(self, document: LiveConfig) -> None:
        """Swap in a live configuration; raises ``ValueError`` (changing
        nothing) when this worker cannot run it."""
        assert self._scorer is not None and self._store is not None
        self._scorer.apply_live(
            document.policy, document.detectors, document.detector_shadow
        )
        self.set_limits(document.limits)
        # Everything reading policy from the settings sees the change.
        self.settings = self.settings.model_copy(update={"policy": document.policy})

    def _load_models(self) -> dict[str, ModelBackend]:
        return load_backends(self.settings, self.metrics)

    async def stop(self) -> None:
        """Leave the group, flush produces and close connections. Idempotent."""
        consumer, producer, redis_client = self._consumer, self._producer, self._redis
        self._consumer = self._producer = self._redis = None
        live, self._live = self._live, None
        timeout_s = self.settings.kafka.request_timeout_s
        try:
            if live is not None:
                await live.stop()
            if consumer is not None:
                await self._drain_delayed(consumer, set(self._delayed))
                # Snapshot before leaving, so the next owner of these clients
                # starts from their history instead of from nothing.
                await self._snapshot(list(self._client_tp))
                await asyncio.wait_for(consumer.stop(), timeout_s)
        finally:
            try:
                if producer is not None:
                    await asyncio.wait_for(producer.stop(), timeout_s)
            finally:
                self.metrics.close()
                if redis_client is not None:
                    await redis_client.aclose()
                if self._owns_models and self._models is not None:
                    models, self._models = self._models, None
                    close_backends(models)
        if self._started:
            logger.info(
                "worker stopped", extra={"worker": self.settings.worker.worker_id}
            )
        self._started = False

    async def run(self, stop_event: asyncio.Event) -> None:
        """Consume until ``stop_event`` is set; each batch is committed before
        the next is fetched."""
        assert self._consumer is not None, "start() first"
        kafka = self.settings.kafka
        while not stop_event.is_set():
            if self._live is not None:
                # Between batches: no batch runs on two configuration versions.
                await self._live.apply_pending()
            try:
                batch = await self._consumer.getmany(
                    timeout_ms=kafka.poll_timeout_ms,
                    max_records=kafka.max_batch_records,
                )
            except KafkaError as exc:
                # The consumer reconnects by itself; a fetch error must not end
                # the worker (a restart would only meet it again).
                logger.warning("fetch failed, retrying: %r", exc)
                await asyncio.sleep(self._backoff_s)
                continue
            if not batch:
                continue
            async with self._batch_lock:
                # A revoke may have run between the fetch and the lock: those
                # records now belong to another worker, which will serve them.
                owned = self._consumer.assignment()
                batch = {tp: rs for tp, rs in batch.items() if tp in owned}
                if batch:
                    await self._handle_batch(batch)

    # -- one batch ---------------------------------------------------------------

    async def _handle_batch(self, batch: dict[TopicPartition, list[Any]]) -> None:
        assert self._consumer is not None
        first_offsets = {tp: records[0].offset for tp, records in batch.items()}
        last_offsets = {tp: records[-1].offset for tp, records in batch.items()}
        for tp, offset in last_offsets.items():
            # Lag as of this fetch: records on the broker behind this batch.
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                    max(highwater - offset - 1, 0)
                )
        try:
            await self.process_records(
                [(tp, r) for tp, records in batch.items() for r in records]
            )
            next_offsets = {tp: off + 1 for tp, off in last_offsets.items()}
            await asyncio.wait_for(
                self._consumer.commit(self._committable(next_offsets)),
                self.settings.kafka.request_timeout_s,
            )
            self._next_offsets.update(next_offsets)
        except (BrokerError, StoreError, KafkaError, TimeoutError) as exc:
            # Kafka or Redis is in trouble. Answers may be half produced; rewind
            # so the whole batch comes again: clients tolerate a duplicate
            # answer (admission recognises the same record as a redelivery),
            # never a missing one.
            logger.warning(
                "batch not committed, retrying in %.1f s: %r",
                self._backoff_s,
                exc,
                extra={"offsets": {tp.partition: o for tp, o in first_offsets.items()}},
            )
            for tp, offset in first_offsets.items():
                if tp in self._consumer.assignment():
                    self._consumer.seek(tp, offset)
            await asyncio.sleep(self._backoff_s)  # back off a service in trouble
            self._backoff_s = min(self._backoff_s * 2, _MAX_BACKOFF_S)
            return
        self._backoff_s = _MIN_BACKOFF_S
        self.batches_done += 1

    async def process_records(
        self, records: Sequence[tuple[TopicPartition, Any]]
    ) -> None:
        """Serve one batch of consumer records end to end, producing every
        answer; raises ``BrokerError`` if the produces did not all succeed."""
        timer = _StageTimer(self.metrics)
        self.metrics.batch_size.observe(len(records))
        items = [self._decode(tp, record) for tp, record in records]
        timer.lap("decode")

        replays: list[BatchItem] = []
        try:
            await self._authenticate(items)
            timer.lap("auth")
            self._validate(items)
            timer.lap("validate")
            # Retries of served requests take their kept answer and leave the
            # batch here: not admitted (so not counted), scored or predicted.
            assert self._replays is not None
            try:
                replays = await self._replays.take_replays(items)
            except StoreError:
                # Redis is down: admission's fail mode decides next (retry
                # rewinds the batch; open and closed answer now, and then a
                # retry of a served id is not recognised, as dedupe is not).
                logger.warning("replay lookup skipped: Redis unreachable")
            if replays:
                self.metrics.replays.inc(len(replays))
                items = [i for i in items if i.replay is None]
            await self._admit(items)
            timer.lap("admit")
            await self._load_new_clients(items)
            await self._apply_throttle(items)

            assert self._scorer is not None
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self._scorer.score_and_predict, items)
            timer.lap("detect_predict")
            if self._cross is not None:
                await self._cross.after_scoring(items, self._scorer.take_fingerprints())
                self._scorer.note_groups(items)
            timer.lap("cross_client")
            await self._enforce_blocks(items)
            await self._release_unserved(items)
            assert self._clientview is not None
            await self._clientview.observe(items, self._scorer)
            timer.lap("record")
        except (asyncio.CancelledError, StoreError, BrokerError):
            raise
        except Exception:
            # A bug must cost this batch's answers, not the worker: every request
            # not yet refused gets INTERNAL and the partition moves on.
            logger.exception(
                "batch failed before produce; answering INTERNAL",
                extra={"records": len(items)},
            )
            for item in items:
                if item.error is None:
                    item.fail(ModelgateError("internal error", code="INTERNAL"))

        await self._produce([*items, *replays])
        timer.lap("produce")
        await self._release_in_flight(items)

    def _decode(self, tp: TopicPartition, record: Any) -> BatchItem:
        max_bytes = self.settings.kafka.max_message_bytes
        try:
            return decode_record(tp.topic, tp.partition, record, max_bytes)
        except Exception:
            # Whatever the codec does with hostile bytes costs this record,
            # never the worker: it is dead-lettered as INTERNAL.
            logger.exception(
                "decoder failed",
                extra={"partition": tp.partition, "offset": record.offset},
            )
            item = BatchItem(
                topic=tp.topic,
                partition=tp.partition,
                offset=record.offset,
                value=record.value or b"",
                record_key="",
                signature=None,
            )
            item.fail(ModelgateError("could not decode the message", code="INTERNAL"))
            return item

    async def _authenticate(self, items: list[BatchItem]) -> None:
        assert self._keys is not None
        live = [i for i in items if i.error is None and i.request is not None]
        if not live:
            return
        # Redis unreachable: keys this worker read recently come from its
        # cache, and admission applies each plan's fail mode. A key not in the
        # cache has no plan to ask, so the limits' default fail mode decides:
        # "retry" retries the batch (StoreError), otherwise its requests are
        # refused STORE_UNAVAILABLE.
        keys, unavailable = await self._keys.get_many_or_stale(
            {i.request.key_id for i in live if i.request}
        )
        if unavailable and self.settings.limits.fail_mode == "retry":
            raise StoreError("redis unreachable and api keys not cached")
        now_ms = protocol.now_ms()
        max_skew_ms = int(self.settings.auth.max_clock_skew_s * 1000)
        for item in live:
            request = item.request
            assert request is not None
            if request.key_id in unavailable:
                self.metrics.decisions_without_store.labels("closed").inc()
                item.fail(StoreError("the key store is unreachable; retry later"))
                continue
            try:
                key = authenticate(
                    keys.get(request.key_id),
                    item.value,
                    item.signature,
                    request.ts_ms,
                    request.model,
                    now_ms,
                    max_skew_ms,
                )
                self._check_placement(item, key.client_id)
            except ModelgateError as exc:
                item.fail(exc)
            else:
                item.key = key

    def _check_placement(self, item: BatchItem, client_id: str) -> None:
        """Refuse a record not keyed, or not partitioned, by its client's id.

        Each worker must see the whole stream of the clients it owns (the
        detectors judge a stream, not a query), so a client may not spread its
        queries over partitions by varying the record key or by choosing a
        partition itself.
        """
        if item.record_key != client_id:
            raise AuthError(
                "the record key must be the API key's client id",
                code="AUTH_WRONG_PARTITION",
            )
        assert self._consumer is not None
        partitions = self._consumer.partitions_for_topic(item.topic)
        if partitions:
            ids = sorted(partitions)
            expected = _PARTITIONER(client_id.encode("utf-8"), ids, ids)
            if expected != item.partition:
                raise AuthError(
                    f"a record of this client belongs on partition {expected}",
                    code="AUTH_WRONG_PARTITION",
                )

    def _validate(self, items: list[BatchItem]) -> None:
        assert self._models is not None
        for item in items:
            if item.error is not None or item.request is None:
                continue
            model = self._models.get(item.request.model)
            if model is None:
                item.fail(
                    ValidationError(
                        f"model {item.request.model!r} is not served",
                        code="UNKNOWN_MODEL",
                    )
                )
                continue
            item.model = model
            try:
                item.rows = validate_request(item.request, model.signature)
            except ValidationError as exc:
                item.fail(exc)

    def set_limits(self, limits: LimitsConfig) -> None:
        """Put new plans and limits in force from the next batch on, without a
        restart (for the live configuration)."""
        self.settings = self.settings.model_copy(update={"limits": limits})
        if self._store is not None:
            self._store.set_limits(limits)
        if self._throttle is not None:
            self._throttle.set_limits(limits)

    async def _admit(self, items: list[BatchItem]) -> None:
        assert self._admitter is not None
        live = [i for i in items if i.error is None and i.key is not None]
        if not live:
            return
        admit_items = [
            AdmitItem(
                client_id=i.key.client_id,
                request_id=i.request.request_id,
                delivery=f"{i.partition}:{i.offset}",
                cost=1,
                plan=i.key.plan,
                overrides=i.key.limit_overrides,
            )
            for i in live
            if i.key is not None and i.request is not None
        ]
        # Redis unreachable: each rule's fail mode decides (gateway.limits).
        # In the default mode, "retry", StoreError propagates and the batch is
        # retried. Answering it as refused would be worse: if the script did
        # run before the connection failed, the client's retry under the same
        # request id would then be refused as a duplicate; "closed" accepts
        # that risk for an answer now.
        admissions = await self._admitter.admit(admit_items)
        for item, admission in zip(live, admissions, strict=True):
            item.admission = admission
            item.query_index = admission.client_requests
            if admission.outcome == "duplicate":
                item.fail(
                    PolicyError(
                        f"request id {item.request_id!r} was already used",
                        code="DUPLICATE_REQUEST",
                    ),
                    action="reject",
                )
            elif admission.outcome == "rate_limited":
                item.fail(
                    PolicyError(
                        "rate limit exceeded", code="RATE_LIMITED", retriable=True
                    ),
                    action="throttle",
                )
            elif admission.outcome == "blocked":
                item.fail(
                    PolicyError("client is blocked", code="BLOCKED", retriable=True),
                    action="block",
                )
            elif admission.outcome == "quota_exceeded":
                item.fail(
                    PolicyError(
                        "daily quota used up; it resets at midnight UTC",
                        code="QUOTA_EXCEEDED",
                        retriable=True,
                    ),
                    action="throttle",
                )
            elif admission.outcome == "too_many_in_flight":
                item.fail(
                    PolicyError(
                        "too many requests in flight",
                        code="TOO_MANY_IN_FLIGHT",
                        retriable=True,
                    ),
                    action="throttle",
                )
            elif admission.outcome == "store_unavailable":
                item.fail(
                    StoreError("the counter store is unreachable; retry later"),
                    action="reject",
                )

    async def _load_new_clients(self, items: list[BatchItem]) -> None:
        """Bring in the snapshot of clients this worker sees for the first time
        (after a rebalance or restart), in one round trip."""
        assert self._store is not None and self._scorer is not None
        new = {
            i.key.client_id: TopicPartition(i.topic, i.partition)
            for i in items
            if i.key is not None and i.key.client_id not in self._client_tp
        }
        if not new:
            return
        # A StoreError propagates (the batch is retried): marking the clients
        # known with empty state would let the next revoke erase their history.
        # Except when this batch was admitted without Redis (fail modes open
        # or closed): then the clients are served with fresh detector state
        # and stay unknown, so a later batch loads their snapshot.
        try:
            blobs = await self._store.load_states(list(new))
        except StoreError:
            if not _decided_without_store(items):
                raise
            logger.warning(
                "detector state of new clients not loaded", extra={"clients": len(new)}
            )
            return
        self._client_tp.update(new)
        self.metrics.clients.set(len(self._client_tp))
        for client_id, blob in blobs.items():
            self._scorer.restore(client_id, blob)

    async def _enforce_blocks(self, items: list[BatchItem]) -> None:
        assert self._store is not None
        to_block = {
            i.key.client_id: i.verdict
            for i in items
            if i.key is not None
            and i.verdict is not None
            and i.verdict.enforced == "block"
            # 0: a redelivered record's standing, not a new block.
            and i.verdict.cooldown_s > 0
        }
        for client_id, verdict in to_block.items():
            try:
                await self._store.block(
                    client_id,
                    verdict.cooldown_s or self.settings.policy.block_cooldown_s,
                    "; ".join(verdict.reasons) if verdict else "",
                )
            except StoreError:
                # The answers still say BLOCKED; the next batch re-derives the
                # block from the same detector state.
                logger.warning("block not stored", extra={"client": client_id})

    async def _release_unserved(self, items: list[BatchItem]) -> None:
        """Requests admitted but then refused (model failure, a block decided
        on this very query) give their request id back, so that the retry
        their answer invites is not refused as a duplicate."""
        assert self._store is not None
        unserved = [
            (i.key.client_id, i.request.request_id)
            for i in items
            if i.error is not None
            and i.admission is not None
            and i.admission.outcome == "ok"
            and i.key is not None
            and i.request is not None
        ]
        try:
            await self._store.release_requests(unserved)
        except StoreError:
            # Without Redis (fail modes open/closed) the batch is answered
            # anyway; the cost is that a retry of these ids within the replay
            # window may be refused as a duplicate.
            if not _decided_without_store(items):
                raise
            logger.warning("unserved request ids not released")

    async def _release_in_flight(self, items: list[BatchItem]) -> None:
        """Answered requests give back their in-flight slot. A failure only
        delays that until the slot's safety expiry (the in-flight rule's
        ``ttl_s``): the answers are out, so the batch must not be retried."""
        assert self._admitter is not None
        held = [
            (i.key.client_id, i.request.request_id, i.admission)
            for i in items
            if i.admission is not None
            and i.admission.in_flight
            and i.key is not None
            and i.request is not None
        ]
        if not held:
            return
        try:
            await self._admitter.release(held)
        except StoreError as exc:
            logger.warning(
                "in-flight slots not released; they expire by themselves: %s",
                exc,
                extra={"requests": len(held)},
            )

    async def _produce(self, items: list[BatchItem]) -> None:
        """Produce every answer, decision, alert and dead-letter record of the
        batch without waiting per message, then wait for all of them.

        Raises ``BrokerError`` when a send failed in a way worth retrying (the
        batch is then served again). A send the broker refuses for good (a
        record too large, a reply topic that rejects it) must not stall the
        partition: an answer bound for a client's own reply topic goes to the
        shared responses topic instead, anything else is logged as lost.
        """
        assert self._producer is not None
        now_ms = protocol.now_ms()
        reply_topics = await self._known_reply_topics(items)
        sends = Sends(self._producer, self.metrics)

        kept: list[tuple[BatchItem, bytes]] = []
        # Request counts per label set, added once per batch: a label lookup
        # per record cost more than the count.
        counted: collections.Counter[tuple[str, str, str]] = collections.Counter()
        for item in items:
            counted[
                (
                    item.model.name if item.model is not None else "-",
                    item.action,
                    item.error.code if item.error else "",
                )
            ] += 1
        for labels, count in counted.items():
            self.metrics.requests.labels(*labels).inc(count)
        for item in items:
            try:
                await self._produce_item(item, sends, reply_topics, now_ms, kept)
            except Exception:
                # A fault building one record's messages costs that record's
                # answer (INTERNAL), not the batch and not the worker.
                logger.exception(
                    "could not build the answers of a record",
                    extra={"partition": item.partition, "offset": item.offset},
                )
                if item.request_id is not None:
                    await sends.send(
                        self.settings.kafka.topics.responses,
                        internal_answer(item, now_ms),
                        item.client_id,
                    )

        await sends.wait(self.settings.kafka.request_timeout_s)
        # Only once every answer is out, before the commit: a batch served
        # again after a failure finds its own answers kept and repeats them.
        assert self._replays is not None
        await self._replays.keep(kept)

    async def _produce_item(
        self,
        item: BatchItem,
        sends: Sends,
        reply_topics: set[str],
        now_ms: int,
        kept: list[tuple[BatchItem, bytes]],
    ) -> None:
        topics = self.settings.kafka.topics
        worker_id = self.settings.worker.worker_id
        block_cooldown_ms = int(self.settings.policy.block_cooldown_s * 1000)
        if item.verdict is not None and item.verdict.cooldown_s > 0:
            # The cool-down of the rule that blocked (per model or plan).
            block_cooldown_ms = int(item.verdict.cooldown_s * 1000)
        # Only an authenticated client's id keys its answers: a record's
        # own key is the sender's claim and must not let it pose as a
        # client (a reader matching answers by record key would be fooled).
        key = item.client_id

        # The answer, wherever a request id tells us who is waiting.
        if item.request_id is not None:
            reply_to = self._reply_topic(item, reply_topics)
            fallback = topics.responses if reply_to != topics.responses else None
            if item.delay_s > 0 and item.error is None:
                self._send_later(item, reply_to, fallback, block_cooldown_ms)
            else:
                response = response_for(item, now_ms, block_cooldown_ms)
                # Encoded once, for the replay cache and the send alike.
                value = protocol.encode(response)
                if response.status == "ok" and item.replay is None:
                    kept.append((item, value))
                await sends.send(reply_to, msgspec.Raw(value), key, fallback=fallback)

        # Audit: one decision per record, answered or not.
        await sends.send(topics.decisions, decision_for(item, now_ms, worker_id), key)

        for event in alerts_for(item, worker_id):
            self.metrics.alerts.labels(event["data"]["detector"]).inc()
            logger.info(
                "alert",
                extra={
                    "client": item.client_id,
                    "detector": event["data"]["detector"],
                    "request": item.request_id,
                },
            )
            await sends.send(topics.alerts, event, key)

        # Bad messages keep (the head of) their bytes on the dead-letter topic.
        dead = deadletter_for(item, now_ms, worker_id)
        if dead is not None:
            self.metrics.deadletters.labels(dead.code).inc()
            logger.info(
                "dead-lettered %s",
                dead.code,
                extra={
                    "partition": item.partition,
                    "offset": item.offset,
                    "request": item.request_id,
                },
            )
            await sends.send(topics.deadletter, dead, key)

    def _reply_topic(self, item: BatchItem, known: set[str]) -> str:
        """Where the answer goes. A client may name its own reply topic under the
        configured prefix; an unknown or foreign name falls back to the shared
        responses topic, because producing to a missing topic would stall the
        whole batch waiting for its metadata."""
        default = self.settings.kafka.topics.responses
        wanted = item.reply_to
        if wanted and _under_prefix(wanted, self.settings.worker.reply_topic_prefix):
            return wanted if wanted in known else default
        return default

    async def _known_reply_topics(self, items: list[BatchItem]) -> set[str]:
        """Topics that exist, refreshed every 30 s, or sooner (at most every
        2 s) when a request names a reply topic not yet known."""
        assert self._consumer is not None
        prefix = self.settings.worker.reply_topic_prefix
        age_s = time.monotonic() - self._reply_topics_at
        unknown = any(
            i.reply_to
            and _under_prefix(i.reply_to, prefix)
            and i.reply_to not in self._reply_topics
            for i in items
        )
        if age_s > _TOPIC_REFRESH_S or (unknown and age_s > _UNKNOWN_REFRESH_S):
            try:
                self._reply_topics = set(
                    await asyncio.wait_for(
                        self._consumer.topics(), self.settings.kafka.request_timeout_s
                    )
                )
            except (KafkaError, TimeoutError):
                logger.warning("could not refresh topic list; keeping the old one")
            self._reply_topics_at = time.monotonic()
        return self._reply_topics

    # -- policy: throttle and delayed answers -------------------------------------

    async def _apply_throttle(self, items: list[BatchItem]) -> None:
        """Refuse the requests of throttled clients beyond their penalised rate
        (gateway/throttle.py); one round trip, and none when no client of the
        batch is throttled."""
        assert self._scorer is not None and self._throttle is not None
        live: dict[str, list[BatchItem]] = {}
        for item in items:
            if (
                item.error is None
                and item.key is not None
                and item.admission is not None
                and item.admission.outcome == "ok"
            ):
                live.setdefault(item.key.client_id, []).append(item)
        checks = [
            ThrottleCheck(client_id, factor, len(client_items))
            for client_id, client_items in live.items()
            if (factor := self._scorer.policy.rate_factor(client_id)) > 1.0
        ]
        if not checks:
            return
        # A StoreError propagates: the batch is retried, as for admission.
        results = await self._throttle.check(checks)
        for check, waits in zip(checks, results, strict=True):
            for item, wait_ms in zip(live[check.client_id], waits, strict=True):
                if wait_ms > 0:
                    item.fail(
                        PolicyError(
                            "rate limit exceeded", code="RATE_LIMITED", retriable=True
                        ),
                        action="throttle",
                    )
                    item.throttle_retry_ms = wait_ms

    def _send_later(
        self,
        item: BatchItem,
        reply_to: str,
        fallback: str | None,
        block_cooldown_ms: int,
    ) -> None:
        """Send this answer after ``item.delay_s`` without holding the batch.

        The partition's committed offset stays below the record until the
        answer is sent (``_committable``), so a crash in between redelivers it
        and the client is answered then: at least once, as every answer.
        """
        tp = TopicPartition(item.topic, item.partition)
        pending = self._delayed.setdefault(tp, {})
        if item.offset in pending:
            return  # a retried batch: the first copy is still on its way

        async def send() -> None:
            try:
                await asyncio.sleep(item.delay_s)
                assert self._producer is not None
                sends = Sends(self._producer, self.metrics)
                response = response_for(item, protocol.now_ms(), block_cooldown_ms)
                await sends.send(reply_to, response, item.client_id, fallback=fallback)
                await sends.wait(self.settings.kafka.request_timeout_s)
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

    def _committable(
        self, next_offsets: dict[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        """Offsets to commit: no further than the first answer still held back."""
        out = {}
        for tp, offset in next_offsets.items():
            held = self._delayed.get(tp)
            out[tp] = min(offset, min(held)) if held else offset
        return out

    async def _drain_delayed(
        self, consumer: AIOKafkaConsumer, tps: set[TopicPartition]
    ) -> None:
        """Send the held-back answers of these partitions (at most the delay),
        then commit what the batches already answered."""
        tasks = [t for tp in tps for t in self._delayed.get(tp, {}).values()]
        if tasks:
            await asyncio.wait(
                tasks,
                # hide_delay_s is at most 30 s in every override.
                timeout=30.0 + self.settings.kafka.request_timeout_s,
            )
        done = {
            tp: off
            for tp, off in self._next_offsets.items()
            if tp in tps and not self._delayed.get(tp)
        }
        for tp in tps:
            self._delayed.pop(tp, None)
        if done:
            try:
                await asyncio.wait_for(
                    consumer.commit(done), self.settings.kafka.request_timeout_s
                )
            except (KafkaError, TimeoutError):
                logger.warning("commit after delayed answers failed; redelivery")

    # -- client state across rebalances -----------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        # Wait for the batch in flight to commit, then hand the clients of the
        # revoked partitions over through Redis.
        try:
            await asyncio.wait_for(
                self._batch_lock.acquire(), self.settings.kafka.request_timeout_s
            )
        except TimeoutError:
            # The batch is stuck (most likely on a commit that cannot finish
            # during the rebalance). Its records go to the new owner again; the
            # detector state is in use by the executor, so it is neither
            # snapshotted nor forgotten, and the new owner starts those clients
            # afresh rather than stall the group.
            logger.warning(
                "revoke did not wait for the batch in flight",
                extra={"partitions": sorted(tp.partition for tp in revoked)},
            )
            return
        try:
            if self._consumer is not None:
                await self._drain_delayed(self._consumer, revoked)
            leaving = [c for c, tp in self._client_tp.items() if tp in revoked]
            try:
                await self._snapshot(leaving)
            finally:
                for client_id in leaving:
                    self._forget(client_id)
            logger.info(
                "partitions revoked",
                extra={
                    "partitions": sorted(tp.partition for tp in revoked),
                    "clients": len(leaving),
                },
            )
        finally:
            self._batch_lock.release()

    async def _snapshot(self, client_ids: list[str]) -> None:
        if not client_ids or self._store is None:
            return
        assert self._scorer is not None
        blobs = {c: self._scorer.dump(c) for c in client_ids}
        try:
            await self._store.save_states(blobs, _STATE_TTL_S)
        except StoreError:
            logger.warning(
                "detector state of %d clients not saved",
                len(blobs),
                extra={"clients": len(blobs)},
            )

    def _forget(self, client_id: str) -> None:
        self._client_tp.pop(client_id, None)
        if self._scorer is not None:
            self._scorer.forget(client_id)
        self.metrics.clients.set(len(self._client_tp))


def _decided_without_store(items: list[BatchItem]) -> bool:
    return any(i.admission is not None and i.admission.without_store for i in items)


class _StageTimer:
    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self._metrics.stage_seconds.labels(stage).observe(now - self._t)
        self._t = now
