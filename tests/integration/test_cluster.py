"""The gateway on a real three-primary Redis Cluster (``redis.cluster: true``).

Store level: admission, blocks, releases, snapshots, the throttle, script
reloading after every primary lost its scripts, and a SCAN that visits every
primary. Worker level: a real worker (Kafka from the shared stack) serves many
clients whose keys land on all three primaries, with dedupe, the replay cache,
a block and its release through the client view, cross-client fingerprints,
key revocation, a live config acknowledgement and the state handover.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.fernet import Fernet
from redis.asyncio.cluster import RedisCluster

from gateway.admin.audit import AuditLog
from gateway.admin.errors import AdminError
from gateway.admin.sessions import LoginGuard, SessionStore
from gateway.admin.users import UserStore
from gateway.clientview import ClientView
from gateway.config import Settings
from gateway.errors import StoreError
from gateway.keys import KeyStore
from gateway.liveconfig.service import ConfigService, WorkerAck
from gateway.models import digits_split
from gateway.store import ADMIT_SHA, AdmitItem, CounterStore, redis_from_settings
from gateway.throttle import ThrottleCheck, ThrottleStore
from tests.conftest import StackInfo
from tests.integration import test_limits as limits_tests
from tests.integration import test_store as store_tests
from tests.integration.adminkit import FAST_HASH
from tests.integration.helpers import (
    RawKafka,
    create_key,
    isolated_settings,
    read_topic,
    responses_for,
    running_worker,
    wait_for_acks,
)
from tests.integration.redis_cluster import RedisClusterInfo, redis_cluster

__all__ = ["redis_cluster"]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

X_TEST = digits_split()[1]


def _one_pixel_probes(source: np.ndarray, n: int) -> np.ndarray:
    """``n`` copies of ``source``, each with one random pixel set to a random
    level: the queries of a one-pixel attack."""
    rng = np.random.default_rng(11)
    rows = np.repeat(source[None, :], n, axis=0).astype(np.float32)
    rows[np.arange(n), rng.integers(0, source.size, n)] = rng.integers(0, 17, n)
    return rows


def _cluster_settings(
    stack: StackInfo, cluster: RedisClusterInfo, models_dir: Path, **overrides: Any
) -> Settings:
    settings = isolated_settings(
        stack.kafka_bootstrap, cluster.url, models_dir, **overrides
    )
    return settings.model_copy(
        update={"redis": settings.redis.model_copy(update={"cluster": True})}
    )


@pytest.fixture
async def cluster_redis(
    stack: StackInfo, redis_cluster: RedisClusterInfo, models_dir: Path
) -> AsyncIterator[tuple[RedisCluster, Settings]]:
    settings = _cluster_settings(stack, redis_cluster, models_dir)
    client = redis_from_settings(settings)
    assert isinstance(client, RedisCluster)
    try:
        yield client, settings
    finally:
        await client.aclose()


async def _primaries_holding(client: RedisCluster, prefix: str) -> Counter[str]:
    """How many keys under ``prefix`` each primary holds (SCAN on each node)."""
    held: Counter[str] = Counter()
    await client.initialize()  # the node list is empty until the first command
    for node in client.get_primaries():
        async for _ in client.scan_iter(match=f"{prefix}:*", target_nodes=node):
            held[node.name] += 1
    return held


def _clients(n: int) -> list[str]:
    return [f"cl-{i}" for i in range(n)]


async def test_store_works_on_every_primary(
    cluster_redis: tuple[RedisCluster, Settings],
) -> None:
    client, settings = cluster_redis
    store = CounterStore(client, settings)
    await store.load_scripts()
    clients = _clients(24)
    slots = {client.keyslot(store.client_key(c, "block")) for c in clients}
    assert len(slots) == len(clients)

    items = [AdmitItem(c, f"r{i}", f"0:{i}") for i, c in enumerate(clients)]
    first = await store.admit_batch(items)
    assert [a.outcome for a in first] == ["ok"] * len(clients), first

    # Every primary lost its scripts (a restart, SCRIPT FLUSH): the batch
    # reloads on all of them and comes back as redeliveries, counted once.
    await client.script_flush()
    assert not any(await client.script_exists(ADMIT_SHA)), "scripts still loaded"
    again = await store.admit_batch(items)
    assert [a.outcome for a in again] == ["redelivery"] * len(clients), again

    held = await _primaries_holding(client, settings.redis.key_prefix)
    assert len(held) == 3, held

    # Blocks, releases, counters and snapshots across slots.
    await store.block(clients[0], 30, "test")
    blocked = await store.admit_batch([AdmitItem(clients[0], "rb", "0:99")])
    assert blocked[0].outcome == "blocked"
    assert await store.unblock(clients[0])
    await store.release_requests([(c, f"r{i}") for i, c in enumerate(clients)])
    await store.release_in_flight([(c, f"r{i}") for i, c in enumerate(clients)])
    counters = await store.client_counters(clients[1])
    assert counters["requests"] == 1 and counters["blocked_ms"] == 0, counters
    states = {c: c.encode() * 3 for c in clients}
    await store.save_states(states, 60)
    assert await store.load_states([*clients, "absent"]) == states

    throttle = ThrottleStore(client, settings)
    decided = await throttle.check([ThrottleCheck(c, 1.0, 2) for c in clients[:6]])
    assert decided == [[0, 0]] * 6, decided

    # A SCAN over the prefix visits every primary (what the benchmark's
    # cleanup relies on), and a multi-key UNLINK is split per slot.
    prefix = settings.redis.key_prefix
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
    per_node = await _primaries_holding(client, prefix)
    # Keys with a short expiry (rate cells, throttle) may lapse between the
    # scans and the unlink on a loaded machine, hence the inequalities.
    assert len(per_node) == 3 and sum(per_node.values()) <= len(set(keys)), per_node
    assert 0 < await client.unlink(*keys) <= len(set(keys))
    assert await _primaries_holding(client, prefix) == Counter()


# Single-node store tests that take any client: run again against the cluster.
_LIMITS_CASES: list[Callable[[Any, StackInfo], Awaitable[None]]] = [
    limits_tests.test_no_double_burst_at_a_minute_edge,
    limits_tests.test_the_tightest_window_binds,
    limits_tests.test_daily_quota_resets_at_midnight_utc,
    limits_tests.test_in_flight_cap_release_and_safety_expiry,
    limits_tests.test_per_key_overrides,
    limits_tests.test_every_counter_key_expires,
]
_STORE_CASES: list[Callable[[Any, Settings], Awaitable[None]]] = [
    store_tests.test_create_get_authenticate,
    store_tests.test_gcra_burst_then_rate,
    store_tests.test_redelivery_and_duplicate,
    store_tests.test_block_and_unblock,
    store_tests.test_hidden_record_and_release_marker_ride_on_admission,
    store_tests.test_every_key_expires,
    store_tests.test_states_round_trip,
]


@pytest.mark.parametrize("case", _LIMITS_CASES, ids=lambda c: c.__name__)
async def test_limits_cases_on_a_cluster(
    case: Callable[[Any, StackInfo], Awaitable[None]],
    stack: StackInfo,
    redis_cluster: RedisClusterInfo,
) -> None:
    client = RedisCluster.from_url(redis_cluster.url)
    try:
        await case(client, stack)
    finally:
        await client.aclose()


@pytest.mark.parametrize("case", _STORE_CASES, ids=lambda c: c.__name__)
async def test_store_cases_on_a_cluster(
    case: Callable[[Any, Settings], Awaitable[None]],
    stack: StackInfo,
    redis_cluster: RedisClusterInfo,
) -> None:
    settings = store_tests.make_settings(redis_cluster.url)
    settings = settings.model_copy(
        update={"redis": settings.redis.model_copy(update={"cluster": True})}
    )
    client = redis_from_settings(settings)
    try:
        await case(client, settings)
    finally:
        await client.aclose()


async def test_unreachable_cluster_is_a_retriable_store_error(
    stack: StackInfo, models_dir: Path
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens there any more: the cluster cannot be discovered.
    settings = _cluster_settings(stack, RedisClusterInfo((port,)), models_dir)
    client = redis_from_settings(settings)
    try:
        with pytest.raises(StoreError) as raised:
            await CounterStore(client, settings).admit_batch(
                [AdmitItem("c", "r", "0:0")]
            )
        assert raised.value.retriable
    finally:
        await client.aclose()


async def test_admin_stores_on_a_cluster(
    stack: StackInfo, redis_cluster: RedisClusterInfo, models_dir: Path
) -> None:
    settings = _cluster_settings(
        stack,
        redis_cluster,
        models_dir,
        admin={**FAST_HASH, "max_failures": 2},
    )
    redis = redis_from_settings(settings)
    try:
        users = UserStore(redis, settings, Fernet.generate_key())
        for i in range(6):
            await users.create(f"user{i}", "viewer", "a long enough password")
        assert len(await users.list()) == 6
        assert await users.set_role("user1", "operator")

        sessions = SessionStore(redis, settings)
        token, session = await sessions.create("user2", "127.0.0.1")
        assert (await sessions.resolve(token)) == session
        assert [s.session_id for s in await sessions.list("user2")] == [
            session.session_id
        ]
        assert await sessions.revoke("user2", session.session_id)
        assert await sessions.resolve(token) is None

        # The failure counter and the lock share a hash tag: one slot, one
        # script.
        guard = LoginGuard(redis, settings)
        await guard.check_source("127.0.0.1")
        assert not await guard.record_failure("user3")
        assert await guard.record_failure("user3")
        with pytest.raises(AdminError):
            await guard.check_locked("user3")

        audit = AuditLog(redis, settings)
        await audit.record(
            actor="user1", action="test", target="x", source="127.0.0.1", outcome="ok"
        )
        assert [e.actor for e in await audit.read(10)] == ["user1"]
        assert await users.delete("user0")
    finally:
        await redis.aclose()


async def test_worker_serves_many_clients_on_a_cluster(
    stack: StackInfo, redis_cluster: RedisClusterInfo, models_dir: Path
) -> None:
    settings = _cluster_settings(
        stack,
        redis_cluster,
        models_dir,
        limits={"rate_per_s": 10_000, "burst": 10_000},
    )
    prefix = settings.redis.key_prefix
    clients = _clients(12)
    redis = redis_from_settings(settings)
    assert isinstance(redis, RedisCluster)
    try:
        async with running_worker(settings) as worker, RawKafka(settings) as kafka:
            keys = {c: await create_key(settings, c) for c in clients}
            probe = await create_key(settings, "probe-1")

            # Distinct digits per client: all served.
            ids = {
                await kafka.send_request(*keys[c], X_TEST[i : i + 1], client_id=c): c
                for i, c in enumerate(clients)
            }
            await kafka.flush()
            answers = await responses_for(settings, ids, timeout_s=60)
            assert {a["status"] for a in answers.values()} == {"ok"}, answers
            held = await _primaries_holding(redis, prefix)
            assert len(held) == 3, held

            # A retry of the same body is answered from the replay cache; the
            # same id with another body is a duplicate.
            first_id, first_client = next(iter(ids.items()))
            await kafka.send_request(
                *keys[first_client], X_TEST[0:1], client_id=first_client,
                request_id=first_id,
            )  # fmt: skip
            await kafka.send_request(
                *keys[first_client], X_TEST[7:8], client_id=first_client,
                request_id=first_id,
            )  # fmt: skip
            await kafka.flush()
            again = await _all_answers(settings, first_id, 3)
            # One batch may answer the two in either order.
            later = sorted((_code(a), bool(a.get("replayed"))) for a in again[1:])
            assert later == [("DUPLICATE_REQUEST", False), ("ok", True)], again

            # A key's own GCRA override: a burst of two, then refusals.
            slow = await create_key(
                settings,
                "slow-1",
                limit_overrides={"rules": [{"limit": 1, "window_s": 60, "burst": 2}]},
            )
            slow_ids = [
                await kafka.send_request(
                    *slow, X_TEST[40 + i : 41 + i], client_id="slow-1"
                )
                for i in range(4)
            ]
            await kafka.flush()
            slowed = await responses_for(settings, slow_ids, timeout_s=60)
            assert [_code(slowed[r]) for r in slow_ids] == [
                "ok", "ok", "RATE_LIMITED", "RATE_LIMITED"
            ], slowed  # fmt: skip

            # A one-pixel prober (one input, one pixel changed per query) is
            # blocked by policy; the client view shows it and releasing it
            # lets it through again.
            probe_ids = [
                await kafka.send_request(*probe, row[None, :], client_id="probe-1")
                for row in _one_pixel_probes(X_TEST[0], 24)
            ]
            await kafka.flush()
            probed = await responses_for(settings, probe_ids, timeout_s=60)
            codes = [_code(probed[r]) for r in probe_ids]
            assert "BLOCKED" in codes, codes
            view = ClientView(redis, settings)
            top = [row.client_id for row in await view.top(5)]
            assert top[0] == "probe-1", top
            shown = await view.show("probe-1", 10)
            assert shown is not None and shown.counters["blocked_ms"] > 0, shown
            assert await view.release("probe-1", "tester")
            codes = []
            for i in range(20, 24):
                rid = await kafka.send_request(
                    *probe, X_TEST[i : i + 1], client_id="probe-1"
                )
                await kafka.flush()
                codes.append(_code((await responses_for(settings, [rid]))[rid]))
            assert codes == ["ok"] * 4, codes

            # Cross-client fingerprints live under one hash tag of their own.
            fp_keys = [k async for k in redis.scan_iter(match=f"{{{prefix}:fp}}:*")]
            assert fp_keys, "no fingerprints stored"

            # Revocation reaches the worker.
            assert await KeyStore(redis, settings).revoke(keys[clients[1]][0])
            await _eventually(
                lambda: _revoked_code(kafka, settings, keys[clients[1]], clients[1]),
                "AUTH_REVOKED",
            )

            # A live config change is acknowledged through the cluster.
            async with ConfigService(settings) as service:
                worker_id = settings.worker.worker_id
                await _ack(service, lambda a: worker_id in a)
                record = await service.set({"policy.flag_at": 1.1}, "tester")
                assert record is not None
                acks = await _ack(
                    service, lambda a: a[worker_id].version == record.version
                )
                assert acks[worker_id].version == record.version
            assert worker._scorer is not None

        # Stopping handed every client's detector state over through Redis.
        store = CounterStore(redis, settings)
        saved = await store.load_states([*clients, "probe-1"])
        assert set(saved) >= set(clients[2:]), sorted(saved)

        # The next owner restores a known client's snapshot on first sight.
        async with running_worker(settings) as second, RawKafka(settings) as kafka:
            assert second._scorer is not None
            restored: dict[str, bytes] = {}
            restore = second._scorer.restore

            def spy(client_id: str, blob: bytes) -> None:
                restored[client_id] = blob
                restore(client_id, blob)

            second._scorer.restore = spy  # type: ignore[method-assign]
            rid = await kafka.send_request(
                *keys[clients[5]], X_TEST[50:51], client_id=clients[5]
            )
            await kafka.flush()
            assert _code((await responses_for(settings, [rid]))[rid]) == "ok"
        assert restored == {clients[5]: saved[clients[5]]}, sorted(restored)
    finally:
        await redis.aclose()


def _code(response: dict[str, Any]) -> str:
    return "ok" if response["status"] == "ok" else str(response["error"]["code"])


async def _all_answers(
    settings: Settings, request_id: str, n: int
) -> list[dict[str, Any]]:
    records = await read_topic(
        settings,
        settings.kafka.topics.responses,
        until=lambda rs: sum(r.get("request_id") == request_id for r in rs) >= n,
        timeout_s=60,
    )
    found = [r for r in records if r.get("request_id") == request_id]
    assert len(found) >= n, found
    return found


async def _revoked_code(
    kafka: RawKafka, settings: Settings, key: tuple[str, bytes], client_id: str
) -> str:
    rid = await kafka.send_request(*key, X_TEST[30:31], client_id=client_id)
    await kafka.flush()
    return _code((await responses_for(settings, [rid]))[rid])


async def _eventually(
    attempt: Callable[[], Any], expected: str, timeout_s: float = 20.0
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        got = await attempt()
        if got == expected:
            return
        if loop.time() > deadline:
            raise AssertionError(f"expected {expected}, still {got}")
        await asyncio.sleep(0.2)  # polling interval; the key cache lives 1 s


async def _ack(
    service: ConfigService,
    done: Callable[[dict[str, WorkerAck]], bool],
    timeout_s: float = 30.0,
) -> dict[str, WorkerAck]:
    return await wait_for_acks(service, done, timeout_s, interval_s=0.05)
