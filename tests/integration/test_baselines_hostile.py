"""Hostile and crowded live-baseline indexes on the real Redis
(gateway/baselines.py): whatever the index holds, a load never raises
anything but ``StoreError``, reads a bounded number of entries, and is not
steered by members dated in the future."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gateway.baselines
from detectors.baselines import (
    BASELINE_FORMAT,
    BaselineBlob,
    BaselineRefused,
    SavedBaseline,
    decode_baseline,
    decode_saved,
    encode_baseline,
)
from gateway.baselines import (
    MAX_LOAD_CANDIDATES,
    BaselineKeeper,
    RedisBaselineStore,
    model_identity,
)
from gateway.models import digits_split, load_model
from gateway.store import redis_from_settings
from gateway.worker import Worker
from tests.conftest import StackInfo
from tests.integration.helpers import (
    RawKafka,
    create_key,
    delete_prefix,
    fail_open_settings,
    request_path_settings,
    responses_for,
    running_worker,
)
from tests.integration.test_adversarial import OwnRedis, _free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PAIR = ("digits", "margin")
X_ROWS = digits_split()[0][:16]


def entry(worker: str, at_s: float, **kw: Any) -> SavedBaseline:
    fields: dict[str, Any] = {
        "format": BASELINE_FORMAT,
        "model": "digits",
        "model_id": "id-1",
        "detector": "margin",
        "worker": worker,
        "saved_at_s": at_s,
        "samples": 600,
        "ready": True,
        "baseline": worker.encode(),
        **kw,
    }
    return SavedBaseline(**fields)


async def test_an_index_member_that_is_not_utf8_does_not_break_the_load(
    stack: StackInfo, models_dir: Path
) -> None:
    """Index members are written by workers as UTF-8, but anyone with write
    access to the prefix may add raw bytes: the load used to decode them and
    raise ``UnicodeDecodeError``, which ``BaselineKeeper.load`` does not
    catch, so the worker failed to start."""
    settings = request_path_settings(stack, models_dir)
    redis = redis_from_settings(settings)
    store = RedisBaselineStore(redis, settings.redis.key_prefix, timeout_s=2.0)
    now_s = time.time()
    try:
        await store.save_many([entry("honest", now_s - 5)], ttl_s=600.0)
        index = store.index_key(*PAIR)
        await redis.zadd(index, {b"\xff\xfe mallory": int(now_s * 1000)})
        await redis.set(store.entry_key(*PAIR, b"\xff\xfe mallory"), b"junk")
        found = await store.load_many([PAIR], not_before_s=now_s - 600.0)
        assert sorted(found[PAIR]) == sorted(
            [b"junk", (await redis.get(store.entry_key(*PAIR, "honest"))) or b""]
        )
    finally:
        await redis.aclose()
        await delete_prefix(settings)


async def test_the_load_reads_a_bounded_number_of_the_newest_entries(
    stack: StackInfo, models_dir: Path
) -> None:
    """Every restart leaves an entry (worker ids name the pid), and a writer
    may add members dated years ahead: the load reads the newest
    ``MAX_LOAD_CANDIDATES`` dated up to the tolerated skew, not all of them,
    and future members do not crowd the honest ones out."""
    settings = request_path_settings(stack, models_dir)
    redis = redis_from_settings(settings)
    store = RedisBaselineStore(redis, settings.redis.key_prefix, timeout_s=5.0)
    now_s = time.time()
    try:
        await store.save_many(
            [entry(f"w{i}", now_s - 200 + i) for i in range(100)], ttl_s=600.0
        )
        await store.save_many(
            [entry(f"future{i}", now_s + 86_400 * (i + 1)) for i in range(40)],
            ttl_s=600.0,
        )
        started = time.perf_counter()
        found = await store.load_many([PAIR], not_before_s=now_s - 600.0)
        seconds = time.perf_counter() - started
        workers = sorted(decode_saved(blob).worker for blob in found[PAIR])
        assert workers == sorted(f"w{i}" for i in range(100 - MAX_LOAD_CANDIDATES, 100))
        assert await redis.zcard(store.index_key(*PAIR)) == 140
        print(
            f"\nload of {MAX_LOAD_CANDIDATES} of 140 indexed: {seconds * 1000:.1f} ms"
        )
    finally:
        await redis.aclose()
        await delete_prefix(settings)


async def test_a_key_of_another_type_costs_only_itself(
    stack: StackInfo, models_dir: Path
) -> None:
    """One index or entry key overwritten with another Redis type used to
    fail the whole pipeline (WRONGTYPE), so every model's and detector's
    load came back ``unavailable``; now only that key is left out."""
    settings = request_path_settings(stack, models_dir)
    redis = redis_from_settings(settings)
    store = RedisBaselineStore(redis, settings.redis.key_prefix, timeout_s=2.0)
    now_s = time.time()
    other = ("digits", "traffic")
    try:
        await store.save_many(
            [entry("honest", now_s - 5), entry("hijacked", now_s - 1)], ttl_s=600.0
        )
        hijacked = store.entry_key(*PAIR, "hijacked")
        await redis.delete(hijacked)
        await redis.hset(hijacked, "field", "value")
        await redis.set(store.index_key(*other), b"not a sorted set")
        found = await store.load_many([PAIR, other], not_before_s=now_s - 600.0)
        assert [decode_saved(b).worker for b in found[PAIR]] == ["honest"]
        assert found[other] == []
    finally:
        await redis.aclose()
        await delete_prefix(settings)


async def test_a_start_cancelled_during_the_baseline_load_cleans_up(
    stack: StackInfo, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while it loads the baselines (a supervisor's timeout, a
    test's ``wait_for``), ``start`` raised before ``async with`` could call
    ``stop``: the live-configuration tasks kept running and the Redis pool
    and /metrics port stayed open. The load is made to block (the one
    stand-in here) so the cancel lands inside it every time."""
    settings = request_path_settings(stack, models_dir)
    entered = asyncio.Event()

    async def blocked_load(self: BaselineKeeper) -> int:
        entered.set()
        await asyncio.Event().wait()
        return 0

    monkeypatch.setattr(BaselineKeeper, "load", blocked_load)
    worker = Worker(settings)
    starting = asyncio.create_task(worker.start())
    try:
        await asyncio.wait_for(entered.wait(), 60)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        left = [
            t.get_name()
            for t in asyncio.all_tasks()
            if t.get_name() in {"config-follow", "config-heartbeat"} and not t.done()
        ]
        assert left == []
        assert worker._redis is None and worker._live is None
    finally:
        await worker.stop()
        await delete_prefix(settings)


def margin_blob(samples: int, ready: bool) -> bytes:
    rng = np.random.default_rng(samples)
    return encode_baseline(
        BaselineBlob(
            format=BASELINE_FORMAT,
            detector="margin",
            n_features=64,
            samples=samples,
            ready=ready,
            fields={
                "margin": rng.uniform(0.5, 1.0, samples).tobytes(),
                "entropy": rng.uniform(0.0, 0.5, samples).tobytes(),
            },
        )
    )


async def test_an_envelope_that_overstates_its_baseline_is_refused(
    stack: StackInfo, models_dir: Path
) -> None:
    """The loader ranks entries by the envelope's ``samples`` and ``ready``
    without decoding the blob; an envelope claiming 4000 ready answers
    around a 5-answer blob won the choice and left the worker blind while a
    real 600-answer baseline was there. The envelope must agree with the
    blob it carries."""
    settings = request_path_settings(
        stack, models_dir, worker={"baseline_save_interval_s": 0}
    )
    redis = redis_from_settings(settings)
    store = RedisBaselineStore(redis, settings.redis.key_prefix, timeout_s=2.0)
    identity = model_identity(load_model(models_dir, "digits"))
    now_s = time.time()
    honest = entry(
        "honest", now_s - 60, model_id=identity, samples=600, ready=True,
        baseline=margin_blob(600, True),
    )  # fmt: skip
    liar = entry(
        "liar", now_s - 30, model_id=identity, samples=4000, ready=True,
        baseline=margin_blob(5, False),
    )  # fmt: skip
    try:
        await store.save_many([honest, liar], ttl_s=600.0)
        async with running_worker(settings) as worker:
            assert worker._scorer is not None
            blob = worker._scorer.detectors_of("digits")["margin"].export_baseline()
            header = decode_baseline(blob or b"")
            assert (header.samples, header.ready) == (600, True)
            refused = worker.metrics.registry.get_sample_value(
                "modelgate_baseline_loads_total",
                {"model": "digits", "detector": "margin", "outcome": "refused"},
            )
            assert refused == 1
    finally:
        await redis.aclose()
        await delete_prefix(settings)


async def test_a_save_against_a_hung_redis_is_bounded_and_never_holds_the_lock(
    stack: StackInfo, models_dir: Path, tmp_path: Path
) -> None:
    """Redis stops answering (SIGSTOP: connections accepted, no replies)
    just before the stop-time save: the save gives up after one
    ``socket_timeout_s``, counts ``unavailable``, and the batch lock is free
    all the while (the export runs under it, the Redis call does not)."""
    own = OwnRedis(tmp_path, _free_port(16493))
    own.start()
    try:
        settings = fail_open_settings(
            stack,
            own.url,
            models_dir,
            redis={"socket_timeout_s": 0.5},
            worker={"baseline_save_interval_s": 0},
        )
        key = await create_key(settings, "ann")
        async with running_worker(settings) as worker:
            async with RawKafka(settings) as kafka:
                rid = await kafka.send_request(*key, X_ROWS, client_id="ann")
                await kafka.flush()
                answers = await responses_for(settings, [rid], timeout_s=60.0)
            assert answers[rid]["status"] == "ok", answers[rid]
            keeper = worker._baselines
            assert keeper is not None
            # The batch that answered ann may still be committing under the
            # lock: wait it out, so the only candidate holder is the save.
            deadline = time.monotonic() + 30.0
            while worker._batch_lock.locked():
                assert time.monotonic() < deadline, "the batch never finished"
                await asyncio.sleep(0.01)  # polling with a deadline
            own.signal(signal.SIGSTOP)
            started = time.perf_counter()
            save = asyncio.create_task(keeper.save())
            lock_seen = False
            while not save.done():
                lock_seen = lock_seen or worker._batch_lock.locked()
                await asyncio.sleep(0.01)  # sampling the lock while the save runs
            seconds = time.perf_counter() - started
            assert await save == 0
            assert not lock_seen
            assert seconds < 1.5, seconds
            unavailable = worker.metrics.registry.get_sample_value(
                "modelgate_baseline_saves_total",
                {"model": "digits", "detector": "margin", "outcome": "unavailable"},
            )
            assert unavailable == 1
            print(f"\nbaseline save against a hung Redis: {seconds * 1000:.0f} ms")
            own.signal(signal.SIGCONT)
    finally:
        own.kill()


async def test_a_failing_stop_time_save_does_not_cut_the_worker_stop_short(
    stack: StackInfo, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save that raises (here a stand-in: decoding its own export fails,
    as a 300,000-answer margin ring did under the old size bound) must not
    escape ``Worker.stop``, which then skipped the clients' hand-over and
    leaving the group."""
    settings = request_path_settings(
        stack, models_dir, worker={"baseline_save_interval_s": 0}
    )
    key = await create_key(settings, "ann")

    def refuse(data: bytes) -> Any:
        raise BaselineRefused("malformed", "stand-in for an export bug")

    try:
        async with running_worker(settings) as worker:
            async with RawKafka(settings) as kafka:
                rid = await kafka.send_request(*key, X_ROWS, client_id="ann")
                await kafka.flush()
                answers = await responses_for(settings, [rid], timeout_s=60.0)
            assert answers[rid]["status"] == "ok", answers[rid]
            assert worker._clients is not None
            assert worker._clients.held() == ["ann"]
            monkeypatch.setattr(gateway.baselines, "decode_baseline", refuse)
        # The stop ran to the end: ann's state was handed over to Redis.
        redis = redis_from_settings(settings)
        try:
            state = await redis.get(f"{settings.redis.key_prefix}:{{c:ann}}:state")
        finally:
            await redis.aclose()
        assert state is not None
    finally:
        await delete_prefix(settings)
