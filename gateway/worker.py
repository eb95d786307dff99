"""The gateway worker: consume requests in batches, decide, answer, commit.

One batch flows through fixed steps: decode, authenticate, validate, admit
(one Redis round trip), score with the detectors, apply policy, run the model
once per model, produce every response, alert, decision and dead-letter record,
and only then commit the batch's offsets. A crash anywhere before the commit
means the batch is delivered again (at-least-once); the admission script tells
a redelivery from a replay by the record's partition and offset.

This module owns Kafka and Redis I/O; detection lives in ``detectors`` and the
action ladder in ``gateway.policy``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from detectors import Detector, DetectorScore, build_detectors
from gateway import protocol
from gateway.alerts import build_alert
from gateway.config import Settings
from gateway.errors import (
    BackendError,
    BrokerError,
    ModelgateError,
    PolicyError,
    StoreError,
    ValidationError,
)
from gateway.keys import ApiKey, KeyStore, authenticate
from gateway.metrics import WorkerMetrics
from gateway.models import ServedModel, ensure_digits_model, load_model
from gateway.policy import Policy, Verdict
from gateway.store import Admission, AdmitItem, CounterStore
from gateway.topics import ensure_topics
from gateway.validation import scale_to_unit, validate_request

logger = logging.getLogger(__name__)

# Codes that mean "the message itself is bad": these also go to the dead-letter
# topic. Refusals by policy (throttle, block, duplicate) are answers, not faults.
_DEADLETTER_PREFIXES = ("AUTH_", "MALFORMED", "SCHEMA", "UNSUPPORTED", "PAYLOAD")
_DEADLETTER_CODES = frozenset(
    {
        "UNKNOWN_MODEL",
        "TENSOR_NAME",
        "SHAPE_MISMATCH",
        "DTYPE_MISMATCH",
        "NON_FINITE",
        "OUT_OF_RANGE",
        "INTERNAL",
    }
)
_STATE_TTL_S = 7 * 86_400
_TOPIC_REFRESH_S = 30.0


def _goes_to_deadletter(code: str) -> bool:
    return code in _DEADLETTER_CODES or code.startswith(_DEADLETTER_PREFIXES)


@dataclass(slots=True)
class _Item:
    """One record on its way through a batch."""

    tp: TopicPartition
    offset: int
    value: bytes
    record_key: str
    signature: str | None
    envelope: protocol.RequestEnvelope | None = None
    request: protocol.InferRequest | None = None
    key: ApiKey | None = None
    model: ServedModel | None = None
    rows: np.ndarray | None = None
    admission: Admission | None = None
    verdict: Verdict | None = None
    scores: dict[str, float] = field(default_factory=dict)
    probabilities: np.ndarray | None = None
    error: ModelgateError | None = None
    action: str = "allow"
    query_index: int = 0

    @property
    def client_id(self) -> str | None:
        return self.key.client_id if self.key is not None else None

    @property
    def request_id(self) -> str | None:
        if self.request is not None:
            return self.request.request_id
        return self.envelope.request_id if self.envelope is not None else None

    def fail(self, error: ModelgateError, action: str = "reject") -> None:
        if self.error is None:
            self.error = error
            self.action = action


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # untyped base
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._worker._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
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
        self, settings: Settings, *, models: dict[str, ServedModel] | None = None
    ) -> None:
        self.settings = settings
        self.metrics = WorkerMetrics()
        self._models = models
        self._detectors: dict[str, dict[str, Detector]] = {}
        self._policy = Policy(settings.policy)
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._redis: aioredis.Redis | None = None
        self._keys: KeyStore | None = None
        self._store: CounterStore | None = None
        # Held while a batch is in flight, so a revoke waits for it to commit.
        self._batch_lock = asyncio.Lock()
        self._client_tp: dict[str, TopicPartition] = {}
        self._reply_topics: set[str] = set()
        self._reply_topics_at = 0.0
        self._started = False
        self.batches_done = 0

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
        if self._models is None:
            loop = asyncio.get_running_loop()
            self._models = await loop.run_in_executor(None, self._load_models)
        for name, model in self._models.items():
            detectors = build_detectors(s.detectors, seed=0)
            reference = scale_to_unit(model.reference, model.signature)
            for detector in detectors.values():
                detector.learn_baseline(reference)
            self._detectors[name] = detectors

        self._redis = aioredis.Redis.from_url(
            s.redis.url,
            socket_timeout=s.redis.socket_timeout_s,
            socket_connect_timeout=s.redis.socket_timeout_s,
        )
        self._keys = KeyStore(self._redis, s)
        self._store = CounterStore(self._redis, s)

        await ensure_topics(s)
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
            request_timeout_ms=int(timeout_s * 1000) + 10_000,
        )
        try:
            await asyncio.wait_for(self._producer.start(), timeout_s)
            await asyncio.wait_for(self._consumer.start(), timeout_s)
        except (KafkaError, TimeoutError, OSError) as exc:
            await self.stop()
            raise BrokerError(f"cannot reach Kafka at {s.kafka.bootstrap}") from exc
        self._consumer.subscribe([s.kafka.topics.requests], listener=_Rebalance(self))
        self.metrics.serve(s.worker.metrics_host, s.worker.metrics_port)
        self._started = True
        logger.info(
            "worker started",
            extra={"worker": s.worker.worker_id, "group": s.kafka.group_id},
        )

    def _load_models(self) -> dict[str, ServedModel]:
        directory = self.settings.models.directory
        models = {}
        for name in self.settings.models.serve:
            if name == "digits":
                ensure_digits_model(directory)
            models[name] = load_model(directory, name)
        return models

    async def stop(self) -> None:
        """Leave the group, flush produces and close connections. Idempotent."""
        consumer, producer, redis_client = self._consumer, self._producer, self._redis
        self._consumer = self._producer = self._redis = None
        try:
            if consumer is not None:
                # Snapshot before leaving, so the next owner of these clients
                # starts from their history instead of from nothing.
                await self._snapshot(list(self._client_tp))
                await consumer.stop()
        finally:
            try:
                if producer is not None:
                    await producer.stop()
            finally:
                if redis_client is not None:
                    await redis_client.aclose()
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
            batch = await self._consumer.getmany(
                timeout_ms=kafka.poll_timeout_ms, max_records=kafka.max_batch_records
            )
            if not batch:
                continue
            async with self._batch_lock:
                await self._handle_batch(batch)

    # -- one batch ---------------------------------------------------------------

    async def _handle_batch(self, batch: dict[TopicPartition, list[Any]]) -> None:
        assert self._consumer is not None
        first_offsets = {tp: records[0].offset for tp, records in batch.items()}
        last_offsets = {tp: records[-1].offset for tp, records in batch.items()}
        try:
            await self.process_records(
                [(tp, r) for tp, records in batch.items() for r in records]
            )
            await self._consumer.commit(
                {tp: off + 1 for tp, off in last_offsets.items()}
            )
        except (BrokerError, KafkaError) as exc:
            # Answers may be half produced; rewind so the whole batch comes again
            # (clients tolerate a duplicate answer, never a missing one).
            logger.warning("batch not committed, will retry: %r", exc)
            for tp, offset in first_offsets.items():
                if tp in self._consumer.assignment():
                    self._consumer.seek(tp, offset)
            await asyncio.sleep(0.5)  # back off a broker in trouble, not a race
            return
        self.batches_done += 1
        for tp, offset in last_offsets.items():
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                    max(highwater - offset - 1, 0)
                )

    async def process_records(
        self, records: Sequence[tuple[TopicPartition, Any]]
    ) -> None:
        """Serve one batch of consumer records end to end, producing every
        answer; raises ``BrokerError`` if the produces did not all succeed."""
        timer = _StageTimer(self.metrics)
        self.metrics.batch_size.observe(len(records))
        items = [self._decode(tp, record) for tp, record in records]
        timer.lap("decode")

        try:
            await self._authenticate(items)
            timer.lap("auth")
            self._validate(items)
            timer.lap("validate")
            await self._admit(items)
            timer.lap("admit")
            await self._load_new_clients(items)

            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self._score_and_predict, items)
            timer.lap("detect_predict")
            await self._enforce_blocks(items)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug must cost this batch's answers, not the worker: every request
            # not yet refused gets INTERNAL and the partition moves on.
            logger.exception("batch failed before produce; answering INTERNAL")
            for item in items:
                if item.error is None:
                    item.fail(ModelgateError("internal error", code="INTERNAL"))

        await self._produce(items)
        timer.lap("produce")

    def _decode(self, tp: TopicPartition, record: Any) -> _Item:
        value: bytes = record.value or b""
        signature = None
        for name, raw in record.headers or ():
            if name == protocol.SIGNATURE_HEADER:
                signature = raw.decode("ascii", "replace") if raw is not None else None
        item = _Item(
            tp=tp,
            offset=record.offset,
            value=value,
            record_key=(record.key or b"").decode("utf-8", "replace"),
            signature=signature,
        )
        if len(value) > self.settings.kafka.max_message_bytes:
            item.fail(
                ValidationError(
                    f"message of {len(value)} bytes exceeds the limit of "
                    f"{self.settings.kafka.max_message_bytes}",
                    code="PAYLOAD_TOO_LARGE",
                )
            )
            return item
        try:
            item.request = protocol.decode_request(value)
        except msgspec.ValidationError as exc:
            item.envelope = protocol.decode_envelope(value)
            item.fail(ValidationError(f"schema: {exc}", code="SCHEMA_INVALID"))
        except msgspec.DecodeError as exc:
            item.fail(ValidationError(f"not JSON: {exc}", code="MALFORMED_JSON"))
        return item

    async def _authenticate(self, items: list[_Item]) -> None:
        assert self._keys is not None
        live = [i for i in items if i.error is None and i.request is not None]
        if not live:
            return
        try:
            keys = await self._keys.get_many(
                {i.request.key_id for i in live if i.request}
            )
        except StoreError as exc:
            for item in live:
                item.fail(exc)
            return
        now_ms = protocol.now_ms()
        max_skew_ms = int(self.settings.auth.max_clock_skew_s * 1000)
        for item in live:
            request = item.request
            assert request is not None
            try:
                item.key = authenticate(
                    keys.get(request.key_id),
                    item.value,
                    item.signature,
                    request.ts_ms,
                    request.model,
                    now_ms,
                    max_skew_ms,
                )
            except ModelgateError as exc:
                item.fail(exc)

    def _validate(self, items: list[_Item]) -> None:
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

    async def _admit(self, items: list[_Item]) -> None:
        assert self._store is not None
        live = [i for i in items if i.error is None and i.key is not None]
        if not live:
            return
        limits = self.settings.limits
        admit_items = [
            AdmitItem(
                client_id=i.key.client_id,
                request_id=i.request.request_id,
                delivery=f"{i.tp.partition}:{i.offset}",
                rate_per_s=limits.rate_per_s,
                burst=limits.burst,
                cost=1,
            )
            for i in live
            if i.key is not None and i.request is not None
        ]
        try:
            admissions = await self._store.admit_batch(admit_items)
        except StoreError as exc:
            # TODO: issue 4 adds a fail-open mode with a local per-worker cap;
            # until then the gateway fails closed and says so, retriably.
            for item in live:
                item.fail(exc)
            return
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

    async def _load_new_clients(self, items: list[_Item]) -> None:
        """Bring in the snapshot of clients this worker sees for the first time
        (after a rebalance or restart), in one round trip."""
        assert self._store is not None
        new = {
            i.key.client_id: i.tp
            for i in items
            if i.key is not None and i.key.client_id not in self._client_tp
        }
        if not new:
            return
        self._client_tp.update(new)
        self.metrics.clients.set(len(self._client_tp))
        try:
            blobs = await self._store.load_states(list(new))
        except StoreError:
            logger.warning("detector state not loaded; clients start afresh")
            return
        for client_id, blob in blobs.items():
            self._restore(client_id, blob)

    def _score_and_predict(self, items: list[_Item]) -> None:
        """CPU part of a batch, run in an executor: detectors, policy, model."""
        assert self._models is not None
        by_model: dict[str, list[_Item]] = defaultdict(list)
        for item in items:
            if item.error is None and item.model is not None and item.rows is not None:
                by_model[item.model.name].append(item)

        for model_name, model_items in by_model.items():
            model = self._models[model_name]
            self._score(model, model_items)
            served = [i for i in model_items if i.error is None]
            if not served:
                continue
            rows = np.concatenate([i.rows for i in served if i.rows is not None])
            try:
                proba = model.predict_proba(rows)
            except BackendError as exc:
                for item in served:
                    item.fail(exc)
                continue
            start = 0
            for item in served:
                assert item.rows is not None
                n = len(item.rows)
                item.probabilities = proba[start : start + n]
                start += n

    def _score(self, model: ServedModel, items: list[_Item]) -> None:
        # One matrix of every row of the batch, in arrival order, so each
        # detector updates each client's state in the order queries came.
        row_items = [i for i in items for _ in range(len(i.rows or ()))]
        x = scale_to_unit(
            np.concatenate([i.rows for i in items if i.rows is not None]),
            model.signature,
        )
        client_ids = [i.key.client_id for i in row_items if i.key is not None]
        learn = [self._policy.good_standing(c) for c in client_ids]
        per_detector: dict[str, list[DetectorScore]] = {
            name: detector.score_batch(client_ids, x, learn=learn)
            for name, detector in self._detectors[model.name].items()
        }

        # Policy per row; a request takes the most severe verdict of its rows.
        severity = {"allow": 0, "flag": 1, "block": 2}
        for row, item in enumerate(row_items):
            scores = [per_detector[name][row] for name in per_detector]
            verdict = self._policy.decide(client_ids[row], scores)
            for s in scores:
                item.scores[s.detector] = max(item.scores.get(s.detector, 0.0), s.score)
                if s.threshold > 0:
                    self.metrics.detector_score.labels(s.detector).observe(
                        min(s.score / s.threshold, 1.0)
                    )
            if (
                item.verdict is None
                or severity[verdict.enforced] > severity[item.verdict.enforced]
            ):
                item.verdict = verdict
        for item in items:
            verdict = item.verdict
            if verdict is None:
                continue
            item.action = verdict.enforced
            if verdict.enforced == "block":
                item.fail(
                    PolicyError("client is blocked", code="BLOCKED", retriable=True),
                    action="block",
                )

    async def _enforce_blocks(self, items: list[_Item]) -> None:
        assert self._store is not None
        to_block = {
            i.key.client_id: i.verdict
            for i in items
            if i.key is not None
            and i.verdict is not None
            and i.verdict.enforced == "block"
        }
        for client_id, verdict in to_block.items():
            try:
                await self._store.block(
                    client_id,
                    self.settings.policy.block_cooldown_s,
                    "; ".join(verdict.reasons) if verdict else "",
                )
            except StoreError:
                # The answers still say BLOCKED; the next batch re-derives the
                # block from the same detector state.
                logger.warning("block not stored", extra={"client": client_id})
            else:
                logger.info("client blocked", extra={"client": client_id})

    async def _produce(self, items: list[_Item]) -> None:
        assert self._producer is not None
        topics = self.settings.kafka.topics
        worker_id = self.settings.worker.worker_id
        now_ms = protocol.now_ms()
        reply_topics = await self._known_reply_topics()
        sends: list[Awaitable[Any]] = []
        producer = self._producer

        async def send(topic: str, value: bytes, key: str | None) -> Awaitable[Any]:
            return await producer.send(
                topic, value, key=key.encode("utf-8") if key else None
            )

        for item in items:
            client_key = item.client_id or item.record_key or None
            code = item.error.code if item.error else ""
            model_name = (
                item.model.name
                if item.model
                else (item.request.model if item.request else "")
            )
            self.metrics.requests.labels(model_name or "-", item.action, code).inc()

            # The answer, wherever a request id tells us who is waiting.
            if item.request_id is not None:
                reply_to = self._reply_topic(item, reply_topics)
                sends.append(
                    await send(
                        reply_to,
                        protocol.encode(self._response(item, now_ms)),
                        client_key,
                    )
                )

            # Audit: one decision per record, answered or not.
            sends.append(
                await send(
                    topics.decisions,
                    protocol.encode(self._decision(item, now_ms, worker_id)),
                    client_key,
                )
            )

            # Alerts for flagged queries.
            verdict = item.verdict
            if verdict is not None and verdict.flagged and item.key is not None:
                for s in verdict.flagged:
                    event = build_alert(
                        worker_id=worker_id,
                        client_id=item.key.client_id,
                        key_id=item.key.key_id,
                        model=model_name,
                        detector=s.detector,
                        score=s.score,
                        threshold=s.threshold,
                        action=verdict.action,
                        evidence=s.evidence,
                        request_id=item.request_id or "",
                        query_index=item.query_index,
                        shadow=verdict.shadow,
                    )
                    self.metrics.alerts.labels(s.detector).inc()
                    logger.info(
                        "alert",
                        extra={
                            "client": item.key.client_id,
                            "detector": s.detector,
                            "request": item.request_id,
                        },
                    )
                    sends.append(
                        await send(topics.alerts, protocol.encode(event), client_key)
                    )

            # Bad messages keep their bytes on the dead-letter topic.
            if item.error is not None and _goes_to_deadletter(item.error.code):
                self.metrics.deadletters.labels(item.error.code).inc()
                logger.info(
                    "dead-lettered %s",
                    item.error.code,
                    extra={
                        "partition": item.tp.partition,
                        "offset": item.offset,
                        "request": item.request_id,
                    },
                )
                record = protocol.DeadLetter(
                    v=protocol.SCHEMA_VERSION,
                    code=item.error.code,
                    message=item.error.message,
                    topic=item.tp.topic,
                    partition=item.tp.partition,
                    offset=item.offset,
                    ts_ms=now_ms,
                    request_id=item.request_id,
                    key_id=item.request.key_id
                    if item.request
                    else (item.envelope.key_id if item.envelope else None),
                    value_b64=base64.b64encode(item.value).decode("ascii"),
                    worker=worker_id,
                )
                sends.append(
                    await send(topics.deadletter, protocol.encode(record), client_key)
                )

        try:
            await asyncio.wait_for(
                asyncio.gather(*sends), self.settings.kafka.request_timeout_s
            )
        except (KafkaError, TimeoutError) as exc:
            raise BrokerError(f"produce failed: {exc!r}") from exc

    def _response(self, item: _Item, now_ms: int) -> protocol.InferResponse:
        request_id = item.request_id or ""
        correlation_id = (
            item.request.correlation_id
            if item.request is not None
            else (item.envelope.correlation_id if item.envelope else None)
        )
        model_name = item.model.name if item.model else None
        if item.error is not None:
            retry_after = None
            if item.admission is not None and item.error.code in (
                "RATE_LIMITED",
                "BLOCKED",
            ):
                retry_after = item.admission.retry_after_ms or None
            if item.error.code == "BLOCKED" and retry_after is None:
                retry_after = int(self.settings.policy.block_cooldown_s * 1000)
            return protocol.InferResponse(
                v=protocol.SCHEMA_VERSION,
                request_id=request_id,
                status="error",
                ts_ms=now_ms,
                model=model_name,
                correlation_id=correlation_id,
                action=item.action,
                error=protocol.ErrorBody(
                    item.error.code, item.error.message, item.error.retriable
                ),
                retry_after_ms=retry_after,
            )
        assert item.probabilities is not None
        labels = item.probabilities.argmax(axis=1).astype(np.int64)
        return protocol.InferResponse(
            v=protocol.SCHEMA_VERSION,
            request_id=request_id,
            status="ok",
            ts_ms=now_ms,
            model=model_name,
            correlation_id=correlation_id,
            action=item.action,
            outputs=[
                protocol.tensor_from_array("probabilities", item.probabilities),
                protocol.tensor_from_array("label", labels),
            ],
        )

    def _decision(
        self, item: _Item, now_ms: int, worker_id: str
    ) -> protocol.DecisionRecord:
        verdict = item.verdict
        return protocol.DecisionRecord(
            v=protocol.SCHEMA_VERSION,
            request_id=item.request_id or "",
            ts_ms=now_ms,
            action=verdict.action if verdict is not None else item.action,
            client_id=item.client_id,
            key_id=item.key.key_id if item.key else None,
            model=item.model.name if item.model else None,
            error_code=item.error.code if item.error else None,
            risk=verdict.risk if verdict else 0.0,
            scores=item.scores,
            reasons=list(verdict.reasons) if verdict else [],
            shadow=verdict.shadow if verdict else False,
            partition=item.tp.partition,
            offset=item.offset,
            worker=worker_id,
        )

    def _reply_topic(self, item: _Item, known: set[str]) -> str:
        """Where the answer goes. A client may name its own reply topic under the
        configured prefix; an unknown or foreign name falls back to the shared
        responses topic, because producing to a missing topic would stall the
        whole batch waiting for metadata."""
        default = self.settings.kafka.topics.responses
        wanted = (
            item.request.reply_to
            if item.request
            else (item.envelope.reply_to if item.envelope else None)
        )
        if not wanted or wanted == default:
            return default
        prefix = self.settings.worker.reply_topic_prefix
        if (wanted == prefix or wanted.startswith(prefix + ".")) and wanted in known:
            return wanted
        return default

    async def _known_reply_topics(self) -> set[str]:
        assert self._consumer is not None
        now = time.monotonic()
        if now - self._reply_topics_at > _TOPIC_REFRESH_S:
            try:
                self._reply_topics = set(
                    await asyncio.wait_for(
                        self._consumer.topics(), self.settings.kafka.request_timeout_s
                    )
                )
            except (KafkaError, TimeoutError):
                logger.warning("could not refresh topic list; keeping the old one")
            self._reply_topics_at = now
        return self._reply_topics

    # -- client state across rebalances -----------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        # Wait for the batch in flight to commit, then hand the clients of the
        # revoked partitions over through Redis.
        locked = False
        try:
            await asyncio.wait_for(
                self._batch_lock.acquire(), self.settings.kafka.request_timeout_s
            )
            locked = True
        except TimeoutError:
            # The batch is stuck (most likely on a commit that cannot finish
            # during the rebalance); hand over what we have rather than stall
            # the group. Its records will be redelivered to the new owner.
            logger.warning("revoke did not wait for the batch in flight")
        try:
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
            if locked:
                self._batch_lock.release()

    async def _snapshot(self, client_ids: list[str]) -> None:
        if not client_ids or self._store is None:
            return
        blobs = {c: self._dump(c) for c in client_ids}
        try:
            await self._store.save_states(blobs, _STATE_TTL_S)
        except StoreError:
            logger.warning("detector state of %d clients not saved", len(blobs))

    def _dump(self, client_id: str) -> bytes:
        state: dict[str, dict[str, bytes]] = {}
        for model_name, detectors in self._detectors.items():
            for name, detector in detectors.items():
                blob = detector.dump_state(client_id)
                if blob is not None:
                    state.setdefault(model_name, {})[name] = blob
        policy_blob = self._policy.dump_state(client_id)
        if policy_blob is not None:
            state["_policy"] = {"state": policy_blob}
        return msgspec.msgpack.encode(state)

    def _restore(self, client_id: str, blob: bytes) -> None:
        try:
            state = msgspec.msgpack.decode(blob, type=dict[str, dict[str, bytes]])
            for model_name, blobs in state.items():
                if model_name == "_policy":
                    self._policy.load_state(client_id, blobs["state"])
                    continue
                detectors = self._detectors.get(model_name, {})
                for name, detector_blob in blobs.items():
                    if name in detectors:
                        detectors[name].load_state(client_id, detector_blob)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, KeyError):
            # A snapshot from an incompatible version: start the client afresh.
            logger.warning("unreadable detector snapshot", extra={"client": client_id})

    def _forget(self, client_id: str) -> None:
        self._client_tp.pop(client_id, None)
        for detectors in self._detectors.values():
            for detector in detectors.values():
                detector.forget(client_id)
        self._policy.forget(client_id)
        self.metrics.clients.set(len(self._client_tp))


class _StageTimer:
    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self._metrics.stage_seconds.labels(stage).observe(now - self._t)
        self._t = now
