"""The Redis circuit breaker without a server: its state machine with an
injected clock, and ``redis_guard`` driving it with bodies that raise what
redis-py raises (no socket is opened). The same against a real, stopped
redis-server is in tests/integration/test_redis_breaker.py."""

from __future__ import annotations

import asyncio
import doctest
import logging

import pytest
from redis import exceptions as redis_exc
from redis.asyncio import Redis

from gateway import redis_breaker
from gateway.config import load_settings
from gateway.errors import ConfigError, StoreError
from gateway.metrics import WorkerMetrics
from gateway.redis_breaker import (
    CircuitOpen,
    Permit,
    RedisBreaker,
    breaker_for,
    register_breaker,
)
from gateway.store import redis_from_settings, redis_guard

pytestmark = pytest.mark.timeout(10)

COOLDOWN_S = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fail(breaker: RedisBreaker, permit: Permit, *, waited: bool = True) -> None:
    breaker.failed(permit, waited=waited, operation="admit", reason="test")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def breaker(clock: Clock) -> RedisBreaker:
    return RedisBreaker("127.0.0.1:1/0", COOLDOWN_S, clock=clock)


def open_breaker(breaker: RedisBreaker) -> None:
    fail(breaker, breaker.acquire())
    assert breaker.state == "open"


# -- state machine ------------------------------------------------------------------


def test_docstring_examples() -> None:
    assert doctest.testmod(redis_breaker, raise_on_error=True).attempted > 0


def test_cooldown_must_be_positive() -> None:
    with pytest.raises(ValueError, match="cooldown_s"):
        RedisBreaker("x", 0.0)


def test_closed_lets_every_call_through(breaker: RedisBreaker) -> None:
    permits = [breaker.acquire() for _ in range(5)]
    for permit in permits:
        breaker.succeeded(permit)
    assert breaker.state == "closed"
    assert not any(p.probe for p in permits)
    assert breaker.stats.opens == breaker.stats.rejected == 0


def test_one_failure_opens_and_calls_are_refused_until_the_cooldown(
    breaker: RedisBreaker, clock: Clock
) -> None:
    open_breaker(breaker)
    clock.now += COOLDOWN_S - 1.5
    with pytest.raises(CircuitOpen) as refused:
        breaker.acquire()
    assert refused.value.state == "open"
    assert refused.value.retry_in_s == pytest.approx(1.5)
    clock.now += 1.4
    with pytest.raises(CircuitOpen):
        breaker.acquire()
    assert breaker.stats.rejected == 2
    assert breaker.stats.opens == 1
    assert breaker.state == "open"


def test_a_refused_connection_opens_it_too(breaker: RedisBreaker) -> None:
    fail(breaker, breaker.acquire(), waited=False)
    assert breaker.state == "open"
    assert breaker.stats.waited == 0


def test_after_the_cooldown_one_probe_only(breaker: RedisBreaker, clock: Clock) -> None:
    open_breaker(breaker)
    clock.now += COOLDOWN_S
    probe = breaker.acquire()
    assert probe.probe
    assert breaker.state == "half_open"
    for _ in range(3):
        with pytest.raises(CircuitOpen) as refused:
            breaker.acquire()
        assert refused.value.state == "half_open"
    assert breaker.stats.probes == 1


def test_probe_success_closes(breaker: RedisBreaker, clock: Clock) -> None:
    open_breaker(breaker)
    clock.now += COOLDOWN_S
    breaker.succeeded(breaker.acquire())
    assert breaker.state == "closed"
    assert breaker.stats.closes == 1
    assert not breaker.acquire().probe


def test_probe_failure_reopens_for_a_full_cooldown(
    breaker: RedisBreaker, clock: Clock
) -> None:
    open_breaker(breaker)
    clock.now += COOLDOWN_S + 10
    probe = breaker.acquire()
    clock.now += 2.0  # the probe waits out its timeout
    fail(breaker, probe)
    assert breaker.state == "open"
    assert breaker.stats.opens == 2
    with pytest.raises(CircuitOpen) as refused:
        breaker.acquire()
    assert refused.value.retry_in_s == pytest.approx(COOLDOWN_S)


def test_an_abandoned_probe_frees_the_slot(breaker: RedisBreaker, clock: Clock) -> None:
    open_breaker(breaker)
    clock.now += COOLDOWN_S
    breaker.abandoned(breaker.acquire())  # e.g. cancelled at shutdown
    assert breaker.state == "half_open"
    again = breaker.acquire()
    assert again.probe
    breaker.succeeded(again)
    assert breaker.state == "closed"


def test_stragglers_neither_reopen_nor_close(
    breaker: RedisBreaker, clock: Clock
) -> None:
    """Calls admitted while closed and still under way when it opened."""
    first, *stragglers = [breaker.acquire() for _ in range(4)]
    fail(breaker, first)
    opened_at = clock.now
    clock.now += 1.0
    fail(breaker, stragglers[0])  # timed out too: old news
    breaker.succeeded(stragglers[1])  # a late answer: not a probe
    assert breaker.state == "open"
    assert breaker.stats.opens == 1
    with pytest.raises(CircuitOpen) as refused:
        breaker.acquire()
    # The cool-down still runs from the first failure.
    assert refused.value.retry_in_s == pytest.approx(opened_at + COOLDOWN_S - clock.now)

    clock.now = opened_at + COOLDOWN_S
    probe = breaker.acquire()
    breaker.succeeded(stragglers[2])  # answered while the probe is in flight
    assert breaker.state == "half_open"
    with pytest.raises(CircuitOpen):
        breaker.acquire()  # the probe slot is still taken
    breaker.succeeded(probe)
    assert breaker.state == "closed"
    assert breaker.stats.waited == 2


def test_a_straggler_from_an_earlier_outage_does_not_reopen(
    breaker: RedisBreaker, clock: Clock
) -> None:
    old = breaker.acquire()
    open_breaker(breaker)
    clock.now += COOLDOWN_S
    breaker.succeeded(breaker.acquire())
    assert breaker.state == "closed"
    fail(breaker, old)
    assert breaker.state == "closed"
    # A call admitted since the close does open it.
    fail(breaker, breaker.acquire())
    assert breaker.state == "open"
    assert breaker.stats.opens == 2


def test_logs_once_per_state_change(
    breaker: RedisBreaker, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.redis_breaker")
    permits = [breaker.acquire() for _ in range(3)]
    for permit in permits:
        fail(breaker, permit)
    for _ in range(3):
        clock.now += COOLDOWN_S
        fail(breaker, breaker.acquire())  # failed probes
    clock.now += COOLDOWN_S
    breaker.succeeded(breaker.acquire())
    ours = [r for r in caplog.records if r.name == "gateway.redis_breaker"]
    warnings = [r for r in ours if r.levelno == logging.WARNING]
    infos = [r for r in ours if r.levelno == logging.INFO]
    assert len(warnings) == 1, [r.getMessage() for r in ours]
    assert warnings[0].__dict__["redis"] == "127.0.0.1:1/0"
    assert warnings[0].__dict__["operation"] == "admit"
    assert warnings[0].__dict__["cooldown_s"] == COOLDOWN_S
    assert len(infos) == 1, [r.getMessage() for r in ours]
    assert infos[0].__dict__["open_s"] == pytest.approx(4 * COOLDOWN_S)


# -- failure threshold (redis.breaker_failures) -------------------------------------


@pytest.fixture
def breaker3(clock: Clock) -> RedisBreaker:
    return RedisBreaker("127.0.0.1:1/0", COOLDOWN_S, failures=3, clock=clock)


def test_failures_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="failures must be at least 1, got 0"):
        RedisBreaker("x", 1.0, failures=0)


def test_opens_on_the_threshold_th_failure_in_a_row(breaker3: RedisBreaker) -> None:
    for _ in range(2):
        fail(breaker3, breaker3.acquire())
        assert breaker3.state == "closed"
    assert breaker3.stats.opens == breaker3.stats.rejected == 0
    fail(breaker3, breaker3.acquire())
    assert breaker3.state == "open"
    assert breaker3.stats.opens == 1
    assert breaker3.stats.waited == 3
    with pytest.raises(CircuitOpen):
        breaker3.acquire()


def test_a_success_starts_the_count_again(breaker3: RedisBreaker) -> None:
    """A one-off blip, or two, between answers never opens it."""
    for _ in range(3):
        fail(breaker3, breaker3.acquire())
        fail(breaker3, breaker3.acquire(), waited=False)
        breaker3.succeeded(breaker3.acquire())
    assert breaker3.state == "closed"
    assert breaker3.stats.opens == 0
    for _ in range(3):
        fail(breaker3, breaker3.acquire())
    assert breaker3.state == "open"


def test_a_failed_probe_reopens_at_once_whatever_the_threshold(
    breaker3: RedisBreaker, clock: Clock
) -> None:
    for _ in range(3):
        fail(breaker3, breaker3.acquire())
    clock.now += COOLDOWN_S
    fail(breaker3, breaker3.acquire())
    assert breaker3.state == "open"
    assert breaker3.stats.opens == 2
    with pytest.raises(CircuitOpen) as refused:
        breaker3.acquire()
    assert refused.value.retry_in_s == pytest.approx(COOLDOWN_S)


def test_after_a_close_the_count_starts_from_zero(
    breaker3: RedisBreaker, clock: Clock
) -> None:
    """Failures before the opening, and stragglers' verdicts that arrive after
    the close, neither count towards the next opening nor reset the count."""
    old_fail, old_ok = breaker3.acquire(), breaker3.acquire()
    for _ in range(3):
        fail(breaker3, breaker3.acquire())
    clock.now += COOLDOWN_S
    breaker3.succeeded(breaker3.acquire())
    assert breaker3.state == "closed"

    fail(breaker3, old_fail)  # stale: does not count
    fail(breaker3, breaker3.acquire())
    fail(breaker3, breaker3.acquire())
    assert breaker3.state == "closed"
    breaker3.succeeded(old_ok)  # stale: does not reset the count either
    fail(breaker3, breaker3.acquire())
    assert breaker3.state == "open"
    assert breaker3.stats.opens == 2


def test_calls_failing_together_open_it_once(breaker3: RedisBreaker) -> None:
    permits = [breaker3.acquire() for _ in range(8)]
    for permit in permits:
        fail(breaker3, permit)
    assert breaker3.state == "open"
    assert (breaker3.stats.opens, breaker3.stats.waited) == (1, 8)


def test_failures_below_the_threshold_log_debug_only(
    breaker3: RedisBreaker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.redis_breaker")
    for _ in range(3):
        fail(breaker3, breaker3.acquire())
    ours = [r for r in caplog.records if r.name == "gateway.redis_breaker"]
    assert [r.levelno for r in ours] == [logging.DEBUG] * 2 + [logging.WARNING]
    assert [r.__dict__["failures"] for r in ours] == [1, 2, 3]


# -- failure window (redis.breaker_window_s) ---------------------------------------

WINDOW_S = 10.0


@pytest.fixture
def windowed(clock: Clock) -> RedisBreaker:
    return RedisBreaker(
        "127.0.0.1:1/0", COOLDOWN_S, failures=3, window_s=WINDOW_S, clock=clock
    )


def fail_after(
    breaker: RedisBreaker, clock: Clock, idle_s: float, call_s: float = 0.0
) -> None:
    """Nothing for ``idle_s``, then a call that fails after ``call_s``."""
    clock.now += idle_s
    permit = breaker.acquire()
    clock.now += call_s
    fail(breaker, permit)


def test_window_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="window_s must not be negative, got -1"):
        RedisBreaker("x", 1.0, failures=3, window_s=-1.0)


def test_blips_minutes_apart_never_open_it(
    windowed: RedisBreaker, clock: Clock
) -> None:
    for _ in range(10):
        fail_after(windowed, clock, 120.0)
        assert windowed.state == "closed"
    assert windowed.stats.opens == 0


def test_without_a_window_blips_minutes_apart_open_it(clock: Clock) -> None:
    """``window_s`` 0: the count of failures in a row, as before the window."""
    breaker = RedisBreaker("x", COOLDOWN_S, failures=3, window_s=0.0, clock=clock)
    for _ in range(2):
        fail_after(breaker, clock, 120.0)
    assert breaker.state == "closed"
    fail_after(breaker, clock, 120.0)
    assert breaker.state == "open"


def test_each_failure_is_measured_from_the_one_before_not_the_first(
    windowed: RedisBreaker, clock: Clock
) -> None:
    """Three failures 8 s apart open it, though they span 16 s."""
    fail_after(windowed, clock, 0.0)
    fail_after(windowed, clock, 8.0)
    assert windowed.state == "closed"
    fail_after(windowed, clock, 8.0)
    assert windowed.state == "open"


def test_a_gap_of_exactly_the_window_still_counts(
    windowed: RedisBreaker, clock: Clock
) -> None:
    for _ in range(3):
        fail_after(windowed, clock, WINDOW_S)
    assert windowed.state == "open"


def test_a_late_failure_starts_a_new_run_of_one(
    windowed: RedisBreaker, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.redis_breaker")
    fail_after(windowed, clock, 0.0)
    fail_after(windowed, clock, 1.0)
    fail_after(windowed, clock, WINDOW_S + 0.001)  # the run of two lapses
    fail_after(windowed, clock, 1.0)
    assert windowed.state == "closed"
    fail_after(windowed, clock, 1.0)
    assert windowed.state == "open"
    ours = [r for r in caplog.records if r.name == "gateway.redis_breaker"]
    assert [r.__dict__["failures"] for r in ours[:4]] == [1, 2, 1, 2]
    assert ours[4].levelno == logging.WARNING
    assert ours[4].__dict__["window_s"] == WINDOW_S


def test_a_hung_redis_opens_it_whatever_the_timeout(
    windowed: RedisBreaker, clock: Clock
) -> None:
    """Calls that each wait out a 30 s timeout fail 30 s apart, but each began
    as the one before failed: the window is measured to a call's start."""
    for _ in range(2):
        fail_after(windowed, clock, 0.0, call_s=30.0)
        assert windowed.state == "closed"
    fail_after(windowed, clock, 0.0, call_s=30.0)
    assert windowed.state == "open"


def test_calls_begun_together_count_however_late_they_fail(
    windowed: RedisBreaker, clock: Clock
) -> None:
    permits = [windowed.acquire() for _ in range(3)]
    for permit in permits:
        clock.now += 2 * WINDOW_S
        fail(windowed, permit)
    assert windowed.state == "open"


def test_a_success_still_resets_within_the_window(
    windowed: RedisBreaker, clock: Clock
) -> None:
    fail_after(windowed, clock, 0.0)
    fail_after(windowed, clock, 1.0)
    windowed.succeeded(windowed.acquire())
    fail_after(windowed, clock, 1.0)
    fail_after(windowed, clock, 1.0)
    assert windowed.state == "closed"


def test_after_an_outage_the_window_starts_afresh(
    windowed: RedisBreaker, clock: Clock
) -> None:
    """The failures that opened it, and the failed probe, are not the run the
    next opening counts."""
    for _ in range(3):
        fail_after(windowed, clock, 0.0)
    fail_after(windowed, clock, COOLDOWN_S)  # the probe fails: open again
    clock.now += COOLDOWN_S
    windowed.succeeded(windowed.acquire())
    assert windowed.state == "closed"
    fail_after(windowed, clock, 0.0)
    fail_after(windowed, clock, 0.0)
    assert windowed.state == "closed"


def test_settings_set_the_window_default_ten_seconds() -> None:
    assert breaker_for(redis_from_settings(load_settings())).window_s == 10.0
    assert breaker_for(Redis(host="127.0.0.1", port=1)).window_s == 10.0
    settings = load_settings(redis={"breaker_window_s": 0})
    assert breaker_for(redis_from_settings(settings)).window_s == 0.0
    settings = load_settings(redis={"breaker_window_s": 2.5})
    assert breaker_for(redis_from_settings(settings)).window_s == 2.5


@pytest.mark.parametrize("window_s", [-1, -0.001, 3601, "a while"])
def test_window_out_of_bounds_is_refused(window_s: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(redis={"breaker_window_s": window_s})
    assert info.value.code == "CONFIG_INVALID"
    assert "redis.breaker_window_s" in info.value.message, info.value.message


# -- redis_guard driving it (no server: the bodies raise) -----------------------


@pytest.fixture
def client(clock: Clock) -> Redis:
    # Never connects: the guarded bodies below raise before any command.
    redis = Redis(host="127.0.0.1", port=1)
    register_breaker(redis, COOLDOWN_S, clock=clock)
    return redis


async def test_guard_opens_on_a_connection_error_then_fails_without_running(
    client: Redis,
) -> None:
    with pytest.raises(StoreError) as first:
        async with redis_guard("admit", 1.0, client):
            raise redis_exc.ConnectionError("Connection refused")
    ran = False
    with pytest.raises(StoreError) as fast:
        async with redis_guard("replay lookup", 1.0, client):
            ran = True
    assert not ran
    for error in (first.value, fast.value):
        assert error.code == "STORE_UNAVAILABLE"
        assert error.retriable
    assert isinstance(fast.value.__cause__, CircuitOpen)
    assert "circuit open" in fast.value.message
    assert breaker_for(client).stats.rejected == 1


async def test_guard_timeout_counts_as_waited(client: Redis) -> None:
    never = asyncio.Event()
    with pytest.raises(StoreError) as raised:
        async with redis_guard("admit", 0.01, client):
            await never.wait()
    assert raised.value.code == "STORE_UNAVAILABLE"
    stats = breaker_for(client).stats
    assert (stats.waited, stats.opens) == (1, 1)


async def test_guard_error_replies_do_not_open(client: Redis) -> None:
    """The server answered: it is up, whatever it said."""
    for error in (
        redis_exc.ResponseError("ERR bad script"),
        redis_exc.OutOfMemoryError("OOM"),
    ):
        with pytest.raises(StoreError):
            async with redis_guard("admit", 1.0, client):
                raise error
    assert breaker_for(client).state == "closed"


async def test_guard_callers_own_errors_and_cancellation_are_no_verdict(
    client: Redis, clock: Clock
) -> None:
    with pytest.raises(ValueError):
        async with redis_guard("admit", 1.0, client):
            raise ValueError("caller's bug")
    assert breaker_for(client).state == "closed"

    # A probe cancelled (shutdown) leaves the next call free to probe.
    with pytest.raises(StoreError):
        async with redis_guard("admit", 1.0, client):
            raise redis_exc.TimeoutError("Timeout reading from socket")
    clock.now += COOLDOWN_S
    entered = asyncio.Event()

    async def probe() -> None:
        async with redis_guard("admit", 1.0, client):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(probe())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker_for(client).state == "half_open"
    async with redis_guard("admit", 1.0, client):
        pass
    assert breaker_for(client).state == "closed"


class Tally:
    """Counts events and wakes a waiter when a count is reached."""

    def __init__(self, target: int) -> None:
        self.count = 0
        self.target = target
        self.reached = asyncio.Event()

    def add(self) -> None:
        self.count += 1
        if self.count >= self.target:
            self.reached.set()


async def test_guard_shared_by_many_coroutines(client: Redis, clock: Clock) -> None:
    """Eight calls hang together: all wait, one opening. The next eight fail
    at once. After the cool-down eight arrive together: one probes, seven
    are refused, and the probe's answer closes the breaker."""
    breaker = breaker_for(client)

    async def call(
        answer: asyncio.Event, entered: Tally, ended: Tally, *, times_out: bool
    ) -> str:
        try:
            async with redis_guard("admit", 5.0, client):
                entered.add()
                await answer.wait()
                if times_out:
                    raise redis_exc.TimeoutError("Timeout reading from socket")
        except StoreError as exc:
            return exc.code
        finally:
            ended.add()
        return "ok"

    hung, entered, ended = asyncio.Event(), Tally(8), Tally(8)
    tasks = [
        asyncio.create_task(call(hung, entered, ended, times_out=True))
        for _ in range(8)
    ]
    await entered.reached.wait()
    hung.set()
    assert await asyncio.gather(*tasks) == ["STORE_UNAVAILABLE"] * 8
    assert (breaker.stats.opens, breaker.stats.waited) == (1, 8)

    entered, ended = Tally(1), Tally(8)
    codes = await asyncio.gather(
        *(call(hung, entered, ended, times_out=True) for _ in range(8))
    )
    assert codes == ["STORE_UNAVAILABLE"] * 8
    assert entered.count == 0
    assert breaker.stats.waited == 8

    clock.now += COOLDOWN_S
    answered, entered, ended = asyncio.Event(), Tally(1), Tally(7)
    tasks = [
        asyncio.create_task(call(answered, entered, ended, times_out=False))
        for _ in range(8)
    ]
    await ended.reached.wait()
    assert entered.count == 1
    assert breaker.state == "half_open"
    answered.set()
    codes = await asyncio.gather(*tasks)
    assert sorted(codes) == ["STORE_UNAVAILABLE"] * 7 + ["ok"]
    assert breaker.state == "closed"
    assert breaker.stats.probes == 1


async def test_guard_error_replies_reset_the_failure_count(clock: Clock) -> None:
    redis = Redis(host="127.0.0.1", port=1)
    breaker = register_breaker(redis, COOLDOWN_S, failures=2, clock=clock)
    for error in (
        redis_exc.ConnectionError("Connection refused"),
        redis_exc.ResponseError("ERR bad script"),  # the server answered
        redis_exc.ConnectionError("Connection refused"),
    ):
        with pytest.raises(StoreError):
            async with redis_guard("admit", 1.0, redis):
                raise error
    assert breaker.state == "closed"
    with pytest.raises(StoreError):
        async with redis_guard("admit", 1.0, redis):
            raise redis_exc.TimeoutError("Timeout reading from socket")
    assert breaker.state == "open"


async def test_each_client_has_its_own_breaker(client: Redis) -> None:
    other = Redis(host="127.0.0.1", port=2)
    with pytest.raises(StoreError):
        async with redis_guard("admit", 1.0, client):
            raise redis_exc.ConnectionError("Connection refused")
    async with redis_guard("admit", 1.0, other):
        pass
    assert breaker_for(client).state == "open"
    assert breaker_for(other).state == "closed"
    assert breaker_for(other).target == "127.0.0.1:2/0"


def test_settings_set_the_cooldown_and_the_target_hides_the_password() -> None:
    # The password is redis.password now (a URL carrying one is refused);
    # the target still names host, port and db only.
    settings = load_settings(
        redis={
            "url": "redis://127.0.0.1:1/3",
            "password": "hunter2",
            "breaker_cooldown_s": 0.5,
        }
    )
    breaker = breaker_for(redis_from_settings(settings))
    assert breaker.cooldown_s == 0.5
    assert breaker.target == "127.0.0.1:1/3"


def test_settings_set_the_failure_threshold_default_three() -> None:
    assert breaker_for(redis_from_settings(load_settings())).failures == 3
    assert breaker_for(Redis(host="127.0.0.1", port=1)).failures == 3
    settings = load_settings(redis={"breaker_failures": 7})
    assert breaker_for(redis_from_settings(settings)).failures == 7


@pytest.mark.parametrize("failures", [0, -1, 101, 2.5, "few"])
def test_failure_threshold_out_of_bounds_is_refused(failures: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(redis={"breaker_failures": failures})
    assert info.value.code == "CONFIG_INVALID"
    assert "redis.breaker_failures" in info.value.message, info.value.message


@pytest.mark.parametrize("cooldown_s", [0, -1, 301, "soon"])
def test_cooldown_out_of_bounds_is_refused(cooldown_s: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(redis={"breaker_cooldown_s": cooldown_s})
    assert info.value.code == "CONFIG_INVALID"
    assert "redis.breaker_cooldown_s" in info.value.message, info.value.message


# -- metrics -------------------------------------------------------------------------


def test_worker_metrics_read_the_breaker(breaker: RedisBreaker, clock: Clock) -> None:
    metrics = WorkerMetrics()
    metrics.watch_redis_breaker(RedisBreaker("old", 1.0))
    metrics.watch_redis_breaker(breaker)  # replaces, no name clash

    def sample(name: str) -> float | None:
        return metrics.registry.get_sample_value(name)

    assert sample("modelgate_redis_breaker_state") == 0
    open_breaker(breaker)
    with pytest.raises(CircuitOpen):
        breaker.acquire()
    assert sample("modelgate_redis_breaker_state") == 2
    assert sample("modelgate_redis_breaker_opens_total") == 1
    assert sample("modelgate_redis_breaker_rejected_total") == 1
    assert sample("modelgate_redis_waited_out_total") == 1
    clock.now += COOLDOWN_S
    breaker.acquire()
    assert sample("modelgate_redis_breaker_state") == 1
