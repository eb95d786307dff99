"""The poisoning guard service: screen labelled feedback, then pass or refuse it.

``modelgate.feedback`` ──▶ guard ──▶ ``modelgate.feedback.accepted`` or
``modelgate.feedback.rejected``. One batch flows through fixed steps: decode
(size, JSON, schema, version), authenticate (the request path's HMAC check,
``gateway.keys.authenticate``, and the record key must be the key's client
id), validate the row against the model's signature
(``gateway.validation.validate_request``: names, shape, datatype, finite,
range; one row; a known label), predict, screen
(``detectors.poisoning.PoisoningGuard``), save the submitters' state to
Redis, produce every verdict, and only then commit the batch's offsets: a
crash before the commit means the batch is delivered again (at-least-once; a
record may then appear twice downstream, never not at all). A batch that
fails is judged again from the guard's snapshot of the state it was first
judged from, so no record counts twice. A malformed record becomes a
rejected record with its code; it never stops the partition.

Each submitter's recent verdicts are saved to Redis after every batch
(``{prefix}:fbguard:{model}:{<client>}``) and loaded when a guard first sees
the submitter, so a restart or a rebalance does not hand a flipper a clean
slate. The spectral test's class windows of accepted records are shared in
Redis by every guard of the deployment (``gateway.feedback_windows``): read
before each batch is screened, written with the submitters' state; the clean
calibration rows that anchor them stay in each process.

Shadow mode (``feedback.shadow``) screens every record but accepts every
valid one, marking those it would refuse (``would_reject``).

Imports aiokafka, Redis (through ``gateway.store``), the gateway's keys,
validation and backends, and the detector library.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import pydantic
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from detectors.base import describe_validation_error
from detectors.poisoning import (
    GuardSnapshot,
    PoisoningGuard,
    PoisoningParams,
    Verdict,
)
from gateway import protocol
from gateway.backends import ModelBackend, close_backends, load_backends
from gateway.config import Settings
from gateway.errors import (
    AuthError,
    BackendError,
    BrokerError,
    ConfigError,
    ModelgateError,
    StoreError,
    ValidationError,
)
from gateway.feedback_data import calibration_rows
from gateway.feedback_windows import SharedWindows, WindowRecord
from gateway.feedback_wire import (
    SCHEMA_VERSION,
    AcceptedFeedback,
    FeedbackEnvelope,
    FeedbackRecord,
    RejectedFeedback,
    decode_envelope,
    decode_feedback,
    encode,
    kept_value,
    schema_code,
)
from gateway.group_clients import (
    Backoff,
    close_clients,
    group_clients,
    rewind,
    start_group_clients,
)
from gateway.keys import KeyStore, authenticate
from gateway.offloop import in_thread
from gateway.store import RedisClient, redis_from_settings, redis_guard
from gateway.topics import ensure_topics
from gateway.validation import validate_request

logger = logging.getLogger(__name__)

_PARTITIONER = DefaultPartitioner()
_MAX_MESSAGE_CHARS = 300


def feedback_topics(settings: Settings) -> dict[str, int]:
    """The guard's topics and their partition counts."""
    topics = settings.kafka.topics
    n = topics.other_partitions
    return {
        topics.feedback: n,
        topics.feedback_accepted: n,
        topics.feedback_rejected: n,
    }


def guard_params(settings: Settings) -> PoisoningParams:
    """``feedback.params`` validated.

    Raises
    ------
    ConfigError
        A field is unknown or out of bounds (named in the message).
    """
    try:
        return PoisoningParams.model_validate(settings.feedback.params)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"feedback.params: {describe_validation_error(exc)}") from exc


def build_guard(
    settings: Settings, name: str, model: ModelBackend, params: PoisoningParams
) -> PoisoningGuard:
    """Calibrate a guard for ``model`` on its clean labelled rows (blocking).

    Raises
    ------
    ConfigError
        No calibration data, or data that does not fit the model.
    """
    (x, y), _ = calibration_rows(name, settings.feedback.calibration_files.get(name))
    classes = list(model.signature.classes)
    try:
        index = np.array([classes.index(int(v)) for v in y], dtype=np.int64)
        return PoisoningGuard.fit(
            params,
            np.asarray(model.reference, dtype=np.float64),
            x,
            index,
            model.predict_proba(x),
        )
    except ValueError as exc:
        raise ConfigError(f"feedback calibration of {name}: {exc}") from exc


@dataclass
class _Item:
    """One consumed record on its way to a verdict."""

    tp: TopicPartition
    offset: int
    value: bytes
    record_key: str
    signature: str | None
    record: FeedbackRecord | None = None
    envelope: FeedbackEnvelope | None = None
    client_id: str | None = None
    row: np.ndarray[Any, Any] | None = None
    label_index: int = -1
    error: ModelgateError | None = None
    verdict: Verdict | None = None
    proba: np.ndarray[Any, Any] | None = field(default=None, repr=False)

    def fail(self, error: ModelgateError) -> None:
        if self.error is None:
            self.error = error


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # untyped base
    def __init__(self, service: FeedbackGuard) -> None:
        self._service = service

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Submitter state is saved after every batch; dropping what this
        # process holds makes the next owner's (or our later) copy the one
        # read from Redis, never a stale one in memory. Under the batch lock:
        # a batch in hand (screening in a thread) finishes first.
        async with self._service.batch_lock:
            self._service.forget_submitters()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._service.assigned.set()
        logger.info(
            "guard partitions assigned",
            extra={"partitions": sorted(tp.partition for tp in assigned)},
        )


class FeedbackGuard:
    """The guard process: start, run until stopped, stop.

    Parameters
    ----------
    settings
        Process settings (``kafka``, ``redis``, ``auth``, ``models``,
        ``feedback``).
    models
        Backends by name, already open (tests); loaded from the settings and
        closed at stop when omitted.
    """

    def __init__(
        self, settings: Settings, models: dict[str, ModelBackend] | None = None
    ) -> None:
        self.settings = settings
        self._models = models
        self._owns_models = models is None
        self._guards: dict[str, PoisoningGuard] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._redis: RedisClient | None = None
        self._keys: KeyStore | None = None
        self._windows: SharedWindows | None = None
        self._backoff = Backoff()
        self._uncommitted: dict[str, GuardSnapshot] = {}
        self.assigned = asyncio.Event()
        # Held while a batch is processed and while a revoke drops state.
        self.batch_lock = asyncio.Lock()
        self.batches_done = 0
        self.records_done = 0

    async def __aenter__(self) -> FeedbackGuard:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- life ---------------------------------------------------------------------

    async def start(self) -> None:
        """Create the topics, load and calibrate the models, connect.

        Raises
        ------
        ConfigError
            Bad ``feedback`` settings or calibration data.
        BrokerError
            Kafka could not be reached.
        """
        s = self.settings
        params = guard_params(s)
        await ensure_topics(s, extra=feedback_topics(s))
        if self._models is None:
            self._models = await in_thread(lambda: load_backends(s))
        names = s.feedback.models or list(s.models.serve)
        missing = [n for n in names if n not in self._models]
        if missing:
            raise ConfigError(f"feedback.models not served: {missing}")
        models = self._models
        for name in names:
            self._guards[name] = await in_thread(
                functools.partial(build_guard, s, name, models[name], params)
            )
            cal = self._guards[name].calibration
            logger.info(
                "guard calibrated",
                extra={
                    "model": name,
                    "rows": cal.rows,
                    "disagree_rate": round(cal.disagree_rate, 5),
                    "rarity_threshold": cal.rarity_threshold,
                    "spectral_threshold": round(cal.spectral_threshold, 3),
                },
            )
        self._redis = redis_from_settings(s)
        self._keys = KeyStore(self._redis, s)
        self._windows = SharedWindows(
            self._redis,
            s,
            self._guards,
            {name: models[name].signature.classes for name in names},
        )
        self._producer, self._consumer = group_clients(s, s.feedback.group_id)
        try:
            await start_group_clients(
                s,
                self._producer,
                self._consumer,
                s.kafka.topics.feedback,
                _Rebalance(self),
            )
        except BrokerError:
            await self.stop()
            raise
        logger.info(
            "guard started",
            extra={
                "group": s.feedback.group_id,
                "models": names,
                "shadow": s.feedback.shadow,
            },
        )

    async def stop(self) -> None:
        """Leave the group and close connections. Idempotent."""
        consumer, producer, redis_client = self._consumer, self._producer, self._redis
        self._consumer = self._producer = self._redis = None
        try:
            await close_clients(
                consumer, producer, redis_client, self.settings.kafka.request_timeout_s
            )
        finally:
            if self._owns_models and self._models is not None:
                models, self._models = self._models, None
                close_backends(models)
        if consumer is not None:
            logger.info(
                "guard stopped",
                extra={"group": self.settings.feedback.group_id},
            )

    def forget_submitters(self) -> None:
        """Drop every submitter's state held in memory (it is in Redis)."""
        for guard in self._guards.values():
            for submitter in guard.submitters():
                guard.forget(submitter)

    async def run(self, stop_event: asyncio.Event) -> None:
        """Consume until ``stop_event`` is set; each batch is committed before
        the next is fetched."""
        assert self._consumer is not None, "start() first"
        s = self.settings
        while not stop_event.is_set():
            try:
                batch = await self._consumer.getmany(
                    timeout_ms=s.kafka.poll_timeout_ms,
                    max_records=s.feedback.max_batch_records,
                )
            except KafkaError as exc:
                logger.warning("feedback fetch failed, retrying: %r", exc)
                await self._backoff.wait()
                continue
            async with self.batch_lock:
                # A revoke may have run between the fetch and the lock: those
                # records now belong to another guard, which will judge them.
                owned = self._consumer.assignment()
                batch = {tp: rs for tp, rs in batch.items() if tp in owned}
                if batch:
                    await self._handle_batch(batch)

    async def _handle_batch(self, batch: dict[TopicPartition, list[Any]]) -> None:
        assert self._consumer is not None
        first = {tp: records[0].offset for tp, records in batch.items()}
        last = {tp: records[-1].offset for tp, records in batch.items()}
        try:
            await self.process_records(
                [(tp, r) for tp, records in batch.items() for r in records]
            )
            try:
                await asyncio.wait_for(
                    self._consumer.commit({tp: o + 1 for tp, o in last.items()}),
                    self.settings.kafka.request_timeout_s,
                )
            except BaseException:
                self._restore(self._uncommitted)
                raise
            finally:
                self._uncommitted = {}
        except (BrokerError, StoreError, KafkaError, TimeoutError) as exc:
            # Kafka or Redis is in trouble: verdicts may be half produced.
            # Rewind so the whole batch comes again; downstream tolerates a
            # duplicate verdict (same feedback id), never a missing one.
            logger.warning(
                "feedback batch not committed, retrying in %.1f s: %r",
                self._backoff.delay_s,
                exc,
                extra={"offsets": {tp.partition: o for tp, o in first.items()}},
            )
            await rewind(self._consumer, first, self._backoff)
            return
        self._backoff.reset()
        self.batches_done += 1

    # -- one batch ----------------------------------------------------------------

    async def process_records(
        self, records: Sequence[tuple[TopicPartition, Any]]
    ) -> None:
        """Judge and produce one batch; raises ``BrokerError`` if the produces
        did not all succeed, ``StoreError`` if Redis could not be read for
        keys that are not cached."""
        items = [self._decode(tp, r) for tp, r in records]
        await self._authenticate(items)
        self._validate(items)
        await self._load_states(items)
        # The rows the guard will screen: their class windows come from Redis.
        screened = self._screened(items)
        assert self._windows is not None
        await self._windows.load([record for _, record in screened])
        touched = self._submitters(items)
        snapshots = {
            name: guard.snapshot(c for m, c in touched if m == name)
            for name, guard in self._guards.items()
        }
        try:
            await in_thread(lambda: self._screen(items))
            # State first: while Redis is down nothing is produced, so a
            # Redis outage adds no duplicate verdicts downstream.
            await self._save_states(items)
            await self._windows.save([(w, i.verdict) for i, w in screened])
            await self._produce(items)
        except BaseException:
            # Not committed: the batch will be judged again, from the state
            # it was first judged from (cancellation included: a restarted
            # guard reads the saved state, this one may be asked to go on).
            self._restore(snapshots)
            raise
        # Kept until the commit: a failed commit restores them too.
        self._uncommitted = snapshots
        self.records_done += len(items)

    def _screened(self, items: list[_Item]) -> list[tuple[_Item, WindowRecord]]:
        return [
            (i, WindowRecord(m, i.label_index, i.record.feedback_id, c, i.row))
            for i in items
            if i.error is None
            and i.record is not None
            and i.row is not None
            and (c := i.client_id) is not None
            and (m := i.record.model) in self._guards
        ]

    def _restore(self, snapshots: dict[str, GuardSnapshot]) -> None:
        for name, snapshot in snapshots.items():
            self._guards[name].restore(snapshot)

    def _decode(self, tp: TopicPartition, record: Any) -> _Item:
        """Size, JSON and schema checks; never raises."""
        value: bytes = record.value or b""
        signature = None
        for name, raw in record.headers or ():
            if name == protocol.SIGNATURE_HEADER and raw is not None:
                signature = raw.decode("ascii", "replace")
        item = _Item(
            tp=tp,
            offset=record.offset,
            value=value,
            record_key=(record.key or b"").decode("utf-8", "replace"),
            signature=signature,
        )
        limit = self.settings.kafka.max_message_bytes
        if len(value) > limit:
            item.fail(
                ValidationError(
                    f"message of {len(value)} bytes exceeds the limit of {limit}",
                    code="PAYLOAD_TOO_LARGE",
                )
            )
            return item
        try:
            item.record = decode_feedback(value)
        except msgspec.ValidationError as exc:
            item.envelope = decode_envelope(value)
            item.fail(ValidationError(_clip(f"schema: {exc}"), code=schema_code(exc)))
        except protocol.DECODE_ERRORS as exc:
            item.fail(ValidationError(_clip(f"not JSON: {exc}"), code="MALFORMED_JSON"))
        except Exception:
            # Whatever the codec does with hostile bytes costs this record only.
            logger.exception(
                "feedback decoder failed",
                extra={"partition": tp.partition, "offset": record.offset},
            )
            item.fail(ModelgateError("could not decode the message", code="INTERNAL"))
        if item.record is not None and item.record.v != SCHEMA_VERSION:
            item.fail(
                ValidationError(
                    f"schema version {item.record.v} is not supported "
                    f"(expected {SCHEMA_VERSION})",
                    code="UNSUPPORTED_VERSION",
                )
            )
        return item

    async def _authenticate(self, items: list[_Item]) -> None:
        """The request path's signature, clock and scope check, and the record
        key must be the key's client id (on its partition)."""
        assert self._keys is not None and self._consumer is not None
        live = [i for i in items if i.error is None and i.record is not None]
        if not live:
            return
        found, unavailable = await self._keys.get_many_or_stale(
            {i.record.key_id for i in live if i.record is not None}
        )
        if unavailable:
            # Without the key there is no verdict; retry the batch later.
            raise StoreError("redis unreachable and api keys not cached")
        now_ms = protocol.now_ms()
        skew_ms = int(self.settings.auth.max_clock_skew_s * 1000)
        for item in live:
            record = item.record
            assert record is not None
            try:
                key = authenticate(
                    found.get(record.key_id),
                    item.value,
                    item.signature,
                    record.ts_ms,
                    record.model,
                    now_ms,
                    skew_ms,
                )
                self._check_placement(item, key.client_id)
            except AuthError as exc:
                item.fail(exc)
            else:
                item.client_id = key.client_id

    def _check_placement(self, item: _Item, client_id: str) -> None:
        """One submitter's records on one partition, keyed by its client id,
        so that one guard sees its whole stream (as ``intake.check_placement``
        for requests)."""
        assert self._consumer is not None
        if item.record_key != client_id:
            raise AuthError(
                "the record key must be the API key's client id",
                code="AUTH_WRONG_PARTITION",
            )
        partitions = self._consumer.partitions_for_topic(item.tp.topic)
        if partitions:
            ids = sorted(partitions)
            expected = _PARTITIONER(client_id.encode("utf-8"), ids, ids)
            if expected != item.tp.partition:
                raise AuthError(
                    f"a record of this client belongs on partition {expected}",
                    code="AUTH_WRONG_PARTITION",
                )

    def _validate(self, items: list[_Item]) -> None:
        """The row against the model's signature, and the label."""
        assert self._models is not None
        for item in items:
            record = item.record
            if item.error is not None or record is None:
                continue
            model = self._models.get(record.model)
            if model is None or record.model not in self._guards:
                item.fail(
                    ValidationError(
                        f"model {record.model!r} takes no feedback here",
                        code="UNKNOWN_MODEL",
                    )
                )
                continue
            request = protocol.InferRequest(
                v=protocol.SCHEMA_VERSION,
                request_id=record.feedback_id,
                key_id=record.key_id,
                ts_ms=record.ts_ms,
                model=record.model,
                inputs=record.inputs,
            )
            try:
                rows = validate_request(request, model.signature)
            except ValidationError as exc:
                item.fail(exc)
                continue
            if len(rows) != 1:
                item.fail(
                    ValidationError(
                        f"a feedback record holds one row, got {len(rows)}",
                        code="SHAPE_MISMATCH",
                    )
                )
                continue
            classes = model.signature.classes
            if record.label not in classes:
                item.fail(
                    ValidationError(
                        f"label {record.label} is not a class of {record.model}",
                        code="UNKNOWN_LABEL",
                    )
                )
                continue
            item.row = rows[0]
            item.label_index = classes.index(record.label)

    def _screen(self, items: list[_Item]) -> None:
        """Predict each model's rows in one call, then screen in arrival order
        (blocking; runs in a thread)."""
        assert self._models is not None
        by_model: dict[str, list[_Item]] = {}
        for item in items:
            if item.error is None and item.record is not None and item.row is not None:
                by_model.setdefault(item.record.model, []).append(item)
        for name, group in by_model.items():
            model = self._models[name]
            try:
                proba = np.asarray(
                    model.predict_proba(
                        np.vstack([i.row for i in group if i.row is not None])
                    )
                )
                expected = (len(group), len(model.signature.classes))
                if proba.shape != expected:
                    raise BackendError(
                        f"model {name} answered shape {proba.shape}, "
                        f"expected {expected}"
                    )
            except BackendError as exc:
                for item in group:
                    item.fail(exc)
                continue
            except Exception as exc:
                # A backend outside the contract (an estimator raising its own
                # error): escaping, it killed the run loop, and the restarted
                # guard met the same batch again.
                logger.exception(
                    "model failed outside its contract", extra={"model": name}
                )
                error = BackendError(f"model {name} failed: {exc!r}")
                for item in group:
                    item.fail(error)
                continue
            guard = self._guards[name]
            for item, p in zip(group, proba, strict=True):
                assert item.record is not None and item.row is not None
                assert item.client_id is not None
                try:
                    item.verdict = guard.screen(
                        item.client_id,
                        item.row,
                        item.label_index,
                        p,
                        item.record.feedback_id,
                    )
                except ValueError as exc:
                    # The row was validated against the same signature; a
                    # mismatch here is a fault of ours, not the submitter's.
                    logger.exception(
                        "screening failed",
                        extra={"client": item.client_id, "detector": guard.name},
                    )
                    item.fail(ModelgateError(str(exc), code="INTERNAL"))

    async def _produce(self, items: list[_Item]) -> None:
        """Every verdict to its topic; waits for the broker's acknowledgement.

        Raises
        ------
        BrokerError
            A produce failed or timed out (the batch is then retried).
        """
        assert self._producer is not None
        topics = self.settings.kafka.topics
        shadow = self.settings.feedback.shadow
        now_ms = protocol.now_ms()
        sends = []
        for item in items:
            verdict = item.verdict
            if (
                item.error is None
                and verdict is not None
                and (verdict.accepted or shadow)
            ):
                topic = topics.feedback_accepted
                key, value = self._accepted(item, verdict, shadow)
            else:
                topic = topics.feedback_rejected
                key, value = self._rejected(item, now_ms)
                self._log_rejection(item)
            sends.append(self._producer.send(topic, value=value, key=key))
        timeout_s = self.settings.kafka.request_timeout_s
        try:
            futures = await asyncio.wait_for(asyncio.gather(*sends), timeout_s)
            await asyncio.wait_for(asyncio.gather(*futures), timeout_s)
        except (KafkaError, TimeoutError) as exc:
            raise BrokerError(f"producing feedback verdicts failed: {exc!r}") from exc

    def _accepted(
        self, item: _Item, verdict: Verdict, shadow: bool
    ) -> tuple[bytes | None, bytes]:
        record = item.record
        assert record is not None and item.client_id is not None
        refused = not verdict.accepted
        message = AcceptedFeedback(
            v=SCHEMA_VERSION,
            feedback_id=record.feedback_id,
            client_id=item.client_id,
            key_id=record.key_id,
            model=record.model,
            label=record.label,
            inputs=record.inputs,
            ts_ms=record.ts_ms,
            partition=item.tp.partition,
            offset=item.offset,
            scores=verdict.scores,
            shadow=shadow,
            would_reject=verdict.code if refused else None,
            detector=verdict.detector if refused else None,
            evidence=verdict.evidence if refused else None,
        )
        return item.client_id.encode("utf-8"), encode(message)

    def _rejected(self, item: _Item, now_ms: int) -> tuple[bytes | None, bytes]:
        record, verdict, error = item.record, item.verdict, item.error
        if error is not None:
            # Clipped: validation messages quote the record (a shape of
            # 400,000 dimensions fits a 1 MiB message and made a 1.2 MB
            # rejection, which the producer refused on every retry).
            code, message, retriable = error.code, _clip(error.message), error.retriable
            detector = evidence = None
            scores: dict[str, float] = {}
        else:
            assert verdict is not None and verdict.code is not None
            code, retriable = verdict.code, False
            message = f"refused by the poisoning guard ({verdict.detector})"
            detector, evidence, scores = (
                verdict.detector,
                verdict.evidence,
                verdict.scores,
            )
        authenticated = item.client_id is not None
        rejected = RejectedFeedback(
            v=SCHEMA_VERSION,
            code=code,
            message=message,
            topic=item.tp.topic,
            partition=item.tp.partition,
            offset=item.offset,
            ts_ms=now_ms,
            retriable=retriable,
            feedback_id=record.feedback_id
            if record
            else (item.envelope.feedback_id if item.envelope else None),
            # Only a proven identity is named; a record that failed
            # authentication names the key id it claimed, nothing more.
            client_id=item.client_id,
            key_id=record.key_id
            if record
            else (item.envelope.key_id if item.envelope else None),
            model=record.model if record and authenticated else None,
            label=record.label if record and authenticated else None,
            detector=detector,
            evidence=evidence,
            scores=scores,
            **kept_value(item.value),
        )
        key = item.client_id.encode("utf-8") if item.client_id else None
        return key, encode(rejected)

    def _log_rejection(self, item: _Item) -> None:
        code = (
            item.error.code
            if item.error
            else (item.verdict.code if item.verdict else None)
        )
        logger.info(
            "feedback rejected",
            extra={
                "client": item.client_id,
                "request": item.record.feedback_id if item.record else None,
                "code": code,
                "detector": item.verdict.detector if item.verdict else None,
                "partition": item.tp.partition,
                "offset": item.offset,
            },
        )

    # -- submitter state in Redis ----------------------------------------------------

    def _state_key(self, model: str, client_id: str) -> str:
        # The client id is the hash tag, as for every per-client key.
        return f"{self.settings.redis.key_prefix}:fbguard:{model}:{{{client_id}}}"

    def _submitters(self, items: list[_Item]) -> set[tuple[str, str]]:
        return {
            (i.record.model, i.client_id)
            for i in items
            if i.error is None
            and i.record is not None
            and i.client_id is not None
            and i.record.model in self._guards
        }

    async def _load_states(self, items: list[_Item]) -> None:
        """Read the state of submitters this process does not hold yet."""
        assert self._redis is not None
        wanted = [
            (model, client)
            for model, client in sorted(self._submitters(items))
            if client not in self._guards[model].submitters()
        ]
        if not wanted:
            return
        timeout_s = self.settings.redis.socket_timeout_s
        async with redis_guard("feedback.load_states", timeout_s, self._redis):
            # GETs in one pipeline, not MGET: the keys' hash tags differ, so
            # on Redis Cluster they live in different slots.
            pipe = self._redis.pipeline(transaction=False)
            for model, client in wanted:
                # At most one byte over the limit: a huge value at the key
                # costs the read its limit, and is then refused as too large.
                limit = self._guards[model].state_limit_bytes
                pipe.getrange(self._state_key(model, client), 0, limit)
            # An error reply for one key (another type stored there: WRONGTYPE)
            # is that submitter's refused state; raised, it failed the batch,
            # which was then retried forever and stalled the partition.
            blobs = await pipe.execute(raise_on_error=False)
        for (model, client), blob in zip(wanted, blobs, strict=True):
            if isinstance(blob, Exception) and not str(blob).startswith("WRONGTYPE"):
                # Any other error reply is the server's trouble, not the key's:
                # retry the batch rather than hand the submitter a clean slate.
                raise StoreError(f"redis feedback.load_states: {blob!r}")
            if not blob:
                # No key (GETRANGE answers b""), or an empty value.
                continue
            try:
                if isinstance(blob, Exception):
                    raise ValueError(f"another type at the key: {blob}")
                self._guards[model].load_state(client, bytes(blob))
            except ValueError as exc:
                # A damaged or foreign state costs the submitter its history,
                # never the batch.
                logger.warning(
                    "submitter state refused: %s",
                    exc,
                    extra={"client": client, "detector": "poisoning"},
                )

    async def _save_states(self, items: list[_Item]) -> None:
        """Write the state of every submitter this batch touched."""
        assert self._redis is not None
        touched = sorted(self._submitters(items))
        if not touched:
            return
        ttl_s = int(self.settings.feedback.state_ttl_s)
        timeout_s = self.settings.redis.socket_timeout_s
        async with redis_guard("feedback.save_states", timeout_s, self._redis):
            pipe = self._redis.pipeline(transaction=False)
            for model, client in touched:
                blob = self._guards[model].dump_state(client)
                if blob is not None:
                    pipe.set(self._state_key(model, client), blob, ex=ttl_s)
            await pipe.execute()


def _clip(message: str) -> str:
    """Codec messages quote the input; keep rejected records small."""
    if len(message) <= _MAX_MESSAGE_CHARS:
        return message
    return message[: _MAX_MESSAGE_CHARS - 1] + "…"
