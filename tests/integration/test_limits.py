"""Per-client limits against the real Redis: GCRA windows checked against the
Python reference under a controlled clock, the daily quota across midnight,
the in-flight cap, count_refused, live plan changes, per-key overrides, key
expiry, and each fail mode against a private Redis the test stops and starts.

Every key lives under a prefix unique to this module and is deleted at the
end; the shared Redis is never stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from redis import exceptions as redis_exc
from redis.asyncio import Redis

from gateway.clientview import ClientView
from gateway.config import LimitsConfig, Settings, load_settings
from gateway.errors import StoreError
from gateway.keys import KeyStore
from gateway.limits import Admitter
from gateway.metrics import WorkerMetrics
from gateway.redis_breaker import breaker_for
from gateway.store import AdmitItem, CounterStore, gcra, redis_from_settings
from tests.conftest import StackInfo
from tests.integration.helpers import delete_matching

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PREFIX = f"mgl{os.getpid()}{secrets.token_hex(3)}"
DAY_US = 86_400 * 1_000_000
# 2026-12-04T00:00:00Z in microseconds: any whole day works.
EPOCH_DAY_US = 20_791 * DAY_US


class Clock:
    """A controlled clock in microseconds since the epoch."""

    def __init__(self, now_us: int) -> None:
        self.now_us = now_us

    def __call__(self) -> int:
        return self.now_us

    def advance_ms(self, ms: float) -> None:
        self.now_us += round(ms * 1000)


def make_settings(redis_url: str, limits: dict[str, Any] | None = None) -> Settings:
    # A short breaker cool-down: the fail-mode tests wait it out (see
    # breaker_cooled) after restarting their private Redis.
    redis = {"socket_timeout_s": 1.0, "breaker_cooldown_s": 0.2}
    return load_settings(
        redis={"url": redis_url, "key_prefix": PREFIX, **redis},
        auth={"server_key": Fernet.generate_key().decode()},
        limits=limits or {},
    )


def unique(name: str) -> str:
    return f"{name}-{secrets.token_hex(4)}"


_serial = iter(range(10**9))


def item(client: str, **kwargs: Any) -> AdmitItem:
    n = next(_serial)
    return AdmitItem(client, f"r{n}", f"0:{n}", **kwargs)


@pytest.fixture
async def redis(stack: StackInfo) -> AsyncIterator[Redis]:
    client = redis_from_settings(make_settings(stack.redis_url))
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="module", autouse=True)
async def _cleanup(stack: StackInfo) -> AsyncIterator[None]:
    yield
    await delete_matching(stack.redis_url, f"{PREFIX}:*")


def store_for(
    redis: Redis, stack: StackInfo, limits: dict[str, Any], clock: Clock
) -> CounterStore:
    return CounterStore(redis, make_settings(stack.redis_url, limits), clock_us=clock)


# GCRA against the reference --------------------------------------------------

# Intervals (window / limit) are whole microseconds and 1e6 / rate is exact,
# so the script and the reference do the same arithmetic without rounding.
RULES = [
    {"limit": 10, "window_s": 1, "burst": 4},
    {"limit": 50, "window_s": 10, "burst": 12},
    {"limit": 120, "window_s": 60},
]


def reference(
    schedule: list[tuple[int, int]], rules: list[dict[str, Any]], count_refused: bool
) -> list[tuple[str, int]]:
    """Every rule's GCRA via ``store.gcra``; admitted iff all allow."""
    tats: list[float | None] = [None] * len(rules)
    out = []
    for now_us, count in schedule:
        for _ in range(count):
            decisions = [
                gcra(
                    tats[r],
                    now_us,
                    rule["limit"] / rule["window_s"],
                    rule.get("burst", rule["limit"]),
                )
                for r, rule in enumerate(rules)
            ]
            allowed = all(d.allowed for d in decisions)
            if allowed or count_refused:
                for r, rule in enumerate(rules):
                    interval = rule["window_s"] * 1e6 / rule["limit"]
                    base = now_us if tats[r] is None else max(tats[r] or 0, now_us)
                    tats[r] = base + interval
            wait_us = max(d.retry_after_us for d in decisions)
            out.append(
                ("ok", 0) if allowed else ("rate_limited", -(-int(wait_us) // 1000))
            )
    return out


@pytest.mark.parametrize("count_refused", [False, True])
async def test_windows_match_the_reference_over_a_random_schedule(
    redis: Redis, stack: StackInfo, count_refused: bool
) -> None:
    rng = random.Random(7 + count_refused)
    clock = Clock(EPOCH_DAY_US + 3_600 * 10**6)
    limits = {"plans": {"default": {"rules": RULES, "count_refused": count_refused}}}
    counters = store_for(redis, stack, limits, clock)
    client = unique("ref")
    schedule = []
    for _ in range(150):
        # Steps on and off the 100 ms emission grid, so edges are exercised.
        step = rng.choice([0, 100_000, 200_000, rng.randrange(0, 700_000)])
        clock.now_us += step
        schedule.append((clock.now_us, rng.choice([1, 1, 1, 2, 5])))

    got: list[tuple[str, int]] = []
    for now_us, count in schedule:
        clock.now_us = now_us
        results = await counters.admit_batch([item(client) for _ in range(count)])
        got.extend((r.outcome, r.retry_after_ms) for r in results)

    want = reference(schedule, RULES, count_refused)
    assert got == want
    assert 10 < sum(o == "ok" for o, _ in got) < len(got)  # both outcomes seen


async def test_no_double_burst_at_a_minute_edge(redis: Redis, stack: StackInfo) -> None:
    # 100 per minute, all at once allowed. A fixed window would let 100 pass
    # in the last second of a minute and 100 more in the first of the next.
    clock = Clock(EPOCH_DAY_US + 60 * 10**6 - 10**6)  # 1 s before a minute edge
    limits = {"plans": {"default": {"rules": [{"limit": 100, "window_s": 60}]}}}
    counters = store_for(redis, stack, limits, clock)
    client = unique("edge")

    first = await counters.admit_batch([item(client) for _ in range(101)])
    assert [r.outcome for r in first] == ["ok"] * 100 + ["rate_limited"]
    admitted = 0
    for _ in range(20):  # 2 s across the edge, every 100 ms
        clock.advance_ms(100)
        results = await counters.admit_batch([item(client) for _ in range(10)])
        admitted += sum(r.outcome == "ok" for r in results)
    # The allowance refills at 100 per 60 s: 2 s buy 3 requests, not 100.
    assert admitted == 3


async def test_the_tightest_window_binds(redis: Redis, stack: StackInfo) -> None:
    clock = Clock(EPOCH_DAY_US + 5 * 10**6)
    rules = [{"limit": 10, "window_s": 1}, {"limit": 20, "window_s": 60}]
    counters = store_for(redis, stack, {"plans": {"default": {"rules": rules}}}, clock)
    client = unique("tight")

    results = await counters.admit_batch([item(client) for _ in range(11)])
    assert [r.outcome for r in results] == ["ok"] * 10 + ["rate_limited"]
    # The per-second window is empty: it binds.
    last = results[9]
    assert (last.limit, last.remaining, last.window_s) == (10, 0, 1.0)
    assert last.reset_ms == 1000
    assert results[10].retry_after_ms == 100

    clock.advance_ms(1000)
    results = await counters.admit_batch([item(client) for _ in range(11)])
    # The second is full again, but the minute has 10 of 20 left.
    assert [r.outcome for r in results] == ["ok"] * 10 + ["rate_limited"]
    assert (results[9].limit, results[9].remaining, results[9].window_s) == (
        20,
        0,
        60.0,
    )
    # Refused by the minute: the next slot is one minute-interval (3 s) after
    # the 20th admission's allowance, not the per-second 100 ms.
    assert results[10].retry_after_ms > 1000


# Daily quota ------------------------------------------------------------------


async def test_daily_quota_resets_at_midnight_utc(
    redis: Redis, stack: StackInfo
) -> None:
    clock = Clock(EPOCH_DAY_US + DAY_US - 10 * 10**6)  # 23:59:50 UTC
    limits = {
        "plans": {
            "default": {"rules": [{"limit": 100, "window_s": 1}], "quota": {"daily": 3}}
        }
    }
    counters = store_for(redis, stack, limits, clock)
    client = unique("quota")

    results = await counters.admit_batch([item(client) for _ in range(4)])
    assert [r.outcome for r in results] == ["ok"] * 3 + ["quota_exceeded"]
    assert results[3].retry_after_ms == 10_000  # until midnight
    # The quota binds: 0 of 3 left, full again at midnight.
    assert (results[2].limit, results[2].remaining) == (3, 0)
    assert results[2].window_s == 86_400.0 and results[2].reset_ms == 10_000

    clock.advance_ms(9_999)
    (still,) = await counters.admit_batch([item(client)])
    assert still.outcome == "quota_exceeded" and still.retry_after_ms == 1

    clock.advance_ms(1)  # midnight
    results = await counters.admit_batch([item(client) for _ in range(4)])
    assert [r.outcome for r in results] == ["ok"] * 3 + ["quota_exceeded"]


# In-flight cap ------------------------------------------------------------------


async def test_in_flight_cap_release_and_safety_expiry(
    redis: Redis, stack: StackInfo
) -> None:
    clock = Clock(EPOCH_DAY_US + 7 * 10**6)
    limits = {
        "plans": {
            "default": {
                "rules": [{"limit": 1000, "window_s": 1}],
                "in_flight": {"limit": 2, "ttl_s": 30},
            }
        }
    }
    counters = store_for(redis, stack, limits, clock)
    client = unique("inflight")

    batch = [item(client) for _ in range(3)]
    results = await counters.admit_batch(batch)
    assert [r.outcome for r in results] == ["ok", "ok", "too_many_in_flight"]
    assert [r.in_flight for r in results] == [True, True, False]

    # Answering one frees its slot; releasing it again changes nothing.
    await counters.release_in_flight([(client, batch[0].request_id)] * 2)
    results = await counters.admit_batch([item(client) for _ in range(2)])
    assert [r.outcome for r in results] == ["ok", "too_many_in_flight"]

    # A redelivery is served again and keeps (not adds) its slot.
    (again,) = await counters.admit_batch([batch[1]])
    assert again.outcome == "redelivery" and again.in_flight
    (full,) = await counters.admit_batch([item(client)])
    assert full.outcome == "too_many_in_flight"

    # Slots nobody releases (a crashed worker) free themselves after ttl_s.
    clock.advance_ms(30_001)
    results = await counters.admit_batch([item(client) for _ in range(3)])
    assert [r.outcome for r in results] == ["ok", "ok", "too_many_in_flight"]


# count_refused ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count_refused", "third"), [(False, "ok"), (True, "rate_limited")]
)
async def test_count_refused(
    redis: Redis, stack: StackInfo, count_refused: bool, third: str
) -> None:
    clock = Clock(EPOCH_DAY_US + 9 * 10**6)
    limits = {
        "count_refused": count_refused,
        "plans": {"default": {"rules": [{"limit": 1, "window_s": 1, "burst": 1}]}},
    }
    counters = store_for(redis, stack, limits, clock)
    client = unique("cr")
    outcomes = []
    for _ in range(3):
        (r,) = await counters.admit_batch([item(client)])
        outcomes.append(r.outcome)
        clock.advance_ms(600)
    # 0 ms ok; 600 ms too early; 1200 ms is past the first interval, unless
    # the refusal at 600 ms was charged (then not before 2000 ms).
    assert outcomes == ["ok", "rate_limited", third]


# Plans: live change, unknown plans, per-key overrides ---------------------------


async def test_plan_change_applies_to_a_live_store(
    redis: Redis, stack: StackInfo
) -> None:
    clock = Clock(EPOCH_DAY_US + 11 * 10**6)
    # No plans configured: the default is today's 50/s, burst 100.
    counters = store_for(redis, stack, {}, clock)
    client = unique("live")
    results = await counters.admit_batch([item(client) for _ in range(101)])
    assert [r.outcome for r in results].count("ok") == 100

    counters.set_limits(
        LimitsConfig.model_validate(
            {
                "plans": {
                    "default": {"rules": [{"limit": 50, "window_s": 1}]},
                    "gold": {},
                }
            }
        )
    )
    other = unique("live")
    results = await counters.admit_batch([item(other) for _ in range(51)])
    assert [r.outcome for r in results].count("ok") == 50
    # A plan without rules limits nothing; an unknown plan gets the default.
    rich = unique("g")
    gold = await counters.admit_batch([item(rich, plan="gold") for _ in range(200)])
    assert all(r.outcome == "ok" for r in gold)
    assert gold[0].limit == 0  # no window to report
    stranger = unique("u")
    unknown = await counters.admit_batch(
        [item(stranger, plan="nosuch") for _ in range(51)]
    )
    assert [r.outcome for r in unknown].count("ok") == 50


async def test_per_key_overrides(redis: Redis, stack: StackInfo) -> None:
    clock = Clock(EPOCH_DAY_US + 13 * 10**6)
    limits = {"plans": {"free": {"rules": [{"limit": 5, "window_s": 1}]}}}
    counters = store_for(redis, stack, limits, clock)
    plain, special = unique("plain"), unique("special")
    overrides = json.dumps({"quota": {"daily": 2}})
    results = await counters.admit_batch(
        [item(plain, plan="free") for _ in range(3)]
        + [item(special, plan="free", overrides=overrides) for _ in range(3)]
    )
    assert [r.outcome for r in results] == ["ok"] * 5 + ["quota_exceeded"]
    # Overrides that do not validate are ignored rather than locking out.
    (bad,) = await counters.admit_batch(
        [item(unique("bad"), plan="free", overrides='{"rules": 7}')]
    )
    assert bad.outcome == "ok"


async def test_key_records_carry_plan_and_overrides(
    redis: Redis, stack: StackInfo
) -> None:
    settings = make_settings(stack.redis_url)
    keys = KeyStore(redis, settings)
    key, _ = await keys.create(
        unique("k"), plan="gold", limit_overrides={"quota": {"daily": 9}}
    )
    keys.forget()
    loaded = await keys.get(key.key_id)
    assert loaded is not None
    assert (loaded.plan, json.loads(loaded.limit_overrides)) == (
        "gold",
        {"quota": {"daily": 9}},
    )

    assert await keys.set_plan(key.key_id, "free")
    loaded = await keys.get(key.key_id)
    assert loaded is not None and (loaded.plan, loaded.limit_overrides) == ("free", "")
    assert not await keys.set_plan("mgk_000000000000", "free")
    with pytest.raises(ValueError):
        await keys.set_plan(key.key_id, "free", {"in_flight": {"limit": 0}})
    with pytest.raises(ValueError):
        await keys.create("c", plan="no spaces")
    listed = {row["key_id"]: row for row in await keys.list()}
    assert listed[key.key_id]["plan"] == "free"
    # A record from before plans had no plan field: the default plan.
    await redis.hdel(keys.record_key(key.key_id), "plan", "limit_overrides")
    keys.forget()
    loaded = await keys.get(key.key_id)
    assert loaded is not None and loaded.plan == "default"


async def test_every_counter_key_expires(redis: Redis, stack: StackInfo) -> None:
    clock = Clock(EPOCH_DAY_US + 15 * 10**6)
    limits = {
        "plans": {
            "default": {
                "rules": [
                    {"limit": 1, "window_s": 60},
                    {"limit": 100, "window_s": 86_400},
                ],
                "quota": {"daily": 100},
                "in_flight": {"limit": 5},
            }
        }
    }
    counters = store_for(redis, stack, limits, clock)
    client = unique("ttl")
    # A release first (its marker and history entry), as it deletes the
    # block, the hidden record and the snapshot written after it here.
    view = ClientView(redis, make_settings(stack.redis_url, limits))
    await view.release(client, "tester")
    await counters.admit_batch([item(client) for _ in range(2)])
    await counters.block(client, 5, "test")
    await counters.record_hidden({client: ("block", 5.0)})
    await counters.save_states({client: b"x"}, ttl_s=60)
    names = [
        n.decode() async for n in redis.scan_iter(match=f"{PREFIX}:{{c:{client}}}:*")
    ]
    suffixes = sorted(n.rsplit("}:", 1)[1].split(":")[0] for n in names)
    assert suffixes == [
        "block", "day", "hidden", "history", "inflight", "released", "req",
        "state", "tat", "tat", "totals",
    ]  # fmt: skip
    for name in names:
        assert await redis.pttl(name) > 0, name


# Fail modes, against a private Redis ------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of this test's own on a free loopback port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def spawn(self) -> None:
        listen = ["--port", str(self.port), "--bind", "127.0.0.1"]
        no_disk = ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        self.process = subprocess.Popen(
            ["redis-server", *listen, *no_disk],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def start(self) -> None:
        """Start it and wait until it answers PING."""
        self.spawn()
        client = Redis.from_url(self.url)
        try:
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                with contextlib.suppress(redis_exc.ConnectionError):
                    if await client.ping():
                        return
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError("private redis-server did not start")
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    try:
        yield server
    finally:
        server.stop()


async def admitter_for(
    private_redis: PrivateRedis, fail_mode: str
) -> tuple[Admitter, WorkerMetrics, Redis]:
    await private_redis.start()
    settings = make_settings(
        private_redis.url,
        {
            "plans": {
                "default": {
                    "rules": [{"limit": 1, "window_s": 1, "burst": 3}],
                    "fail_mode": fail_mode,
                }
            }
        },
    )
    client = redis_from_settings(settings)
    metrics = WorkerMetrics()
    counters = CounterStore(client, settings)
    return (
        Admitter(counters, metrics.decisions_without_store),
        metrics,
        client,
    )


async def breaker_cooled(client: Redis) -> None:
    """Wait until the client's Redis breaker, opened by the outage, lets the
    next call probe (its cool-down is over)."""
    breaker = breaker_for(client)
    deadline = asyncio.get_running_loop().time() + 10
    while breaker.probe_in_s > 0:
        assert asyncio.get_running_loop().time() < deadline, breaker.probe_in_s
        await asyncio.sleep(0.02)


def without_store(metrics: WorkerMetrics, mode: str) -> float:
    value = metrics.registry.get_sample_value(
        "modelgate_decisions_without_store_total", {"mode": mode}
    )
    return value or 0.0


async def test_fail_open_admits_up_to_the_local_cap_and_recovers(
    private_redis: PrivateRedis,
) -> None:
    admitter, metrics, client = await admitter_for(private_redis, "open")
    try:
        (first,) = await admitter.admit([item("fo")])
        assert first.outcome == "ok" and not first.without_store

        private_redis.stop()
        results = await admitter.admit([item("fo") for _ in range(5)])
        # The local bucket: burst 3 at once, then 1 per second.
        assert [r.outcome for r in results] == ["ok"] * 3 + ["rate_limited"] * 2
        assert all(r.without_store for r in results)
        assert 0 < results[3].retry_after_ms <= 1000
        assert without_store(metrics, "open") == 5
        assert without_store(metrics, "closed") == 0

        await private_redis.start()
        await breaker_cooled(client)
        (back,) = await admitter.admit([item("fo2")])
        assert back.outcome == "ok" and not back.without_store
        assert without_store(metrics, "open") == 5
    finally:
        await client.aclose()


async def test_fail_closed_refuses_and_recovers(private_redis: PrivateRedis) -> None:
    admitter, metrics, client = await admitter_for(private_redis, "closed")
    try:
        private_redis.stop()
        results = await admitter.admit([item("fc") for _ in range(2)])
        assert [r.outcome for r in results] == ["store_unavailable"] * 2
        assert without_store(metrics, "closed") == 2

        await private_redis.start()
        await breaker_cooled(client)
        (back,) = await admitter.admit([item("fc")])
        assert back.outcome == "ok" and not back.without_store
    finally:
        await client.aclose()


async def test_fail_retry_raises_for_the_batch_to_be_retried(
    private_redis: PrivateRedis,
) -> None:
    admitter, metrics, client = await admitter_for(private_redis, "retry")
    try:
        private_redis.stop()
        with pytest.raises(StoreError) as excinfo:
            await admitter.admit([item("fr")])
        assert excinfo.value.code == "STORE_UNAVAILABLE"
        assert without_store(metrics, "open") == without_store(metrics, "closed") == 0
    finally:
        await client.aclose()


# Requests judged when they were sent ---------------------------------------


def reference_sent(
    schedule: list[tuple[int, list[int]]], rules: list[dict[str, Any]]
) -> list[tuple[str, int]]:
    """``store.gcra`` at each request's sending instant (clamped to now)."""
    tats: list[float | None] = [None] * len(rules)
    out = []
    for now_us, sent in schedule:
        for sent_us in sent:
            at_us = min(sent_us, now_us)
            decisions = [
                gcra(
                    tats[r],
                    now_us,
                    rule["limit"] / rule["window_s"],
                    rule.get("burst", rule["limit"]),
                    at_us=at_us,
                )
                for r, rule in enumerate(rules)
            ]
            if all(d.allowed for d in decisions):
                tats = [d.tat_us for d in decisions]
                out.append(("ok", 0))
            else:
                wait_us = max(d.retry_after_us for d in decisions)
                out.append(("rate_limited", max(-(-int(wait_us) // 1000), 1)))
    return out


async def test_sending_times_match_the_reference(
    redis: Redis, stack: StackInfo
) -> None:
    rng = random.Random(11)
    clock = Clock(EPOCH_DAY_US + 7_200 * 10**6)
    counters = store_for(redis, stack, {"plans": {"default": {"rules": RULES}}}, clock)
    client = unique("sent")
    schedule: list[tuple[int, list[int]]] = []
    last_sent = clock.now_us - 20 * 10**6
    for _ in range(120):
        clock.now_us += rng.choice([0, 100_000, rng.randrange(0, 3_000_000)])
        # A batch of requests sent in order since the last one, some long
        # before this batch is judged (a backlog), one now and then stamped
        # a little after the worker's clock (the broker's runs ahead).
        sent = []
        for _ in range(rng.choice([1, 2, 5, 12])):
            last_sent = min(last_sent + rng.randrange(0, 250_000), clock.now_us)
            sent.append(last_sent + rng.choice([0, 0, 0, 0, 40_000]))
        schedule.append((clock.now_us, sent))

    got: list[tuple[str, int]] = []
    for now_us, sent in schedule:
        clock.now_us = now_us
        results = await counters.admit_batch([item(client, sent_us=s) for s in sent])
        got.extend((r.outcome, r.retry_after_ms) for r in results)

    assert got == reference_sent(schedule, RULES)
    assert 10 < sum(o == "ok" for o, _ in got) < len(got)


async def test_a_backlog_is_judged_as_it_was_sent(
    redis: Redis, stack: StackInfo
) -> None:
    # 5 requests a second for 6 s, queued while no worker ran, judged in one
    # call: within a plan of 10 a second, burst 4, every one is admitted.
    # Judged at the call's instant (a producer's timestamp, or none), the
    # same requests are one burst of 30 and 26 are refused.
    clock = Clock(EPOCH_DAY_US + 3 * 3_600 * 10**6)
    rule = {"limit": 10, "window_s": 1, "burst": 4}
    counters = store_for(redis, stack, {"plans": {"default": {"rules": [rule]}}}, clock)
    start = clock.now_us - 6 * 10**6
    sent = [start + i * 200_000 for i in range(30)]

    client = unique("backlog")
    backlog = await counters.admit_batch([item(client, sent_us=s) for s in sent])
    other = unique("unstamped")
    unstamped = await counters.admit_batch([item(other) for _ in sent])

    assert [a.outcome for a in backlog] == ["ok"] * 30
    assert [a.outcome for a in unstamped].count("ok") == 4
    # A real burst stays a burst whenever it is judged.
    bursting = unique("burst")
    burst = await counters.admit_batch(
        [item(bursting, sent_us=start) for _ in range(30)]
    )
    assert [a.outcome for a in burst].count("ok") == 4


async def test_a_request_sent_before_its_tat_passed_is_refused_later(
    redis: Redis, stack: StackInfo
) -> None:
    # The TAT outlives its passing (for the replay window), so a request
    # sent within a spent burst is refused even when judged after the TAT
    # would have expired, with the shortest wait there is.
    clock = Clock(EPOCH_DAY_US + 4 * 3_600 * 10**6)
    rule = {"limit": 1, "window_s": 1, "burst": 2}
    counters = store_for(redis, stack, {"plans": {"default": {"rules": [rule]}}}, clock)
    client = unique("late")
    spent_at = clock.now_us
    first = await counters.admit_batch([item(client) for _ in range(2)])
    clock.advance_ms(30_000)
    late = await counters.admit_batch([item(client, sent_us=spent_at + 10_000)])
    fresh = await counters.admit_batch([item(client, sent_us=clock.now_us)])

    assert [a.outcome for a in first] == ["ok", "ok"]
    assert late[0].outcome == "rate_limited" and late[0].retry_after_ms == 1
    assert fresh[0].outcome == "ok"


async def test_sending_times_are_clamped_to_now_and_the_replay_window(
    redis: Redis, stack: StackInfo
) -> None:
    clock = Clock(EPOCH_DAY_US + 5 * 3_600 * 10**6)
    rule = {"limit": 1, "window_s": 1, "burst": 1}
    counters = store_for(redis, stack, {"plans": {"default": {"rules": [rule]}}}, clock)
    # Stamped in the future: judged now, so the next second is not lent.
    ahead = unique("ahead")
    future = clock.now_us + 10 * 10**6
    results = await counters.admit_batch(
        [item(ahead, sent_us=future), item(ahead, sent_us=future)]
    )
    assert [a.outcome for a in results] == ["ok", "rate_limited"]
    # Older than the replay window (900 s): judged at its edge, so an hour
    # of silence is not an hour of rate to spend at once.
    old = unique("old")
    hour_ago = clock.now_us - 3_600 * 10**6
    results = await counters.admit_batch(
        [item(old, sent_us=hour_ago + i * 10**6) for i in range(3)]
    )
    assert [a.outcome for a in results] == ["ok", "rate_limited", "rate_limited"]
