"""The poisoning guard service: screen labelled feedback, then pass or refuse it.

``modelgate.feedback`` ──▶ guard ──▶ ``modelgate.feedback.accepted`` or
``modelgate.feedback.rejected``. One batch flows through fixed steps: decode,
authenticate and validate (gateway/feedback_steps.py), predict, screen
(``detectors.poisoning.PoisoningGuard``), save the submitters' state to
Redis, produce every verdict, and only then commit the batch's offsets: a
crash before the commit means the batch is delivered again (at-least-once; a
record may then appear twice downstream, never not at all). The consume
loop, the rewind of a failed batch and the rebalance listener are the
worker's too (gateway/group_service.py). A batch that fails is judged again
from the guard's snapshot of the state it was first judged from, so no
record counts twice. A malformed record becomes a rejected record with its
code; it never stops the partition. The guard's Prometheus metrics
(``gateway.metrics.GuardMetrics``) are served on ``feedback.metrics_port``.

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
backends, metrics and per-record steps, and the detector library.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pydantic
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from detectors.base import describe_validation_error
from detectors.poisoning import GuardSnapshot, PoisoningGuard, PoisoningParams
from gateway import feedback_steps, protocol
from gateway.backends import ModelBackend, close_backends, load_backends
from gateway.config import Settings
from gateway.errors import (
    BackendError,
    BrokerError,
    ConfigError,
    ModelgateError,
    StoreError,
)
from gateway.feedback_data import calibration_rows
from gateway.feedback_steps import FeedbackItem
from gateway.feedback_windows import SharedWindows, WindowRecord
from gateway.group_clients import close_clients, group_clients, start_group_clients
from gateway.group_service import GroupService
from gateway.keys import KeyStore
from gateway.metrics import GuardMetrics
from gateway.offloop import in_thread
from gateway.redis_breaker import breaker_for
from gateway.store import RedisClient, redis_from_settings, redis_guard
from gateway.topics import ensure_topics

logger = logging.getLogger(__name__)


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


class FeedbackGuard(GroupService):
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
        self.metrics = GuardMetrics()
        super().__init__(settings, self.metrics, "guard")
        self._models = models
        self._owns_models = models is None
        self._guards: dict[str, PoisoningGuard] = {}
        self._redis: RedisClient | None = None
        self._keys: KeyStore | None = None
        self._windows: SharedWindows | None = None
        self._uncommitted: dict[str, GuardSnapshot] = {}
        self.records_done = 0
        self.metrics_port = 0

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
                    # None: too few clean rows per class, the check is off.
                    "drift_threshold": _finite(cal.drift_threshold),
                    "anchored_threshold": _finite(cal.anchored_threshold),
                    "distance_threshold": _finite(cal.distance_threshold),
                },
            )
        # Before joining the group: a port clash (ConfigError) should stop the
        # guard before it takes partitions it could not report on.
        self.metrics_port = self.metrics.serve(
            s.feedback.metrics_host, s.feedback.metrics_port
        )
        self._redis = redis_from_settings(s)
        self.metrics.watch_redis_breaker(breaker_for(self._redis))
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
                self.rebalance_listener(),
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
            self.metrics.close()
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

    @property
    def max_batch_records(self) -> int:
        return self.settings.feedback.max_batch_records

    async def _commit(self, next_offsets: dict[TopicPartition, int]) -> None:
        try:
            await super()._commit(next_offsets)
        except BaseException:
            # Not committed: the batch comes again and is judged from the
            # state it was first judged from.
            self._restore(self._uncommitted)
            raise
        finally:
            self._uncommitted = {}

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        # Submitter state is saved after every batch; dropping what this
        # process holds makes the next owner's (or our later) copy the one
        # read from Redis, never a stale one in memory. Under the batch lock
        # (the revoke waits for it, unbounded: every step of a batch has its
        # own timeout): a batch in hand (screening in a thread) finishes first.
        self.forget_submitters()

    # -- one batch ----------------------------------------------------------------

    async def process_records(
        self, records: Sequence[tuple[TopicPartition, Any]]
    ) -> None:
        """Judge and produce one batch; raises ``BrokerError`` if the produces
        did not all succeed, ``StoreError`` if Redis could not be read for
        keys that are not cached."""
        assert self._keys is not None and self._consumer is not None
        assert self._models is not None
        max_bytes = self.settings.kafka.max_message_bytes
        items = [feedback_steps.decode(tp, r, max_bytes) for tp, r in records]
        await feedback_steps.authenticate(
            items, self._keys, self._consumer, self.settings
        )
        feedback_steps.validate(items, self._models, self._guards)
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

    def _screened(
        self, items: list[FeedbackItem]
    ) -> list[tuple[FeedbackItem, WindowRecord]]:
        return [
            (
                i,
                WindowRecord(
                    m,
                    i.label_index,
                    i.record.feedback_id,
                    c,
                    i.row,
                    i.tp.partition,
                    i.offset,
                ),
            )
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

    def _screen(self, items: list[FeedbackItem]) -> None:
        """Predict each model's rows in one call, then screen in arrival order
        (blocking; runs in a thread)."""
        assert self._models is not None
        by_model: dict[str, list[FeedbackItem]] = {}
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

    async def _produce(self, items: list[FeedbackItem]) -> None:
        """Every verdict to its topic; waits for the broker's acknowledgement,
        then counts the verdicts.

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
            if item.verdict is not None and feedback_steps.is_accepted(item, shadow):
                topic = topics.feedback_accepted
                key, value = feedback_steps.accepted_message(item, item.verdict, shadow)
            else:
                topic = topics.feedback_rejected
                key, value = feedback_steps.rejected_message(item, now_ms)
                feedback_steps.log_rejection(item)
            sends.append(self._producer.send(topic, value=value, key=key))
        timeout_s = self.settings.kafka.request_timeout_s
        try:
            futures = await asyncio.wait_for(asyncio.gather(*sends), timeout_s)
            await asyncio.wait_for(asyncio.gather(*futures), timeout_s)
        except (KafkaError, TimeoutError) as exc:
            raise BrokerError(f"producing feedback verdicts failed: {exc!r}") from exc
        self._count(items, shadow)

    def _count(self, items: list[FeedbackItem], shadow: bool) -> None:
        """Verdicts produced, as the guard's metrics count them: a batch
        produced again after a failed commit is counted again, as its
        verdicts appear again downstream."""
        m = self.metrics
        for item in items:
            model, verdict_label, code, detector = feedback_steps.verdict_labels(
                item, shadow, self._guards
            )
            m.records.labels(model, verdict_label, code, detector).inc()
            verdict = item.verdict
            if item.error is None and verdict is not None:
                m.screened.labels(model).inc()
                if shadow and not verdict.accepted:
                    m.would_reject.labels(
                        model, verdict.code or "", verdict.detector or ""
                    ).inc()

    # -- submitter state in Redis ----------------------------------------------------

    def _state_key(self, model: str, client_id: str) -> str:
        # The client id is the hash tag, as for every per-client key.
        return f"{self.settings.redis.key_prefix}:fbguard:{model}:{{{client_id}}}"

    def _submitters(self, items: list[FeedbackItem]) -> set[tuple[str, str]]:
        return {
            (i.record.model, i.client_id)
            for i in items
            if i.error is None
            and i.record is not None
            and i.client_id is not None
            and i.record.model in self._guards
        }

    async def _load_states(self, items: list[FeedbackItem]) -> None:
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

    async def _save_states(self, items: list[FeedbackItem]) -> None:
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


def _finite(value: float) -> float | None:
    """``value`` rounded for a log field, or ``None`` when infinite (JSON has
    no infinity)."""
    return round(value, 3) if np.isfinite(value) else None
