"""The poisoning guard's spectral class windows shared in Redis
(``gateway.feedback_windows``): the scripts against the real Redis (and a
Redis Cluster), then
guards through the real Kafka and Redis (a restart, two guards on two
partitions, foreign data at the keys, a batch that fails after its write).

The attack throughout is a BadNets patch (the bottom-right 2x2 pixels at 16)
on held-out zeros labelled 0: the model agrees with every label, so only the
spectral check can refuse them. Judged by one guard from a fresh start, the
first two carriers are accepted and every later one is refused (the cluster
of two accepted carriers already sets the class's top direction).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import msgspec
import numpy as np
import pytest
from aiokafka.partitioner import DefaultPartitioner
from redis.asyncio.cluster import RedisCluster

from detectors.poisoning import PoisoningGuard, Verdict, record_digest
from gateway.config import Settings
from gateway.errors import BrokerError, StoreError
from gateway.feedback import FeedbackGuard, build_guard
from gateway.feedback_windows import (
    ENTRY_FORMAT,
    SharedWindows,
    WindowEntry,
    WindowRecord,
    decode_entry,
    encode_entry,
    window_key,
)
from gateway.models import load_model
from gateway.store import RedisClient, redis_from_settings
from tests.conftest import StackInfo
from tests.integration.helpers import create_key, isolated_settings
from tests.integration.redis_cluster import RedisClusterInfo, redis_cluster
from tests.integration.test_feedback_guard import (
    Sender,
    _guard_settings,
    held,
    running,
    sender,
    verdicts,
)

pytestmark = pytest.mark.timeout(120)

# Fixtures of other modules, used here.
__all__ = ["held", "redis_cluster"]

PATCH = [54, 55, 62, 63]


def carriers(x: np.ndarray, y: np.ndarray, n: int) -> list[np.ndarray]:
    """``n`` held-out zeros carrying the patch."""
    rows = []
    for row in x[y == 0][:n]:
        patched = row.copy()
        patched[PATCH] = 16.0
        rows.append(patched)
    return rows


@pytest.fixture
def guard_settings(stack: StackInfo, models_dir: Path) -> Iterator[Settings]:
    # The distance check off: it refuses the patch's carriers from the first,
    # and these tests follow a cluster the spectral windows start to accept.
    params = {"distance_check": False}
    with _guard_settings(stack, models_dir, stack.redis_url, params) as settings:
        yield settings


async def _lrange(redis: RedisClient, key: str, start: int, end: int) -> list[bytes]:
    # decode_responses is off: entries come back as bytes.
    return cast(list[bytes], await redis.lrange(key, start, end))


async def window_digests(settings: Settings, label: int = 0) -> list[str]:
    redis = redis_from_settings(settings)
    try:
        key = window_key(settings.redis.key_prefix, "digits", label)
        raw = await _lrange(redis, key, 0, -1)
    finally:
        await redis.aclose()
    return [v[:12].decode() for v in raw]


# Small windows, and no distance check: it refuses this patch's carriers from
# the first, whatever the windows hold, and the windows are what is tested.
WINDOW_PARAMS = {
    "spectral_window": 16,
    "spectral_min_records": 8,
    "distance_check": False,
}


# -- the scripts, against the real Redis -------------------------------------------


@pytest.fixture
def windows_settings(stack: StackInfo, models_dir: Path) -> Settings:
    return isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        feedback={"params": WINDOW_PARAMS},
    )


@pytest.fixture
def digits_guard(windows_settings: Settings, models_dir: Path) -> PoisoningGuard:
    from gateway.feedback import guard_params
    from gateway.models import ensure_digits_model

    ensure_digits_model(models_dir)
    model = load_model(models_dir, "digits")
    return build_guard(
        windows_settings, "digits", model, guard_params(windows_settings)
    )


def _record(x: np.ndarray, i: int, label: int = 0, who: str = "alice") -> WindowRecord:
    return WindowRecord("digits", label, f"r-{i}", who, x[i].astype(np.float32), 0, i)


def _accepted(learned: bool = True) -> Verdict:
    return Verdict(True, None, None, "accepted", {}, False, learned)


def _rejected() -> Verdict:
    return Verdict(False, "POISON_SPECTRAL", "spectral", "", {}, False)


async def test_windows_are_bounded_deduplicated_and_expire(
    windows_settings: Settings,
    digits_guard: PoisoningGuard,
    held: tuple[np.ndarray, np.ndarray],
) -> None:
    x, _ = held
    redis = redis_from_settings(windows_settings)
    try:
        shared = SharedWindows(
            redis, windows_settings, {"digits": digits_guard}, {"digits": range(10)}
        )
        batch = [_record(x, i) for i in range(20)]
        await shared.load(batch)
        # Twenty accepted of one class: the first four would be evicted by the
        # last sixteen, so only those are written.
        assert await shared.save([(r, _accepted()) for r in batch]) == 16
        # The same batch again (a redelivery): nothing is added twice, and a
        # repeat (not learned) or a record without a verdict adds nothing.
        assert await shared.save([(r, _accepted()) for r in batch]) == 0
        extra = _record(x, 30)
        assert await shared.save([(extra, _accepted(learned=False))]) == 0
        assert await shared.save([(extra, None)]) == 0

        key = window_key(windows_settings.redis.key_prefix, "digits", 0)
        # Under the deployment's prefix, like the other guard keys.
        assert key.startswith(f"{windows_settings.redis.key_prefix}:fbguard:digits:")
        entries = await _lrange(redis, key, 0, -1)
        ttl_ms = await redis.pttl(key)
        # Bounded: the last spectral_window (16) of the 20, oldest first.
        digests = [e[:12].decode() for e in entries]
        assert digests == [r.digest for r in batch[-16:]]
        assert 0 < ttl_ms <= windows_settings.feedback.state_ttl_s * 1000

        # A fresh guard (a restart) judges with them.
        other = build_guard(
            windows_settings,
            "digits",
            load_model(windows_settings.models.directory, "digits"),
            digits_guard.params,
        )
        fresh = SharedWindows(
            redis, windows_settings, {"digits": other}, {"digits": range(10)}
        )
        await fresh.load([_record(x, 40)])
        assert other.window_size(0) == 16

        # A record rejected now leaves the window; its batch's own entries are
        # left out of the window it is judged against.
        await fresh.load([batch[-1]])
        assert other.window_size(0) == 15
        await fresh.save([(batch[-1], _rejected())])
        assert batch[-1].digest not in await window_digests(windows_settings)
        assert len(await window_digests(windows_settings)) == 15
    finally:
        await redis.aclose()


async def test_foreign_data_in_a_window_is_refused_and_rebuilt(
    windows_settings: Settings,
    digits_guard: PoisoningGuard,
    held: tuple[np.ndarray, np.ndarray],
    caplog: pytest.LogCaptureFixture,
) -> None:
    x, _ = held
    prefix = windows_settings.redis.key_prefix
    good = [_record(x, i, label=1) for i in range(3)]
    wrong_dimension = b"0" * 12 + msgspec.msgpack.encode(
        WindowEntry(
            format=ENTRY_FORMAT,
            id="w",
            submitter="m",
            row=b"\0" * 8 * 63,
            partition=0,
            offset=0,
        )
    )
    # A sound entry of class 1 copied under class 1's key with its digest
    # edited: the digest no longer names its record.
    edited = b"ffffffffffff" + encode_entry(good[0])[12:]
    redis = redis_from_settings(windows_settings)
    try:
        await redis.hset(window_key(prefix, "digits", 0), mapping={"a": "b"})
        await redis.rpush(
            window_key(prefix, "digits", 1),
            encode_entry(good[0]),
            b"\xff\x00garbage",
            wrong_dimension,
            edited,
            b"0" * 12 + b"x" * 100_000,
            encode_entry(good[1]),
        )
        shared = SharedWindows(
            redis, windows_settings, {"digits": digits_guard}, {"digits": range(10)}
        )
        batch = [_record(x, 10, label=0), good[2]]
        with caplog.at_level(logging.WARNING, logger="gateway.feedback_windows"):
            await shared.load(batch)
        assert digits_guard.window_size(0) == 0
        assert digits_guard.window_size(1) == 2  # the two sound entries
        messages = [r.getMessage() for r in caplog.records]
        assert any("another type" in m for m in messages), messages
        assert any("entries refused (4)" in m for m in messages), messages

        await shared.save([(r, _accepted()) for r in batch])
        assert await redis.type(window_key(prefix, "digits", 0)) == b"list"
        assert await window_digests(windows_settings, 0) == [batch[0].digest]
        rebuilt = await _lrange(redis, window_key(prefix, "digits", 1), 0, -1)
        for raw in rebuilt:
            decode_entry(raw, 1, 64)  # every entry is sound now
        assert [r[:12].decode() for r in rebuilt] == [g.digest for g in good]
    finally:
        await redis.aclose()


async def test_resent_carriers_neither_hide_from_nor_clear_the_window_for_new_ones(
    windows_settings: Settings,
    digits_guard: PoisoningGuard,
    held: tuple[np.ndarray, np.ndarray],
) -> None:
    # A batch's own records are left out of the window it is judged against,
    # so that a batch judged again is judged as the first time. Matched by
    # digest alone, a submitter could put copies of its accepted carriers
    # (replays: same id, label and row, at new offsets) after a new carrier
    # in one batch: the new carrier was judged without the cluster, as the
    # first carrier is, and passed; every new carrier did, one per batch.
    x, y = held
    rows = carriers(x, y, 6)
    model = load_model(windows_settings.models.directory, "digits")
    p = model.predict_proba(np.asarray(rows, dtype=np.float32))
    redis = redis_from_settings(windows_settings)
    offsets = iter(range(1000))

    def carrier(i: int) -> WindowRecord:
        return WindowRecord("digits", 0, f"c-{i}", "mallory", rows[i], 0, next(offsets))

    def replay(record: WindowRecord) -> WindowRecord:
        return dataclasses.replace(record, offset=next(offsets))

    async def batch(records: list[tuple[WindowRecord, int]]) -> list[Verdict]:
        await shared.load([r for r, _ in records])
        found = [
            digits_guard.screen(r.submitter, r.row, 0, p[i], r.record_id)
            for r, i in records
        ]
        await shared.save([(r, v) for (r, _), v in zip(records, found, strict=True)])
        return found

    try:
        shared = SharedWindows(
            redis, windows_settings, {"digits": digits_guard}, {"digits": range(10)}
        )
        first = [carrier(0), carrier(1)]
        accepted = [(await batch([(r, i)]))[0] for i, r in enumerate(first)]
        assert [v.accepted for v in accepted] == [True, True]
        # Without copies, the third carrier meets the cluster and is refused
        # (test_a_restarted_guard_keeps_judging_a_cluster_it_had_started_to_see).
        # Hiding: a new carrier first, copies of the accepted ones after it.
        third = carrier(2)
        verdicts_ = await batch(
            [(third, 2), *((replay(r), i) for i, r in enumerate(first))]
        )
        assert not verdicts_[0].accepted, verdicts_[0].evidence
        assert verdicts_[0].code == "POISON_SPECTRAL"
        # Clearing: copies alone, refused now that the cluster is seen, must
        # not remove the accepted carriers from the window.
        await batch([(replay(r), i) for i, r in enumerate(first)])
        assert await window_digests(windows_settings) == [r.digest for r in first]
        fourth = (await batch([(carrier(3), 3)]))[0]
        assert not fourth.accepted, fourth.evidence
    finally:
        await redis.aclose()


# -- guards through Kafka and Redis ------------------------------------------------


async def test_a_restarted_guard_keeps_judging_a_cluster_it_had_started_to_see(
    guard_settings: Settings, held: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = held
    rows = carriers(x, y, 8)
    async with sender(guard_settings) as s:
        async with running(guard_settings):
            first = [await s.row(r, 0) for r in rows[:4]]
            found = await verdicts(guard_settings, set(first))
        topics = [found[i][0]["_topic"] for i in first]
        # From a fresh start: two carriers pass, then the cluster stands out.
        assert topics == ["accepted", "accepted", "rejected", "rejected"], topics

        # A new guard process: before the windows were shared it started from
        # the calibration rows alone, and took the next two carriers too.
        async with running(guard_settings):
            second = [await s.row(r, 0) for r in rows[4:]]
            found = await verdicts(guard_settings, set(second))
    for feedback_id in second:
        verdict = found[feedback_id][0]
        assert verdict["_topic"] == "rejected", verdict
        assert verdict["code"] == "POISON_SPECTRAL", verdict
    # The window holds the two accepted carriers, once each.
    assert await window_digests(guard_settings) == [
        record_digest(i, 0, r) for i, r in zip(first[:2], rows, strict=False)
    ]


def _client_on(partition: int, partitions: int = 2) -> str:
    ids = list(range(partitions))
    for n in range(1000):
        client = f"fb-{n}"
        if DefaultPartitioner()(client.encode(), ids, ids) == partition:
            return client
    raise AssertionError("no client id found")


async def test_two_guards_on_two_partitions_share_the_window(
    guard_settings: Settings, held: tuple[np.ndarray, np.ndarray]
) -> None:
    topics = guard_settings.kafka.topics.model_copy(update={"other_partitions": 2})
    settings = guard_settings.model_copy(
        update={"kafka": guard_settings.kafka.model_copy(update={"topics": topics})}
    )
    x, y = held
    rows = carriers(x, y, 6)
    left, right = _client_on(0), _client_on(1)
    async with sender(settings) as s:
        senders = {}
        for client in (left, right):
            key_id, secret = await create_key(settings, client)
            senders[client] = Sender(settings, key_id, secret)
            senders[client].producer = s.producer
        async with running(settings) as one, running(settings) as two:
            # Each guard owns one partition (one submitter's records).
            deadline = asyncio.get_running_loop().time() + 60
            while not (
                len(one._consumer.assignment()) == 1  # type: ignore[union-attr]
                and len(two._consumer.assignment()) == 1  # type: ignore[union-attr]
            ):
                assert asyncio.get_running_loop().time() < deadline, "no split"
                await asyncio.sleep(0.2)
            sent_left = [await senders[left].row(r, 0, key=left) for r in rows[:2]]
            found = await verdicts(settings, set(sent_left))
            assert {found[i][0]["_topic"] for i in sent_left} == {"accepted"}
            sent_right = [await senders[right].row(r, 0, key=right) for r in rows[2:]]
            found = await verdicts(settings, set(sent_right))
    # The other guard judged the second submitter's carriers with the first
    # one's accepted carriers in the window, which its evidence names.
    for feedback_id in sent_right:
        verdict = found[feedback_id][0]
        assert verdict["code"] == "POISON_SPECTRAL", verdict
        assert "from 1 submitter(s)" in verdict["evidence"], verdict
        assert sent_left[0] in verdict["evidence"], verdict


async def test_foreign_data_at_a_window_key_does_not_stall_the_guard(
    guard_settings: Settings, held: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = held
    picked = [0, int(np.flatnonzero(y != y[0])[0])]  # two classes
    labels = [int(y[i]) for i in picked]
    prefix = guard_settings.redis.key_prefix
    redis = redis_from_settings(guard_settings)
    try:
        await redis.set(window_key(prefix, "digits", labels[0]), b"\x00" * 64)
        await redis.rpush(window_key(prefix, "digits", labels[1]), b"not an entry")
        async with sender(guard_settings) as s, running(guard_settings):
            ids = [await s.row(x[i], int(y[i])) for i in picked]
            found = await verdicts(guard_settings, set(ids), timeout_s=30.0)
        assert {found[i][0]["_topic"] for i in ids} == {"accepted"}, found
        # Each window rebuilt, holding the one record accepted since.
        for label in labels:
            key = window_key(prefix, "digits", label)
            assert await redis.type(key) == b"list"
            (raw,) = await _lrange(redis, key, 0, -1)
            decode_entry(raw, label, 64)
    finally:
        await redis.aclose()


@pytest.mark.parametrize("where", ["produce", "window reply"])
async def test_a_batch_failing_after_its_window_write_is_judged_as_the_first_time(
    guard_settings: Settings, held: tuple[np.ndarray, np.ndarray], where: str
) -> None:
    # The windows are written before verdicts are produced. "produce": the
    # broker then fails. "window reply": Redis applied the write but its
    # answer is lost (a timeout), as a StoreError. Either way the batch is
    # rewound and judged again, with its rows already in the window.
    x, y = held
    rows = carriers(x, y, 4)
    guard = FeedbackGuard(guard_settings)
    failures: list[int] = []

    def learned(judged: Sequence[tuple[WindowRecord, Verdict | None]]) -> bool:
        return any(v is not None and v.learned for _, v in judged)

    async with sender(guard_settings) as s:
        ids = [await s.row(r, 0) for r in rows]
        await guard.start()
        if where == "produce":
            produce = guard._produce

            async def failing_produce(items: list[Any]) -> None:
                if not failures and any(i.verdict and i.verdict.learned for i in items):
                    failures.append(len(items))
                    raise BrokerError("produce failed (injected)")
                await produce(items)

            guard._produce = failing_produce  # type: ignore[method-assign]
        else:
            windows = guard._windows
            assert windows is not None
            save = windows.save

            async def reply_lost(
                judged: Sequence[tuple[WindowRecord, Verdict | None]],
            ) -> int:
                added = await save(judged)
                if not failures and learned(judged):
                    failures.append(added)
                    raise StoreError("redis feedback.save_windows: no answer")
                return added

            windows.save = reply_lost  # type: ignore[method-assign]
        stop = asyncio.Event()
        task = asyncio.create_task(guard.run(stop))
        try:
            found = await verdicts(guard_settings, set(ids))
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await guard.stop()
    assert failures, "no batch failed"
    # The retry judged the carriers without their own first-attempt rows: the
    # same verdicts as a run without the failure, each produced once.
    assert [[v["_topic"] for v in found[i]] for i in ids] == [
        ["accepted"],
        ["accepted"],
        ["rejected"],
        ["rejected"],
    ], found
    # Each accepted carrier once; the rejected ones never entered.
    assert await window_digests(guard_settings) == [
        record_digest(i, 0, r) for i, r in zip(ids[:2], rows, strict=False)
    ]


async def test_windows_on_a_redis_cluster(
    stack: StackInfo,
    redis_cluster: RedisClusterInfo,
    models_dir: Path,
    digits_guard: PoisoningGuard,
    held: tuple[np.ndarray, np.ndarray],
) -> None:
    # One model's windows share a hash tag: each read and write is one
    # single-slot script, which a cluster runs on the primary owning the slot.
    x, y = held
    settings = isolated_settings(
        stack.kafka_bootstrap,
        redis_cluster.url,
        models_dir,
        redis={"cluster": True},
        feedback={"params": WINDOW_PARAMS},
    )
    redis = redis_from_settings(settings)
    assert isinstance(redis, RedisCluster)
    try:
        shared = SharedWindows(
            redis, settings, {"digits": digits_guard}, {"digits": range(10)}
        )
        keys = [shared.key("digits", label) for label in range(10)]
        assert len({redis.keyslot(k) for k in keys}) == 1
        batch = [_record(x, i, label=int(y[i])) for i in range(40)]
        await shared.load(batch)
        assert await shared.save([(r, _accepted()) for r in batch]) == 40
        assert await shared.save([(r, _accepted()) for r in batch]) == 0
        await shared.load([_record(x, 99, label=int(y[0]))])
        expected = sum(1 for r in batch if r.label == int(y[0]))
        assert digits_guard.window_size(int(y[0])) == expected
    finally:
        await redis.aclose()


# -- reads reuse what they decoded before ------------------------------------------


async def test_reads_decode_only_new_entries_and_see_every_change(
    windows_settings: Settings,
    digits_guard: PoisoningGuard,
    held: tuple[np.ndarray, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SharedWindows keeps what it decoded per window. After each change to
    # the lists (this guard's writes, another guard's, an eviction, an expiry,
    # foreign entries and their rebuild, a sound entry moved to another
    # class's key) its guard must hold exactly the windows a fresh reader
    # (a restart, nothing decoded before) builds from the same lists, and it
    # must have decoded only the entries it had not seen.
    from gateway import feedback_windows

    x, _ = held
    prefix = windows_settings.redis.key_prefix
    decoded: list[int] = []
    real_decode = feedback_windows.decode_entry

    def counting(raw: bytes, label: int, n_features: int) -> Any:
        decoded.append(label)
        return real_decode(raw, label, n_features)

    monkeypatch.setattr(feedback_windows, "decode_entry", counting)

    def fresh_guard() -> PoisoningGuard:
        return build_guard(
            windows_settings,
            "digits",
            load_model(windows_settings.models.directory, "digits"),
            digits_guard.params,
        )

    offsets = iter(range(1000, 2000))

    def probes(*labels: int) -> list[WindowRecord]:
        # Records of no window (new deliveries): a load reads these classes.
        return [
            dataclasses.replace(_record(x, 400, label=label), offset=next(offsets))
            for label in labels
        ]

    redis = redis_from_settings(windows_settings)
    other_guard = fresh_guard()
    try:
        mine = SharedWindows(
            redis, windows_settings, {"digits": digits_guard}, {"digits": range(10)}
        )
        other = SharedWindows(
            redis, windows_settings, {"digits": other_guard}, {"digits": range(10)}
        )

        async def same_as_a_fresh_read(*labels: int) -> int:
            """Load ``labels`` with ``mine``; check them against a fresh
            reader; return how many entries ``mine`` decoded."""
            decoded.clear()
            await mine.load(probes(*labels))
            count = len(decoded)
            guard = fresh_guard()
            fresh = SharedWindows(
                redis, windows_settings, {"digits": guard}, {"digits": range(10)}
            )
            await fresh.load(probes(*labels))
            for label in labels:
                rows, ids, submitters = digits_guard.window(label)
                want_rows, want_ids, want_submitters = guard.window(label)
                assert ids == want_ids, label
                assert submitters == want_submitters, label
                np.testing.assert_allclose(rows, want_rows)
            return count

        # This guard's own write; then a read of unchanged lists decodes none.
        first = [_record(x, i, label=i % 2) for i in range(12)]
        await mine.load(first)
        await mine.save([(r, _accepted()) for r in first])
        assert await same_as_a_fresh_read(0, 1) == 12
        assert await same_as_a_fresh_read(0, 1) == 0
        assert digits_guard.window_size(0) == 6

        # Another guard adds four and rejects one of the first: only the four
        # are decoded, and the rejected one is gone.
        theirs = [_record(x, 100 + i, label=0, who="bob") for i in range(4)]
        await other.load([*theirs, first[0]])
        await other.save([*((r, _accepted()) for r in theirs), (first[0], _rejected())])
        assert await same_as_a_fresh_read(0, 1) == 4
        assert digits_guard.window(0)[1] == [r.record_id for r in first[2::2]] + [
            r.record_id for r in theirs
        ]

        # A full window: the oldest are evicted by the other guard's write.
        many = [_record(x, 300 + i, label=0, who="bob") for i in range(14)]
        await other.load(many)
        await other.save([(r, _accepted()) for r in many])
        assert await same_as_a_fresh_read(0) == 14
        assert digits_guard.window(0)[1] == [r.record_id for r in (theirs + many)[-16:]]

        # An expiry: the list is gone, and so is the window.
        await redis.delete(window_key(prefix, "digits", 0))
        assert await same_as_a_fresh_read(0, 1) == 0
        assert digits_guard.window_size(0) == 0
        assert digits_guard.window_size(1) == 6

        # Foreign entries: refused on every read (never kept as decoded),
        # then rebuilt away by this guard's next write.
        await redis.rpush(window_key(prefix, "digits", 1), b"\xff\x00garbage")
        assert await same_as_a_fresh_read(1) == 1
        assert digits_guard.window_size(1) == 6
        assert await same_as_a_fresh_read(1) == 1
        await mine.save([])
        assert await same_as_a_fresh_read(1) == 0
        assert len(await window_digests(windows_settings, 1)) == 6

        # A sound class-1 entry, byte for byte, under class 2's key: decoded
        # before as class 1, it is checked again as class 2's, and refused.
        moved = (await _lrange(redis, window_key(prefix, "digits", 1), 0, 0))[0]
        await redis.rpush(window_key(prefix, "digits", 2), moved)
        assert await same_as_a_fresh_read(1, 2) == 1
        assert digits_guard.window_size(2) == 0
    finally:
        await redis.aclose()
