"""The gateway worker: consume requests in batches, decide, answer, commit.

One batch flows through fixed steps: decode, authenticate, validate, answer
retries of already served requests from the replay cache (gateway/replay.py),
admit (one Redis round trip), score with the detectors, apply policy, run the model
once per model, produce every response, alert, decision and dead-letter record,
and only then commit the batch's offsets. A crash anywhere before the commit
means the batch is delivered again (at-least-once); the admission script tells
a redelivery from a replay by the record's partition and offset.

This module owns the worker's life (start, stop, what a commit and a revoke
do) and the order of a batch's steps; the consume loop it shares with the
poisoning guard is gateway/group_service.py, and the steps live beside it:

- gateway/intake.py: decode, authenticate, validate, admit;
- gateway/scoring.py and gateway/groups.py: detectors, policy, the model;
- gateway/enforce.py: throttles, blocks and released slots in Redis;
- gateway/answers.py: producing answers, decisions, alerts, dead letters;
- gateway/held.py: answers policy holds back, and the commits they hold;
- gateway/handover.py: client state across rebalances.

Detection lives in ``detectors`` and the action ladder in ``gateway.policy``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import TopicPartition

from detectors.warm import ensure_warm
from gateway import enforce, intake
from gateway.answers import Answers
from gateway.backends import ModelBackend, close_backends, load_backends
from gateway.baselines import BaselineKeeper
from gateway.batch import BatchItem
from gateway.clientview import ClientView
from gateway.config import LimitsConfig, Settings
from gateway.errors import BrokerError, ModelgateError, StoreError
from gateway.group_clients import close_clients, group_clients, start_group_clients
from gateway.group_service import GroupService
from gateway.groups import CrossClient
from gateway.handover import ClientStates
from gateway.held import HeldAnswers
from gateway.keys import KeyStore, load_server_key
from gateway.limits import Admitter
from gateway.liveconfig.document import LiveConfig
from gateway.liveconfig.follower import ConfigFollower
from gateway.metrics import WorkerMetrics
from gateway.offloop import in_thread
from gateway.redis_breaker import breaker_for
from gateway.replay import ReplayCache
from gateway.scoring import Scorer
from gateway.store import CounterStore, RedisClient, redis_from_settings
from gateway.throttle import ThrottleStore
from gateway.topics import ensure_topics

logger = logging.getLogger(__name__)


class Worker(GroupService):
    """A gateway worker: one member of the ``kafka.group_id`` consumer group.

    Use as ``async with Worker(settings) as w: await w.run(stop_event)``.
    ``start``/``stop`` are idempotent. ``run`` returns after ``stop_event`` is
    set and the batch in hand has been answered and committed.
    """

    def __init__(
        self, settings: Settings, *, models: dict[str, ModelBackend] | None = None
    ) -> None:
        self.metrics = WorkerMetrics()
        super().__init__(settings, self.metrics, "worker")
        self._models = models
        # Backends this worker opened (not ones passed in) are closed by stop().
        self._owns_models = models is None
        self._scorer: Scorer | None = None
        self._redis: RedisClient | None = None
        self._keys: KeyStore | None = None
        self._store: CounterStore | None = None
        self._live: ConfigFollower | None = None
        self._admitter: Admitter | None = None
        self._replays: ReplayCache | None = None
        self._throttle: ThrottleStore | None = None
        # Answers held back by hidden suspicion, and the offsets they hold.
        self._held = HeldAnswers(
            lambda: self._producer, self.metrics, settings.kafka.request_timeout_s
        )
        self._answers = Answers(self.metrics, self._held)
        self._clients: ClientStates | None = None
        self._clientview: ClientView | None = None
        self._cross: CrossClient | None = None
        # Detectors' live baselines in Redis (gateway/baselines.py).
        self._baselines: BaselineKeeper | None = None
        self._started = False
        self.metrics_port = 0

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

        # Models and detectors first: a bad model file should fail before we
        # join the group and take partitions we cannot serve.
        loop = asyncio.get_running_loop()
        if self._models is None:
            self._models = await loop.run_in_executor(None, self._load_models)
        # File I/O (and an fsync when the key is new): off the event loop.
        server_key = await loop.run_in_executor(None, load_server_key, s)
        # Compile the detectors' kernels now if their cache is stale (seconds),
        # off the loop, so no batch pays for it; a warm cache costs ~1 ms.
        await loop.run_in_executor(None, ensure_warm)
        # Building the detectors calibrates them on each model's reference
        # sample: 0.3-0.9 s of CPU, off the loop.
        models = self._models
        self._scorer = await loop.run_in_executor(
            None, lambda: Scorer(s, models, self.metrics)
        )
        # Before joining the group: a port clash (ConfigError) should stop the
        # worker before it takes partitions it could not report on.
        self.metrics_port = self.metrics.serve(
            s.worker.metrics_host, s.worker.metrics_port
        )

        self._redis = redis_from_settings(s)
        self.metrics.watch_redis_breaker(breaker_for(self._redis))
        self._keys = KeyStore(self._redis, s, server_key=server_key)
        self._store = CounterStore(self._redis, s)
        self._admitter = Admitter(self._store, self.metrics.decisions_without_store)
        self._replays = ReplayCache(self._redis, self._store, s)
        self._throttle = ThrottleStore(self._redis, s)
        self._clientview = ClientView(self._redis, s)
        self._cross = CrossClient(self._redis, s)
        self._clients = ClientStates(self._store, self._scorer, self.metrics, s.worker)

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
        # Live detector baselines saved by any worker, before consuming; a
        # Redis outage only leaves the detectors with the reference sample.
        self._baselines = BaselineKeeper(
            self._scorer, self._redis, s, self.metrics, self._batch_lock
        )
        try:
            await self._baselines.load()
        except BaseException:
            await self.stop()  # cancelled mid-load: the live tasks are running
            raise

        self._producer, self._consumer = group_clients(s, s.kafka.group_id)
        try:
            await start_group_clients(
                s,
                self._producer,
                self._consumer,
                s.kafka.topics.requests,
                self.rebalance_listener(),
            )
        except BrokerError:
            await self.stop()
            raise
        self._baselines.start()
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
        assert self._cross is not None
        # Checked before anything changes, so a refused version changes nothing.
        cross = self._cross.merged(document.links)
        self._scorer.check_links(cross)
        self._scorer.apply_live(
            document.policy, document.detectors, document.detector_shadow
        )
        self._scorer.apply_links(cross)
        self._cross.reconfigure(cross)
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
            baselines, self._baselines = self._baselines, None
            if baselines is not None:
                await baselines.stop()
            if consumer is not None:
                await self._held.drain(consumer, self._held.partitions())
                # Snapshot before leaving, so the next owner of these clients
                # starts from their history instead of from nothing.
                if self._clients is not None:
                    await self._clients.snapshot(self._clients.held())
        finally:
            try:
                await close_clients(consumer, producer, redis_client, timeout_s)
            finally:
                self.metrics.close()
                if self._owns_models and self._models is not None:
                    models, self._models = self._models, None
                    close_backends(models)
        if self._started:
            logger.info(
                "worker stopped", extra={"worker": self.settings.worker.worker_id}
            )
        self._started = False

    # -- one batch ---------------------------------------------------------------

    @property
    def max_batch_records(self) -> int:
        return self.settings.kafka.max_batch_records

    async def _before_fetch(self) -> None:
        if self._live is not None:
            # Between batches: no batch runs on two configuration versions.
            await self._live.apply_pending()

    async def _commit(self, next_offsets: dict[TopicPartition, int]) -> None:
        # A partition whose answers policy holds back commits only up to them.
        await super()._commit(self._held.committable(next_offsets))
        self._held.answered(next_offsets)

    async def process_records(
        self, records: Sequence[tuple[TopicPartition, Any]]
    ) -> None:
        """Serve one batch of consumer records end to end, producing every
        answer; raises ``BrokerError`` if the produces did not all succeed."""
        assert self._consumer is not None and self._producer is not None
        assert self._keys is not None and self._models is not None
        assert self._admitter is not None and self._replays is not None
        assert self._store is not None and self._throttle is not None
        assert self._scorer is not None and self._clients is not None
        assert self._clientview is not None
        timer = _StageTimer(self.metrics)
        self.metrics.batch_size.observe(len(records))
        max_bytes = self.settings.kafka.max_message_bytes
        items = [intake.decode(tp, record, max_bytes) for tp, record in records]
        timer.lap("decode")

        replays: list[BatchItem] = []
        try:
            await intake.authenticate_items(
                items, self._keys, self._consumer, self.settings, self.metrics
            )
            timer.lap("auth")
            intake.validate_items(items, self._models)
            timer.lap("validate")
            # Retries of served requests take their kept answer and leave the
            # batch here: not admitted (so not counted), scored or predicted.
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
            await intake.admit_items(items, self._admitter)
            timer.lap("admit")
            await self._clients.load_new(items)
            # Before scoring, from what admission read (no round trip): a
            # release resets the client, and a hidden block or throttle the
            # policy's memory lost is put back.
            self._clientview.apply_releases(items, self._scorer)
            enforce.restore_hidden(items, self._scorer.policy)
            await enforce.apply_throttle(
                items, self._scorer.policy, self._throttle, self._store
            )

            scorer = self._scorer
            # Off the loop; a stop that cancels this batch still waits for the
            # thread before it snapshots the scorer's clients.
            await in_thread(lambda: scorer.score_and_predict(items))
            timer.lap("detect_predict")
            if self._cross is not None:
                await self._cross.after_scoring(
                    items,
                    self._scorer.take_fingerprints(),
                    self._scorer.take_regions(),
                )
                self._scorer.note_groups(items)
            timer.lap("cross_client")
            await enforce.enforce_blocks(
                items, self._store, self.settings.policy.block_cooldown_s
            )
            await enforce.record_hidden(items, self._store)
            await enforce.release_unserved(items, self._store)
            await self._clientview.observe(items)
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

        await self._answers.produce(
            [*items, *replays],
            producer=self._producer,
            consumer=self._consumer,
            replays=self._replays,
            settings=self.settings,
        )
        timer.lap("produce")
        await enforce.release_in_flight(items, self._admitter)
        await self._clients.maintain()

    def set_limits(self, limits: LimitsConfig) -> None:
        """Put new plans and limits in force from the next batch on, without a
        restart (for the live configuration)."""
        self.settings = self.settings.model_copy(update={"limits": limits})
        if self._store is not None:
            self._store.set_limits(limits)
        if self._throttle is not None:
            self._throttle.set_limits(limits)

    # -- client state across rebalances -----------------------------------------

    def _revoke_wait_s(self) -> float:
        # Bounded: a batch stuck (most likely on a commit that cannot finish
        # during the rebalance) must not stall the group; its detector state
        # is in use by the executor, so it is neither snapshotted nor
        # forgotten (GroupService._on_revoke_timed_out).
        return self.settings.kafka.request_timeout_s

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        # The batch in flight has committed: hand the clients of the revoked
        # partitions over through Redis.
        if self._consumer is not None:
            await self._held.drain(self._consumer, revoked)
        leaving: list[str] = []
        if self._clients is not None:
            leaving = await self._clients.hand_over(revoked)
        logger.info(
            "partitions revoked",
            extra={
                "partitions": sorted(tp.partition for tp in revoked),
                "clients": len(leaving),
            },
        )


class _StageTimer:
    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self._metrics.stage_seconds.labels(stage).observe(now - self._t)
        self._t = now
