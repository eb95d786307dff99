"""Detectors' live baselines in Redis: saved by every worker, loaded at start.

Some detectors learn what honest looks like from the live traffic of clients
in good standing (``detectors.baselines``): margin's rank test is blind until
it has ranked 512 live honest answers, traffic is cold until it has learnt 20
honest judgements. Kept only in memory, that knowledge was lost at every
restart and missing on every worker added to the group. Here each worker
saves its detectors' live baselines to Redis periodically
(``worker.baseline_save_interval_s``) and at a clean stop, and a starting
worker loads the best one for each model and detector before it consumes.
At each save interval, a detector whose own baseline is still not ready
(nothing was there to load at start, or Redis was down) imports the best
ready one another worker has saved since (:meth:`BaselineKeeper.catch_up`).

Keys, under ``redis.key_prefix`` with one hash tag per model (so a model's
keys share a slot on Redis Cluster, like a client's ``{c:<id>}``)::

    {prefix}:{bl:<model>}:<detector>:index      sorted set: worker -> saved ms
    {prefix}:{bl:<model>}:<detector>:w:<hash>   one worker's SavedBaseline

Merge rule: one key per worker, never overwritten by another, and the
loader picks (:func:`detectors.baselines.choose_baseline`): among the
entries saved for this model identity (:func:`model_identity`: signature,
version included, and reference sample) within ``worker.baseline_max_age_s``,
the ready one (holds enough honest samples for its detector) with the most
samples, newest on a tie, else the one with the most samples. Every key
expires after
``baseline_max_age_s`` without a save, so workers that are gone leave nothing
behind for long.

Redis trouble goes through the client's breaker (``gateway.store.redis_guard``):
a failed load or save is logged and counted, and the worker carries on with
the baseline it has in memory; it never holds up consuming beyond one bounded
call.

Limits: a worker that is ready keeps its own baseline and never takes in
what others learnt later; a crash loses what was learnt since the last save;
with ``baseline_save_interval_s`` 0 there is no catch-up either; ages are
taken from the saving worker's wall clock, so clock skew between hosts moves
the staleness bound by as much.

This module imports Redis, the gateway's config, errors, metrics and scorer,
and ``detectors.baselines``; nothing from Kafka or FastAPI.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
from redis import exceptions as redis_exc

from detectors.baselines import (
    BASELINE_FORMAT,
    MAX_CLOCK_SKEW_S,
    BaselineRefused,
    SavedBaseline,
    choose_baseline,
    decode_baseline,
    encode_saved,
)
from gateway.backends import ModelBackend
from gateway.config import Settings
from gateway.errors import StoreError
from gateway.metrics import WorkerMetrics
from gateway.scoring import Scorer
from gateway.store import RedisClient, redis_guard

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_LOAD_CANDIDATES = 16
"""Most saved entries read per model and detector at load: the newest by
their index score. Worker ids name a host and pid, so every restart within
``baseline_max_age_s`` leaves one more entry (each up to
:data:`detectors.baselines.MAX_BASELINE_BYTES`); reading them all made a
start's memory and time grow with the group's restart history, or with
whatever someone wrote into the index. An older rich entry behind 16 newer
ones is passed over."""


def model_identity(model: ModelBackend) -> str:
    """A digest naming one version of a model: its signature (name, version,
    tensors, classes) and its reference sample. A baseline saved under another
    identity is never loaded: honest answers of an older model say nothing of
    a retrained one's."""
    digest = hashlib.sha256(model.signature.to_json().encode())
    reference = np.ascontiguousarray(model.reference)
    digest.update(f"|{reference.dtype.str}|{reference.shape}|".encode())
    digest.update(reference.tobytes())
    return digest.hexdigest()[:32]


def _replies(replies: list[Any], instead: Any) -> list[Any]:
    """A pipeline's replies, an error reply replaced by ``instead``.

    An error reply names one key of the wrong type (WRONGTYPE: overwritten
    by hand or by a bug); raised, it failed the whole load, every model's and
    detector's. Anything else (the connection) is raised, for the guard.
    """
    kept = []
    for reply in replies:
        if isinstance(reply, redis_exc.ResponseError):
            logger.warning("a saved baseline key is unreadable: %s", reply)
            reply = instead
        elif isinstance(reply, BaseException):
            raise reply
        kept.append(reply)
    return kept


def _check_envelope(saved: SavedBaseline) -> None:
    """Refuse (``invalid``) an entry whose envelope's ``samples`` or
    ``ready``, which the choice ranks by, are not its blob's: one claiming
    more than it carries would win over richer honest entries."""
    header = decode_baseline(saved.baseline)
    if (header.samples, header.ready) != (saved.samples, saved.ready):
        raise BaselineRefused(
            "invalid",
            f"envelope says {saved.samples} samples (ready {saved.ready}), "
            f"the baseline holds {header.samples} (ready {header.ready})",
        )


class RedisBaselineStore:
    """The live baselines of every worker, in Redis (see the module docstring).

    The async counterpart of :class:`detectors.baselines.InMemoryBaselineStore`.

    Parameters
    ----------
    redis
        Client with ``decode_responses=False``.
    prefix
        ``redis.key_prefix``.
    timeout_s
        Bound on each round trip.
    """

    def __init__(self, redis: RedisClient, prefix: str, *, timeout_s: float) -> None:
        self._redis = redis
        self._prefix = prefix
        self._timeout_s = timeout_s

    def index_key(self, model: str, detector: str) -> str:
        return f"{self._prefix}:{{bl:{model}}}:{detector}:index"

    def entry_key(self, model: str, detector: str, worker: str | bytes) -> str:
        # Worker ids are free text (host and pid by default): hashed, so no
        # id can add a brace or colon to a key name. Bytes are an index
        # member as read, which need not be UTF-8 if someone else wrote it.
        raw = worker if isinstance(worker, bytes) else worker.encode()
        tag = hashlib.sha256(raw).hexdigest()[:16]
        return f"{self._prefix}:{{bl:{model}}}:{detector}:w:{tag}"

    async def save_many(
        self, entries: Sequence[SavedBaseline], *, ttl_s: float
    ) -> None:
        """Store each entry as its worker's, in one round trip, for ``ttl_s``;
        index entries older than ``ttl_s`` are pruned on the way.

        Raises
        ------
        StoreError
            Redis could not be reached or failed.
        """
        if not entries:
            return
        ttl_ms = max(1, round(ttl_s * 1000))
        oldest_ms = round(time.time() * 1000) - ttl_ms
        async with redis_guard("save_baselines", self._timeout_s, self._redis):
            pipe = self._redis.pipeline(transaction=False)
            for saved in entries:
                index = self.index_key(saved.model, saved.detector)
                at_ms = round(saved.saved_at_s * 1000)
                pipe.set(
                    self.entry_key(saved.model, saved.detector, saved.worker),
                    encode_saved(saved),
                    px=ttl_ms,
                )
                pipe.zadd(index, {saved.worker: at_ms})
                pipe.zremrangebyscore(index, "-inf", f"({oldest_ms}")
                pipe.pexpire(index, ttl_ms)
            await pipe.execute()

    async def load_many(
        self, pairs: Sequence[tuple[str, str]], *, not_before_s: float
    ) -> dict[tuple[str, str], list[bytes]]:
        """The newest entries (at most :data:`MAX_LOAD_CANDIDATES`) of each
        (model, detector) saved since ``not_before_s`` (wall clock, seconds)
        and dated no more than ``MAX_CLOCK_SKEW_S`` ahead of now, in two
        round trips.

        Raises
        ------
        StoreError
            Redis could not be reached or failed.
        """
        found: dict[tuple[str, str], list[bytes]] = {pair: [] for pair in pairs}
        if not pairs:
            return found
        since_ms = round(not_before_s * 1000)
        # Members dated further ahead would be refused by the choice anyway;
        # left in the range they would crowd the honest ones out of the cap.
        until_ms = round((time.time() + MAX_CLOCK_SKEW_S) * 1000)
        async with redis_guard("load_baselines", self._timeout_s, self._redis):
            pipe = self._redis.pipeline(transaction=False)
            for model, detector in pairs:
                pipe.zrevrangebyscore(
                    self.index_key(model, detector),
                    until_ms,
                    since_ms,
                    start=0,
                    num=MAX_LOAD_CANDIDATES,
                )
            workers = _replies(await pipe.execute(raise_on_error=False), [])
            wanted: list[tuple[tuple[str, str], str]] = []
            for pair, members in zip(pairs, workers, strict=True):
                for member in members:
                    wanted.append((pair, self.entry_key(*pair, member)))
            if not wanted:
                return found
            pipe = self._redis.pipeline(transaction=False)
            for _, key in wanted:
                pipe.get(key)
            blobs = _replies(await pipe.execute(raise_on_error=False), None)
        for (pair, _), blob in zip(wanted, blobs, strict=True):
            if blob is not None:
                found[pair].append(bytes(blob))
        return found


class BaselineKeeper:
    """Loads the detectors' live baselines at start, saves them periodically
    and at stop (see the module docstring).

    Parameters
    ----------
    scorer
        The worker's detectors per model.
    redis
        The worker's Redis client.
    settings
        ``redis.key_prefix``, ``redis.socket_timeout_s``,
        ``worker.worker_id``, ``worker.baseline_save_interval_s``,
        ``worker.baseline_max_age_s``, ``kafka.request_timeout_s`` (how long
        a save waits for the batch in flight).
    metrics
        ``baseline_saves`` and ``baseline_loads`` are counted here.
    batch_lock
        Held while a batch is scored (in an executor thread): a save reads
        the detectors only while holding it, since they are not thread-safe.
    """

    def __init__(
        self,
        scorer: Scorer,
        redis: RedisClient,
        settings: Settings,
        metrics: WorkerMetrics,
        batch_lock: asyncio.Lock,
    ) -> None:
        self._scorer = scorer
        self._store = RedisBaselineStore(
            redis, settings.redis.key_prefix, timeout_s=settings.redis.socket_timeout_s
        )
        self._worker_id = settings.worker.worker_id
        self._interval_s = settings.worker.baseline_save_interval_s
        self._max_age_s = settings.worker.baseline_max_age_s
        self._lock_timeout_s = settings.kafka.request_timeout_s
        self._metrics = metrics
        self._lock = batch_lock
        self._ids = {name: model_identity(m) for name, m in scorer.models.items()}
        self._task: asyncio.Task[None] | None = None
        # Per (model, detector), the baseline last loaded or saved: an
        # unchanged one is not saved again, so a worker that learnt nothing
        # since does not make another worker's baseline look fresh.
        self._last: dict[tuple[str, str], bytes] = {}
        self.load_seconds = 0.0
        self.catch_ups = 0
        """Rounds of :meth:`catch_up` begun (for tests and debugging)."""

    def _pairs(self, *, unready_only: bool = False) -> list[tuple[str, str]]:
        """(model, detector) of every detector that keeps a live baseline;
        with ``unready_only``, of those whose baseline is not ready yet."""
        pairs = []
        for model in self._ids:
            for name, detector in self._scorer.detectors_of(model).items():
                blob = detector.export_baseline()
                if blob is None or (unready_only and decode_baseline(blob).ready):
                    continue
                pairs.append((model, name))
        return pairs

    async def load(self) -> int:
        """Import the best saved baseline of each model and detector; returns
        how many were imported. Never raises for Redis trouble (logged,
        counted as ``unavailable``): the detectors keep what they have."""
        started = time.perf_counter()
        pairs = self._pairs()
        now_s = time.time()
        try:
            found = await self._store.load_many(
                pairs, not_before_s=now_s - self._max_age_s
            )
        except StoreError as exc:
            for model, detector in pairs:
                self._metrics.baseline_loads.labels(
                    model, detector, "unavailable"
                ).inc()
            logger.warning(
                "live baselines not loaded, detectors start from the reference "
                "sample: %s",
                exc.message,
                extra={"worker": self._worker_id},
            )
            self.load_seconds = time.perf_counter() - started
            return 0
        loaded = 0
        for model, detector in pairs:
            loaded += self._import_best(
                model, detector, found[(model, detector)], now_s
            )
        self.load_seconds = time.perf_counter() - started
        logger.info(
            "live baselines loaded",
            extra={
                "worker": self._worker_id,
                "loaded": loaded,
                "sought": len(pairs),
                "seconds": round(self.load_seconds, 4),
            },
        )
        return loaded

    def _import_best(
        self,
        model: str,
        name: str,
        candidates: list[bytes],
        now_s: float,
        *,
        catching_up: bool = False,
    ) -> int:
        """Import the first acceptable candidate; 1 if one was imported.

        ``catching_up`` (see :meth:`catch_up`) passes over this worker's own
        entries and those not ready, and does not count finding none."""
        choice = choose_baseline(
            candidates,
            model=model,
            model_id=self._ids[model],
            detector=name,
            now_s=now_s,
            max_age_s=self._max_age_s,
        )
        fields: dict[str, Any] = {"model": model, "detector": name}
        if choice.skipped:
            logger.info(
                "saved baselines passed over", extra={**fields, **choice.skipped}
            )
        detector = self._scorer.detectors_of(model)[name]
        for saved in choice.chosen:
            if catching_up and (saved.worker == self._worker_id or not saved.ready):
                continue
            about = {
                **fields,
                "bytes": len(saved.baseline),
                "age_s": round(now_s - saved.saved_at_s, 1),
                "from_worker": saved.worker,
            }
            try:
                _check_envelope(saved)
                samples = detector.import_baseline(saved.baseline)
            except BaselineRefused as exc:
                self._metrics.baseline_loads.labels(model, name, "refused").inc()
                logger.warning(
                    "saved baseline refused: %s", exc, extra={**about, "code": exc.code}
                )
                continue
            except Exception:
                # Bytes from Redis must never stop a worker from starting: a
                # failure the checks did not foresee is a bug, logged loudly,
                # and the import changed nothing (it checks before it applies).
                self._metrics.baseline_loads.labels(model, name, "refused").inc()
                logger.exception("saved baseline could not be imported", extra=about)
                continue
            self._metrics.baseline_loads.labels(model, name, "loaded").inc()
            self._last[(model, name)] = detector.export_baseline() or b""
            logger.info("live baseline loaded", extra={**about, "samples": samples})
            return 1
        if not catching_up:
            self._metrics.baseline_loads.labels(model, name, "none").inc()
        return 0

    async def catch_up(self) -> int:
        """Import, for each detector whose own live baseline is not ready, the
        best ready one another worker has saved since; returns how many were
        imported. Never raises for Redis trouble.

        A worker that found nothing at start (Redis was down, or no worker had
        saved yet) would otherwise stay blind until it had learnt enough
        alone. A ready detector imports nothing more, and this worker's own
        entries and others' unready ones are passed over: two workers trading
        baselines back and forth would count the same honest answers twice.
        """
        self.catch_ups += 1
        unready = await self._locked(lambda: self._pairs(unready_only=True))
        if not unready:
            return 0
        now_s = time.time()
        try:
            found = await self._store.load_many(
                unready, not_before_s=now_s - self._max_age_s
            )
        except StoreError as exc:
            logger.debug(
                "no catch-up of unready baselines: %s",
                exc.message,
                extra={"worker": self._worker_id},
            )
            return 0
        imported = await self._locked(lambda: self._import_unready(found, now_s))
        return imported or 0

    def _import_unready(
        self, found: dict[tuple[str, str], list[bytes]], now_s: float
    ) -> int:
        # Batches ran during the fetch: one may have made a baseline ready.
        imported = 0
        for model, name in self._pairs(unready_only=True):
            candidates = found.get((model, name))
            if candidates is not None:
                imported += self._import_best(
                    model, name, candidates, now_s, catching_up=True
                )
        return imported

    async def _locked(self, read: Callable[[], T]) -> T | None:
        """``read`` with the batch lock held (the detectors are not
        thread-safe); None when the batch in flight did not finish in time."""
        try:
            async with asyncio.timeout(self._lock_timeout_s):
                await self._lock.acquire()
        except TimeoutError:
            logger.warning(
                "live baselines skipped: the batch in flight did not finish",
                extra={"worker": self._worker_id},
            )
            return None
        try:
            return read()
        finally:
            self._lock.release()

    async def save(self) -> int:
        """Save every live baseline that holds samples; returns how many were
        saved. Never raises for Redis trouble (logged, counted)."""
        entries = await self._locked(self._export)
        if entries is None:
            return 0
        try:
            await self._store.save_many(entries, ttl_s=self._max_age_s)
        except StoreError as exc:
            for saved in entries:
                self._metrics.baseline_saves.labels(
                    saved.model, saved.detector, "unavailable"
                ).inc()
            logger.warning(
                "live baselines not saved, kept in memory: %s",
                exc.message,
                extra={"worker": self._worker_id, "baselines": len(entries)},
            )
            return 0
        for saved in entries:
            self._last[(saved.model, saved.detector)] = saved.baseline
            self._metrics.baseline_saves.labels(saved.model, saved.detector, "ok").inc()
            logger.debug(
                "live baseline saved",
                extra={
                    "model": saved.model,
                    "detector": saved.detector,
                    "bytes": len(saved.baseline),
                    "samples": saved.samples,
                    "age_s": 0.0,
                },
            )
        return len(entries)

    def _export(self) -> list[SavedBaseline]:
        """Every live baseline with samples, as envelopes (under the lock)."""
        now_s = time.time()
        entries = []
        for model, model_id in self._ids.items():
            for name, detector in self._scorer.detectors_of(model).items():
                blob = detector.export_baseline()
                if blob is None:
                    continue
                header = decode_baseline(blob)
                if header.samples == 0 or self._last.get((model, name)) == blob:
                    # Nothing learnt live, or nothing since the last save.
                    continue
                entries.append(
                    SavedBaseline(
                        format=BASELINE_FORMAT,
                        model=model,
                        model_id=model_id,
                        detector=name,
                        worker=self._worker_id,
                        saved_at_s=now_s,
                        samples=header.samples,
                        ready=header.ready,
                        baseline=blob,
                    )
                )
        return entries

    def start(self) -> None:
        """Catch up unready baselines, then save, every
        ``baseline_save_interval_s`` in the background (not at all when it is
        0). Idempotent."""
        if self._interval_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._every(), name="baseline-save")

    async def _every(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            for step in (self.catch_up, self.save):
                try:
                    await step()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # A bug here must cost this round, not the worker's next.
                    logger.exception("live baselines: %s failed", step.__name__)

    async def stop(self) -> None:
        """Stop the periodic saves, then save once more. Idempotent: a second
        call saves again, which only refreshes the entries."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        try:
            await self.save()
        except Exception:
            # Raised, a bug here skipped the rest of the worker's stop: its
            # clients' hand-over and leaving the group.
            logger.exception("saving live baselines at stop failed")
