"""Integration tests for gateway.keys and gateway.store against the real Redis
the harness starts (the ``stack`` fixture).

Every key this module writes lives under a prefix unique to the test session,
and is deleted at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from cryptography.fernet import Fernet
from redis.asyncio import Connection, ConnectionPool, Redis

from gateway import store
from gateway.config import Settings, load_settings
from gateway.errors import StoreError
from gateway.keys import KeyStore, authenticate
from gateway.protocol import sign
from gateway.store import AdmitItem, CounterStore, redis_from_settings
from tests.conftest import StackInfo
from tests.integration.helpers import delete_matching

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PREFIX = f"mgt{os.getpid()}{secrets.token_hex(3)}"
SERVER_KEY = Fernet.generate_key()
CACHE_TTL_S = 0.3


def make_settings(redis_url: str, **overrides: Any) -> Settings:
    redis_cfg = {"url": redis_url, "key_prefix": PREFIX, "socket_timeout_s": 2.0}
    redis_cfg.update(overrides.pop("redis", {}))
    auth_cfg = {"server_key": SERVER_KEY.decode(), "key_cache_ttl_s": CACHE_TTL_S}
    auth_cfg.update(overrides.pop("auth", {}))
    return load_settings(redis=redis_cfg, auth=auth_cfg, **overrides)


class CountingConnection(Connection):
    """Counts writes to the socket: one per round trip (a pipeline is one)."""

    sends = 0

    async def send_packed_command(
        self, command: Any, check_health: bool = True
    ) -> None:
        type(self).sends += 1
        await super().send_packed_command(command, check_health)


@pytest.fixture
def settings(stack: StackInfo) -> Settings:
    return make_settings(stack.redis_url)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = redis_from_settings(settings)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session", autouse=True)
async def _cleanup(stack: StackInfo) -> AsyncIterator[None]:
    yield
    await delete_matching(stack.redis_url, f"{PREFIX}:*")


def unique(name: str) -> str:
    return f"{name}-{secrets.token_hex(4)}"


def item(
    client: str, request: str, delivery: str, rate: float = 10, burst: int = 5
) -> AdmitItem:
    return AdmitItem(client, request, delivery, rate_per_s=rate, burst=burst)


# API keys ------------------------------------------------------------------------


async def test_create_get_authenticate(redis: Redis, settings: Settings) -> None:
    store = KeyStore(redis, settings)
    client = unique("alice")
    created, token = await store.create(client, models=["digits"], ttl_s=3600)
    key_id, secret = KeyStore.parse_token(token)
    assert key_id == created.key_id
    assert secret == created.secret

    # A separate store (another worker) sees the same key.
    other = KeyStore(redis, settings)
    found = await other.get_many([key_id, "mgk_ffffffffffff", "not-an-id"])
    assert list(found) == [key_id]
    key = found[key_id]
    assert key == created
    assert key.expires_ms is not None
    assert key.expires_ms - key.created_ms == 3_600_000

    value = b'{"model":"digits"}'
    ok = authenticate(
        key, value, sign(secret, value), key.created_ms, "digits", key.created_ms, 1000
    )
    assert ok.client_id == client

    listing = await store.list()
    mine = [row for row in listing if row["key_id"] == key_id]
    assert mine == [
        {
            "key_id": key_id,
            "client_id": client,
            "models": ["digits"],
            "status": "active",
            "created_ms": key.created_ms,
            "expires_ms": key.expires_ms,
            "plan": "default",
            "limit_overrides": {},
        }
    ]
    assert all("secret" not in str(row) for row in listing)


async def test_secret_is_not_stored_in_plaintext(
    redis: Redis, settings: Settings
) -> None:
    store = KeyStore(redis, settings)
    created, token = await store.create(unique("bob"))
    encoded = token.split(".", 1)[1].encode()
    async for name in redis.scan_iter(match=f"{PREFIX}:*"):
        kind = await redis.type(name)
        if kind == b"hash":
            values = list((await redis.hgetall(name)).values())
        elif kind == b"string":
            values = [await redis.get(name) or b""]
        elif kind == b"set":
            values = list(await redis.smembers(name))
        else:
            continue
        for raw in values:
            assert created.secret not in raw, name
            assert encoded not in raw, name
    record = await redis.hgetall(store.record_key(created.key_id))
    assert set(record) == {
        b"client_id",
        b"secret_enc",
        b"models",
        b"status",
        b"created_ms",
        b"expires_ms",
        b"plan",
        b"limit_overrides",
    }


async def test_revocation_is_seen_after_the_cache_ttl(
    redis: Redis, settings: Settings
) -> None:
    admin = KeyStore(redis, settings)
    worker = KeyStore(redis, settings)
    created, _ = await admin.create(unique("carol"))
    assert (await worker.get_many([created.key_id]))[created.key_id].status == "active"

    assert await admin.revoke(created.key_id)
    assert not await admin.revoke("mgk_ffffffffffff")
    assert (await admin.get(created.key_id)) is not None
    assert (await admin.get(created.key_id)).status == "revoked"  # type: ignore[union-attr]
    # The worker's cached copy is still "active" until its TTL runs out...
    assert (await worker.get(created.key_id)).status == "active"  # type: ignore[union-attr]
    await asyncio.sleep(CACHE_TTL_S + 0.05)
    # ...and then revoked.
    assert (await worker.get(created.key_id)).status == "revoked"  # type: ignore[union-attr]


async def test_key_id_collision_draws_again(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_ = KeyStore(redis, settings)
    taken, _ = await store_.create(unique("first"))
    fresh = secrets.token_hex(6)
    draws = iter([taken.key_id.removeprefix("mgk_"), fresh])
    # Patches the shared secrets module for this test only; create() is the
    # only caller while it runs.
    monkeypatch.setattr("gateway.keys.secrets.token_hex", lambda n: next(draws))
    created, _ = await store_.create(unique("second"))
    assert created.key_id == "mgk_" + fresh
    # The first key's record was left alone.
    assert (await KeyStore(redis, settings).get(taken.key_id)) == taken

    monkeypatch.setattr(
        "gateway.keys.secrets.token_hex", lambda n: taken.key_id.removeprefix("mgk_")
    )
    with pytest.raises(StoreError):
        await store_.create(unique("third"))


async def test_revoking_an_unknown_key_creates_nothing(
    redis: Redis, settings: Settings
) -> None:
    store_ = KeyStore(redis, settings)
    assert not await store_.revoke("mgk_eeeeeeeeeeee")
    assert not await redis.exists(store_.record_key("mgk_eeeeeeeeeeee"))


async def test_damaged_record_refuses_the_key(redis: Redis, settings: Settings) -> None:
    store_ = KeyStore(redis, settings)
    created, _ = await store_.create(unique("damaged"))
    await redis.hset(store_.record_key(created.key_id), "models", "{not json")
    assert await KeyStore(redis, settings).get(created.key_id) is None
    # A record holding another key's ciphertext does not decrypt either.
    other, _ = await store_.create(unique("donor"))
    donor = await redis.hget(store_.record_key(other.key_id), "secret_enc")
    assert donor is not None
    await redis.hset(store_.record_key(created.key_id), "models", "[]")
    await redis.hset(store_.record_key(created.key_id), "secret_enc", donor)
    assert await KeyStore(redis, settings).get(created.key_id) is None


async def test_unknown_keys_are_cached_negatively(
    redis: Redis, settings: Settings
) -> None:
    pool = ConnectionPool.from_url(
        settings.redis.url, connection_class=CountingConnection
    )
    counting = Redis(connection_pool=pool)
    try:
        store = KeyStore(counting, settings)
        missing = ["mgk_aaaaaaaaaaa0", "mgk_aaaaaaaaaaa1"]
        await counting.ping()
        before = CountingConnection.sends
        assert await store.get_many(missing) == {}
        assert CountingConnection.sends - before == 1  # both misses, one trip
        assert await store.get_many(missing) == {}
        assert CountingConnection.sends - before == 1  # cached
    finally:
        await counting.aclose()


class RecordingConnection(Connection):
    """Keeps every packed command written to the socket."""

    sent: ClassVar[list[bytes]] = []

    async def send_packed_command(
        self, command: Any, check_health: bool = True
    ) -> None:
        chunks = [command] if isinstance(command, bytes | str) else list(command)
        type(self).sent += [
            c.encode() if isinstance(c, str) else bytes(c) for c in chunks
        ]
        await super().send_packed_command(command, check_health)


async def test_a_clients_keys_are_read_through_its_index_only(
    redis: Redis, settings: Settings
) -> None:
    """Release of a client the gateway never saw asks whether a key was
    issued to it (gateway/admin/routers/clients.py): that must cost the
    client's keys, not a read of every key record."""
    store_ = KeyStore(redis, settings)
    target = unique("indexed")
    mine = [(await store_.create(target))[0].key_id for _ in range(3)]
    for i in range(150):
        await store_.create(unique(f"other{i % 50}"))
    assert await store_.revoke(mine[0])  # revoked keys still count

    # Records from before the index: no client sets, no marker. The first
    # lookup builds the index from every record, once.
    stale = [k async for k in redis.scan_iter(match=f"{PREFIX}:client-keys:*")]
    await redis.delete(*stale)
    assert await KeyStore(redis, settings).key_ids_of(target) == sorted(mine)
    assert await redis.get(store_.client_index_marker) == b"1"

    # Built: the lookup names the client's set and its three records, and
    # neither the set of all ids nor any other record.
    pool = ConnectionPool.from_url(
        settings.redis.url, connection_class=RecordingConnection
    )
    recording = Redis(connection_pool=pool)
    try:
        await recording.ping()
        RecordingConnection.sent = []
        assert await KeyStore(recording, settings).key_ids_of(target) == sorted(mine)
        assert await KeyStore(recording, settings).key_ids_of(unique("none")) == []
    finally:
        await recording.aclose()
    wire = b"".join(RecordingConnection.sent)
    assert f"{PREFIX}:keys\r\n".encode() not in wire
    assert wire.count(f"{PREFIX}:key:{{".encode()) == len(mine), wire[:2000]

    # A key missing from its client's set (created by a process older than
    # the index after the build) is put back when revoked or given a plan.
    await redis.srem(store_.client_index_key(target), mine[1], mine[2])
    assert await store_.set_plan(mine[1], "gold")
    assert await store_.revoke(mine[2])
    assert await store_.key_ids_of(target) == sorted(mine)


# Admission ---------------------------------------------------------------------


async def test_one_round_trip_per_batch(settings: Settings) -> None:
    pool = ConnectionPool.from_url(
        settings.redis.url, connection_class=CountingConnection
    )
    counting = Redis(connection_pool=pool)
    try:
        counters = CounterStore(counting, settings)
        await counters.load_scripts()
        clients = [unique("rt") for _ in range(4)]
        batch = [
            item(clients[i % 4], f"r{i}", f"0:{i}", rate=1000, burst=1000)
            for i in range(40)
        ]
        stats_before = await counting.info("commandstats")
        before = CountingConnection.sends
        results = await counters.admit_batch(batch)
        assert CountingConnection.sends - before == 1
        stats_after = await counting.info("commandstats")

        assert [r.outcome for r in results] == ["ok"] * 40
        # Per client, totals count up in batch order.
        assert [r.client_requests for r in results[:8]] == [1, 1, 1, 1, 2, 2, 2, 2]
        # One EVALSHA per client, and no SCRIPT EXISTS check on the way.
        calls = stats_after["cmdstat_evalsha"]["calls"]
        calls_before = stats_before.get("cmdstat_evalsha", {"calls": 0})["calls"]
        assert calls - calls_before == 4
        exists = stats_after.get("cmdstat_script|exists", {"calls": 0})["calls"]
        exists_before = stats_before.get("cmdstat_script|exists", {"calls": 0})["calls"]
        assert exists == exists_before
    finally:
        await counting.aclose()


async def test_lost_script_is_reloaded_once(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A variant of the script the server has never seen stands in for one it
    # lost (restart, SCRIPT FLUSH) without flushing the shared server's cache.
    variant = store.ADMIT_LUA + f"\n-- {secrets.token_hex(8)}\n".encode()
    sha = hashlib.sha1(variant).hexdigest()
    monkeypatch.setattr(store, "ADMIT_LUA", variant)
    monkeypatch.setattr(store, "ADMIT_SHA", sha)
    assert await redis.script_exists(sha) == [False]

    counters = CounterStore(redis, settings)
    client = unique("noscript")
    results = await counters.admit_batch(
        [item(client, "r1", "0:1"), item(unique("other"), "r1", "0:1")]
    )
    assert [r.outcome for r in results] == ["ok", "ok"]
    assert await redis.script_exists(sha) == [True]


async def test_cancelled_batch_leaves_the_client_usable(
    redis: Redis, settings: Settings
) -> None:
    counters = CounterStore(redis, settings)
    client = unique("cancel")
    batch = [item(client, f"r{i}", f"0:{i}", rate=1000, burst=1000) for i in range(200)]
    task = asyncio.create_task(counters.admit_batch(batch))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Whatever part ran, a retry is safe and the connection is not out of step.
    results = await counters.admit_batch(batch)
    assert {r.outcome for r in results} <= {"ok", "redelivery"}
    assert (await counters.client_counters(client))["requests"] == 200


async def test_gcra_burst_then_rate(redis: Redis, settings: Settings) -> None:
    counters = CounterStore(redis, settings)
    client = unique("gcra")
    # rate 10/s, burst 5: T = 100 ms, tau = 400 ms. One batch is one instant
    # (one TIME reading), so five pass and the sixth waits exactly T.
    batch = [item(client, f"b{i}", f"0:{i}") for i in range(6)]
    results = await counters.admit_batch(batch)
    assert [r.outcome for r in results] == ["ok"] * 5 + ["rate_limited"]
    assert results[5].retry_after_ms == 100
    assert results[5].client_requests == 5

    # The refusal did not move the TAT: waiting retry_after admits exactly one.
    await asyncio.sleep(0.1)
    pair = [item(client, "c1", "0:10"), item(client, "c2", "0:11")]
    outcomes = await counters.admit_batch(pair)
    assert [r.outcome for r in outcomes] == ["ok", "rate_limited"]
    assert 0 < outcomes[1].retry_after_ms <= 100

    # Then about `rate` per second: over 1 s of polling, 10 (give or take the
    # one at each edge of the window).
    admitted = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + 1.0
    n = 0
    while loop.time() < end:
        n += 1
        (r,) = await counters.admit_batch([item(client, f"s{n}", f"0:{100 + n}")])
        admitted += r.outcome == "ok"
        await asyncio.sleep(0.005)
    assert 9 <= admitted <= 11

    counts = await counters.client_counters(client)
    assert counts["requests"] == 5 + 1 + admitted
    assert counts["day_requests"] == counts["requests"]
    assert counts["refused"] == 1 + 1 + (n - admitted)
    assert counts["blocked_ms"] == 0


async def test_count_refused_moves_the_tat(stack: StackInfo) -> None:
    settings = make_settings(stack.redis_url, limits={"count_refused": True})
    client_redis = redis_from_settings(settings)
    try:
        counters = CounterStore(client_redis, settings)
        client = unique("strict")
        batch = [item(client, f"r{i}", f"0:{i}", rate=10, burst=1) for i in range(3)]
        results = await counters.admit_batch(batch)
        assert [r.outcome for r in results] == ["ok", "rate_limited", "rate_limited"]
        # Each refusal used a cell, so the wait grows by T each time.
        assert [r.retry_after_ms for r in results[1:]] == [100, 200]
    finally:
        await client_redis.aclose()


async def test_redelivery_and_duplicate(redis: Redis, settings: Settings) -> None:
    counters = CounterStore(redis, settings)
    client = unique("dup")
    first = await counters.admit_batch([item(client, "r1", "3:100")])
    assert first[0].outcome == "ok"

    again = await counters.admit_batch(
        [
            item(client, "r1", "3:100"),  # same record after a crash
            item(client, "r1", "3:250"),  # the client sent r1 again
            item(client, "r2", "3:251"),
            item(client, "r2", "3:252"),  # duplicate within one batch
        ]
    )
    assert [r.outcome for r in again] == ["redelivery", "duplicate", "ok", "duplicate"]
    assert [r.client_requests for r in again] == [1, 1, 2, 2]
    counts = await counters.client_counters(client)
    assert counts["requests"] == 2
    assert counts["refused"] == 2

    # The dedupe key expires with the replay window.
    pttl = await redis.pttl(counters.request_key(client, "r1"))
    assert 0 < pttl <= settings.auth.replay_window_s * 1000


async def test_refused_request_may_be_retried_under_its_id(
    redis: Redis, settings: Settings
) -> None:
    counters = CounterStore(redis, settings)
    client = unique("retry")
    results = await counters.admit_batch(
        [item(client, "a", "0:1", burst=1), item(client, "b", "0:2", burst=1)]
    )
    assert [r.outcome for r in results] == ["ok", "rate_limited"]
    await asyncio.sleep(results[1].retry_after_ms / 1000)
    (retry,) = await counters.admit_batch([item(client, "b", "0:3", burst=1)])
    assert retry.outcome == "ok"


async def test_block_and_unblock(redis: Redis, settings: Settings) -> None:
    counters = CounterStore(redis, settings)
    client = unique("blocked")
    assert not await counters.is_blocked(client)
    await counters.block(client, cooldown_s=30, reason="extraction")
    assert await counters.is_blocked(client)
    assert await redis.get(counters.client_key(client, "block")) == b"extraction"

    (result,) = await counters.admit_batch([item(client, "r1", "0:1")])
    assert result.outcome == "blocked"
    assert 29_000 < result.retry_after_ms <= 30_000
    counts = await counters.client_counters(client)
    assert 29_000 < counts["blocked_ms"] <= 30_000
    assert counts["refused"] == 1

    assert await counters.unblock(client)
    assert not await counters.unblock(client)
    (result,) = await counters.admit_batch([item(client, "r1", "0:2")])
    assert result.outcome == "ok"


async def test_hidden_record_and_release_marker_ride_on_admission(
    redis: Redis, settings: Settings
) -> None:
    """The hidden record refuses nothing; admission reports it (and a waiting
    release marker) on every line, and unblocking lifts it."""
    counters = CounterStore(redis, settings)
    client, other = unique("hidden"), unique("plain")
    await counters.record_hidden({client: ("block", 30.0), other: ("throttle", 5.0)})
    results = await counters.admit_batch(
        [item(client, "r1", "0:1"), item(client, "r2", "0:2"), item(other, "r", "0:3")]
    )
    assert [r.outcome for r in results] == ["ok", "ok", "ok"]
    for result in results[:2]:
        assert result.hidden == "block" and 29_000 < result.hidden_ms <= 30_000
        assert not result.released
    assert results[2].hidden == "throttle" and 0 < results[2].hidden_ms <= 5_000
    shown = await counters.client_counters(client)
    assert shown["blocked_ms"] == 0 and 29_000 < shown["hidden_ms"] <= 30_000

    # A release marker under the client's hash tag is reported, not consumed.
    marker = counters.client_key(client, "released")
    await redis.set(marker, b"1", px=10_000)
    for delivery in ("0:4", "0:5"):
        (seen,) = await counters.admit_batch([item(client, delivery, delivery)])
        assert seen.released
    await redis.delete(marker)

    assert await counters.unblock(client)
    (after,) = await counters.admit_batch([item(client, "r6", "0:6")])
    assert (after.hidden, after.hidden_ms, after.released) == (None, 0, False)
    assert not await counters.unblock(client)


async def test_block_defaults_to_the_policy_cooldown(
    redis: Redis, settings: Settings
) -> None:
    counters = CounterStore(redis, settings)
    client = unique("default-block")
    await counters.block(client, None, "policy")
    pttl = await redis.pttl(counters.client_key(client, "block"))
    cooldown_ms = settings.policy.block_cooldown_s * 1000
    assert cooldown_ms - 5000 < pttl <= cooldown_ms


async def test_block_expires_by_itself(redis: Redis, settings: Settings) -> None:
    counters = CounterStore(redis, settings)
    client = unique("cooldown")
    await counters.block(client, cooldown_s=0.2, reason="test")
    (result,) = await counters.admit_batch([item(client, "r1", "0:1")])
    assert result.outcome == "blocked"
    assert 0 < result.retry_after_ms <= 200
    await asyncio.sleep(0.25)
    (result,) = await counters.admit_batch([item(client, "r1", "0:2")])
    assert result.outcome == "ok"


async def test_every_key_expires(redis: Redis, settings: Settings) -> None:
    counters = CounterStore(redis, settings)
    client = unique("ttl")
    # 0.1/s: the TAT lives 10 s, not 100 ms, so a slow machine still finds it.
    await counters.admit_batch(
        [item(client, f"r{i}", f"0:{i}", rate=0.1, burst=1) for i in range(2)]
    )
    await counters.block(client, 5, "test")
    await counters.save_states({client: b"x"}, ttl_s=60)
    names = [name async for name in redis.scan_iter(match=f"{PREFIX}:{{c:{client}}}:*")]
    assert len(names) == 6  # tat:1000, block, totals, day, req:r0, state
    for name in names:
        assert await redis.pttl(name) > 0, name


async def test_states_round_trip(redis: Redis, settings: Settings) -> None:
    counters = CounterStore(redis, settings)
    a, b, c = unique("sa"), unique("sb"), unique("sc")
    blobs = {a: b"\x00\x01binary\xff", b: os.urandom(4096)}
    await counters.save_states(blobs, ttl_s=60)
    assert await counters.load_states([a, b, c]) == blobs
    assert await counters.load_states([]) == {}
    pttl = await redis.pttl(counters.client_key(a, "state"))
    assert 0 < pttl <= 60_000


# Failure -----------------------------------------------------------------------


async def test_unreachable_redis_is_a_store_error() -> None:
    # Port 1 on loopback: nothing listens there, so connecting is refused.
    settings = make_settings("redis://127.0.0.1:1/0", redis={"socket_timeout_s": 1.0})
    client = redis_from_settings(settings)
    try:
        counters = CounterStore(client, settings)
        with pytest.raises(StoreError) as excinfo:
            await counters.admit_batch([item("nobody", "r1", "0:1")])
        assert excinfo.value.code == "STORE_UNAVAILABLE"
        assert excinfo.value.retriable
        assert excinfo.value.__cause__ is not None

        keys = KeyStore(client, settings)
        with pytest.raises(StoreError) as excinfo:
            await keys.get_many(["mgk_000000000000"])
        assert excinfo.value.code == "STORE_UNAVAILABLE"
        with pytest.raises(StoreError):
            await counters.load_states(["nobody"])
    finally:
        await client.aclose()


async def test_silent_server_times_out_as_a_store_error() -> None:
    # A loopback server of our own that accepts and never answers.
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        finally:
            writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = make_settings(
        f"redis://127.0.0.1:{port}/0", redis={"socket_timeout_s": 0.3}
    )
    client = redis_from_settings(settings)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        with pytest.raises(StoreError) as excinfo:
            await CounterStore(client, settings).admit_batch([item("x", "r", "0:1")])
        assert excinfo.value.code == "STORE_UNAVAILABLE"
        assert excinfo.value.retriable
        assert loop.time() - started < 1.0
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
