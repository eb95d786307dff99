"""Detectors' live baselines across worker restarts, on the real broker and
Redis (gateway/baselines.py): a worker that stops saves what it learnt from
honest traffic, and a fresh worker on the same prefix starts with it; a
Redis that is down at start costs the load, never the start."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis

from detectors._state import decode_blob
from detectors.baselines import (
    BASELINE_FORMAT,
    BaselineBlob,
    SavedBaseline,
    choose_baseline,
    decode_baseline,
    encode_baseline,
)
from gateway.baselines import RedisBaselineStore, model_identity
from gateway.config import Settings
from gateway.models import digits_split, load_model
from gateway.store import redis_from_settings
from gateway.worker import Worker
from tests.conftest import StackInfo
from tests.integration.helpers import (
    RawKafka,
    create_key,
    delete_prefix,
    fail_open_settings,
    isolated_settings,
    request_path_settings,
    responses_for,
    running_worker,
)
from tests.integration.redis_cluster import RedisClusterInfo, redis_cluster
from tests.integration.test_adversarial import OwnRedis, _free_port
from tests.integration.test_baselines_hostile import margin_blob

# The session's private Redis Cluster, started only if a test asks for it.
__all__ = ["redis_cluster"]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

X_TRAIN = digits_split()[0]
ROWS_PER_REQUEST = 16
DEADLINE_S = 60.0


def margin_live(worker: Worker) -> tuple[int, bool]:
    """Live honest answers in the worker's margin baseline for digits, and
    whether its rank test may run on them. Read between batches only."""
    assert worker._scorer is not None
    blob = worker._scorer.detectors_of("digits")["margin"].export_baseline()
    assert blob is not None
    header = decode_baseline(blob)
    return header.samples, header.ready


def with_worker_id(settings: Settings, worker_id: str) -> Settings:
    return settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"worker_id": worker_id})}
    )


def loads(worker: Worker, detector: str, outcome: str) -> float:
    value = worker.metrics.registry.get_sample_value(
        "modelgate_baseline_loads_total",
        {"model": "digits", "detector": detector, "outcome": outcome},
    )
    return value or 0.0


async def test_a_fresh_worker_starts_with_the_live_baseline_a_stopped_one_saved(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = request_path_settings(
        stack, models_dir, worker={"baseline_save_interval_s": 0}
    )
    names = [f"honest-{i}" for i in range(8)]
    keys = {name: await create_key(settings, name) for name in names}
    newcomer = await create_key(settings, "newcomer")
    order = np.random.default_rng(0).permutation(len(X_TRAIN))
    try:
        # Worker A serves honest traffic until margin's live baseline is ready.
        async with running_worker(with_worker_id(settings, "worker-a")) as a:
            assert margin_live(a) == (0, False)
            assert loads(a, "margin", "none") == 1
            async with RawKafka(settings) as kafka:
                deadline = time.monotonic() + DEADLINE_S
                start = 0
                while not margin_live(a)[1]:
                    assert time.monotonic() < deadline, margin_live(a)
                    ids = []
                    for name in names:
                        rows = X_TRAIN[order[start : start + ROWS_PER_REQUEST]]
                        start = (start + ROWS_PER_REQUEST) % (len(order) - 16)
                        ids.append(
                            await kafka.send_request(*keys[name], rows, client_id=name)
                        )
                    await kafka.flush()
                    answers = await responses_for(settings, ids, timeout_s=DEADLINE_S)
                    assert all(r["status"] == "ok" for r in answers.values())
            learnt, _ = margin_live(a)
            assert learnt >= 512
            coverage_a = a._scorer.detectors_of("digits")["coverage"]
            coverage_blob = coverage_a.export_baseline()
            assert coverage_a.live_answers > 0  # type: ignore[attr-defined]
        # Leaving the block stopped A, which saved its baselines.

        # Worker B starts fresh on the same prefix: ready before any batch.
        started = time.perf_counter()
        async with running_worker(with_worker_id(settings, "worker-b")) as b:
            start_s = time.perf_counter() - started
            assert b._baselines is not None
            load_s = b._baselines.load_seconds
            assert margin_live(b) == (learnt, True)
            assert loads(b, "margin", "loaded") == 1
            assert loads(b, "traffic", "loaded") == 1
            # And coverage's live (cell, class) table, as A had it.
            assert loads(b, "coverage", "loaded") == 1
            coverage_b = b._scorer.detectors_of("digits")["coverage"]
            assert coverage_b.export_baseline() == coverage_blob
            assert load_s < 2.0
            # B's first batch, from a client A never saw, is ranked against it.
            async with RawKafka(settings) as kafka:
                rid = await kafka.send_request(
                    *newcomer, X_TRAIN[order[:ROWS_PER_REQUEST]], client_id="newcomer"
                )
                await kafka.flush()
                answers = await responses_for(settings, [rid], timeout_s=DEADLINE_S)
            assert answers[rid]["status"] == "ok", answers[rid]
            assert b._scorer is not None
            margin = b._scorer.detectors_of("digits")["margin"]
            state = margin.dump_state("newcomer")
            assert state is not None
            rank_w = np.frombuffer(decode_blob(state).fields["rank_w"], "<f8")
            assert rank_w[0] > 0, "the first batch was not ranked"
            assert margin_live(b)[0] == min(learnt + ROWS_PER_REQUEST, 4096)
        print(
            f"\nbaseline: {learnt} live answers; B's load took {load_s * 1000:.1f} ms "
            f"of a {start_s:.2f} s start"
        )
    finally:
        await delete_prefix(settings)


async def test_a_worker_starts_and_serves_while_redis_is_down_at_load(
    stack: StackInfo, models_dir: Path, tmp_path: Path
) -> None:
    own = OwnRedis(tmp_path, _free_port(16497))
    own.start()
    try:
        settings = fail_open_settings(
            stack,
            own.url,
            models_dir,
            redis={"socket_timeout_s": 0.5, "breaker_cooldown_s": 0.5},
            worker={"baseline_save_interval_s": 0.2},
        )
        key = await create_key(settings, "ann")
        # Keep the key on disk, so the restarted server has it.
        client = Redis.from_url(own.url)
        try:
            await client.save()
        finally:
            await client.aclose()
        own.kill()

        async with running_worker(settings) as worker:
            assert loads(worker, "margin", "unavailable") == 1
            assert margin_live(worker) == (0, False)
            assert worker._baselines is not None
            # A refused connection fails at once; a hung Redis would cost one
            # socket_timeout_s (0.5 s here), never more.
            down_load_s = worker._baselines.load_seconds
            assert down_load_s < 1.0
            print(f"\nbaseline load with Redis down: {down_load_s * 1000:.1f} ms")
            own.start()
            async with RawKafka(settings) as kafka:
                rid = await kafka.send_request(
                    *key, X_TRAIN[:ROWS_PER_REQUEST], client_id="ann"
                )
                await kafka.flush()
                answer = (await responses_for(settings, [rid], timeout_s=DEADLINE_S))[
                    rid
                ]
            assert answer["status"] == "ok", answer
            # Redis is back: the periodic save stores what ann taught.
            deadline = time.monotonic() + DEADLINE_S
            saved = "modelgate_baseline_saves_total"
            labels = {"model": "digits", "detector": "margin", "outcome": "ok"}
            while not worker.metrics.registry.get_sample_value(saved, labels):
                assert time.monotonic() < deadline, "no baseline saved after recovery"
                # Polling a counter the worker's own task moves, with a deadline.
                await asyncio.sleep(0.05)
    finally:
        own.kill()


async def test_the_redis_store_keeps_one_entry_per_worker_and_the_loader_picks(
    stack: StackInfo, models_dir: Path
) -> None:
    """Several workers' entries side by side on the real Redis: none
    overwrites another, the choice skips another model identity and stale
    entries, and every key expires."""
    settings = request_path_settings(stack, models_dir)
    redis = redis_from_settings(settings)
    store = RedisBaselineStore(redis, settings.redis.key_prefix, timeout_s=2.0)
    now_s = time.time()

    def entry(worker: str, age_s: float, samples: int, ready: bool, **kw: Any) -> Any:
        fields: dict[str, Any] = {
            "format": BASELINE_FORMAT,
            "model": "digits",
            "model_id": "id-1",
            "detector": "margin",
            "worker": worker,
            "saved_at_s": now_s - age_s,
            "samples": samples,
            "ready": ready,
            "baseline": worker.encode(),
            **kw,
        }
        return SavedBaseline(**fields)

    try:
        await store.save_many(
            [
                entry("a{x}:1", 300.0, 4096, True),
                entry("b", 10.0, 30, False),
                entry("c", 5.0, 4096, True, model_id="id-2"),
            ],
            ttl_s=3600.0,
        )
        await store.save_many([entry("d", 7200.0, 4096, True)], ttl_s=3600.0)
        await store.save_many([entry("stale", 1000.0, 4096, True)], ttl_s=3600.0)
        found = await store.load_many(
            [("digits", "margin"), ("digits", "traffic")], not_before_s=now_s - 3600.0
        )
        assert found[("digits", "traffic")] == []
        # "d" was older than the ttl when saved: pruned from the index.
        assert len(found[("digits", "margin")]) == 4
        choice = choose_baseline(
            found[("digits", "margin")],
            model="digits",
            model_id="id-1",
            detector="margin",
            now_s=now_s,
            max_age_s=600.0,
        )
        assert [s.worker for s in choice.chosen] == ["a{x}:1", "b"]
        assert choice.skipped == {"other_model": 1, "stale": 1}
        index = store.index_key("digits", "margin")
        assert index.startswith(f"{settings.redis.key_prefix}:{{bl:digits}}:")
        assert await redis.zcard(index) == 4
        assert 0 < await redis.pttl(index) <= 3_600_000
        assert (
            0 < await redis.pttl(store.entry_key("digits", "margin", "b")) <= 3_600_000
        )
    finally:
        await redis.aclose()
        await delete_prefix(settings)


async def test_hostile_saved_baselines_are_refused_and_the_worker_starts_blind(
    stack: StackInfo, models_dir: Path
) -> None:
    """Bytes in Redis under this prefix that are not a usable baseline (not
    msgpack; a well-formed entry whose margins are NaN) are refused at load,
    counted, and leave the worker blind but serving."""
    settings = request_path_settings(
        stack, models_dir, worker={"baseline_save_interval_s": 0}
    )
    redis = redis_from_settings(settings)
    store = RedisBaselineStore(redis, settings.redis.key_prefix, timeout_s=2.0)
    identity = model_identity(load_model(models_dir, "digits"))
    nan = encode_baseline(
        BaselineBlob(
            format=BASELINE_FORMAT,
            detector="margin",
            n_features=64,
            samples=600,
            ready=True,
            fields={
                "margin": np.full(600, np.nan).tobytes(),
                "entropy": np.zeros(600).tobytes(),
            },
        )
    )
    hostile = SavedBaseline(
        format=BASELINE_FORMAT,
        model="digits",
        model_id=identity,
        detector="margin",
        worker="mallory",
        saved_at_s=time.time(),
        samples=600,
        ready=True,
        baseline=nan,
    )
    key = await create_key(settings, "ann")
    try:
        await store.save_many([hostile], ttl_s=600.0)
        index = store.index_key("digits", "margin")
        await redis.zadd(index, {"garbage": int(time.time() * 1000)})
        await redis.set(store.entry_key("digits", "margin", "garbage"), b"\xc1junk")
        async with running_worker(settings) as worker:
            assert loads(worker, "margin", "refused") == 1
            assert loads(worker, "margin", "loaded") == 0
            assert margin_live(worker) == (0, False)
            async with RawKafka(settings) as kafka:
                rid = await kafka.send_request(
                    *key, X_TRAIN[:ROWS_PER_REQUEST], client_id="ann"
                )
                await kafka.flush()
                answers = await responses_for(settings, [rid], timeout_s=DEADLINE_S)
            assert answers[rid]["status"] == "ok", answers[rid]
    finally:
        await redis.aclose()
        await delete_prefix(settings)


async def test_the_redis_store_works_on_a_cluster(
    stack: StackInfo, redis_cluster: RedisClusterInfo, models_dir: Path
) -> None:
    """Two models' keys sit in two hash slots; one pipeline saves both and
    two load them, on a private three-primary Redis Cluster."""
    settings = isolated_settings(stack.kafka_bootstrap, redis_cluster.url, models_dir)
    settings = settings.model_copy(
        update={"redis": settings.redis.model_copy(update={"cluster": True})}
    )
    redis = redis_from_settings(settings)
    store = RedisBaselineStore(redis, settings.redis.key_prefix, timeout_s=5.0)
    now_s = time.time()
    entries = [
        SavedBaseline(BASELINE_FORMAT, m, "id", d, "w", now_s, 1, False, m.encode())
        for m in ("digits", "phishing")
        for d in ("margin", "traffic")
    ]
    pairs = [(e.model, e.detector) for e in entries]
    try:
        await store.save_many(entries, ttl_s=60.0)
        found = await store.load_many(pairs, not_before_s=now_s - 60.0)
        assert {pair: len(blobs) for pair, blobs in found.items()} == dict.fromkeys(
            pairs, 1
        )
    finally:
        for model, detector in pairs:
            await redis.delete(store.index_key(model, detector))
            await redis.delete(store.entry_key(model, detector, "w"))
        await redis.aclose()


async def test_a_worker_that_started_blind_catches_up_with_a_later_save(
    stack: StackInfo, models_dir: Path
) -> None:
    """A worker that found no baseline at start imports a ready one another
    worker saves later, at its next interval; an entry under its own worker
    id, or one not ready, is passed over."""
    settings = request_path_settings(
        stack, models_dir, worker={"baseline_save_interval_s": 0.2}
    )
    redis = redis_from_settings(settings)
    store = RedisBaselineStore(redis, settings.redis.key_prefix, timeout_s=2.0)
    identity = model_identity(load_model(models_dir, "digits"))

    def saved(worker: str, samples: int, ready: bool) -> SavedBaseline:
        blob = margin_blob(samples, ready)
        return SavedBaseline(
            format=BASELINE_FORMAT,
            model="digits",
            model_id=identity,
            detector="margin",
            worker=worker,
            saved_at_s=time.time(),
            samples=samples,
            ready=ready,
            baseline=blob,
        )

    async def rounds_pass(worker: Worker, n: int) -> None:
        assert worker._baselines is not None
        target = worker._baselines.catch_ups + n
        deadline = time.monotonic() + DEADLINE_S
        while worker._baselines.catch_ups < target:
            assert time.monotonic() < deadline, "no catch-up round ran"
            # Polling a counter the worker's own task moves, with a deadline.
            await asyncio.sleep(0.05)

    own_id = "worker-blind"
    try:
        async with running_worker(with_worker_id(settings, own_id)) as worker:
            assert margin_live(worker) == (0, False)
            await store.save_many(
                [saved(own_id, 700, True), saved("worker-small", 100, False)],
                ttl_s=600.0,
            )
            # Two full rounds after both were saved: neither was taken.
            await rounds_pass(worker, 2)
            assert margin_live(worker) == (0, False)
            assert loads(worker, "margin", "loaded") == 0

            await store.save_many([saved("worker-a", 600, True)], ttl_s=600.0)
            deadline = time.monotonic() + DEADLINE_S
            while not margin_live(worker)[1]:
                assert time.monotonic() < deadline, margin_live(worker)
                await asyncio.sleep(0.05)
            assert margin_live(worker) == (600, True)
            assert loads(worker, "margin", "loaded") == 1
            # Ready now: later rounds take in nothing more.
            await store.save_many([saved("worker-c", 900, True)], ttl_s=600.0)
            await rounds_pass(worker, 2)
            assert margin_live(worker) == (600, True)
            assert loads(worker, "margin", "loaded") == 1
    finally:
        await redis.aclose()
        await delete_prefix(settings)
