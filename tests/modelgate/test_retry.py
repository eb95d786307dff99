"""Retry decisions and backoff, on a fake clock: which errors are retried,
how long each wait is, and that the deadline and attempt count bound them."""

from __future__ import annotations

import pytest

from modelgate import errors
from modelgate.retry import RetryPolicy, call_with_retries


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_backoff_grows_exponentially_with_equal_jitter_and_a_cap() -> None:
    policy = RetryPolicy(base_delay_s=0.1, max_delay_s=1.0)
    for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0)]:
        assert policy.backoff_s(attempt, rng=lambda: 0.0) == pytest.approx(ceiling / 2)
        assert policy.backoff_s(attempt, rng=lambda: 1.0) == pytest.approx(ceiling)
    # Far beyond the cap, no overflow.
    assert policy.backoff_s(10_000, rng=lambda: 1.0) == 1.0


def test_only_retriable_errors_are_retried_while_attempts_remain() -> None:
    policy = RetryPolicy(max_attempts=3)
    busy = errors.error_for("BACKEND_UNAVAILABLE", "down")
    assert policy.delay_s(1, busy) is not None
    assert policy.delay_s(2, busy) is not None
    assert policy.delay_s(3, busy) is None  # attempts used up
    for code in ("UNKNOWN_MODEL", "AUTH_REVOKED", "SHAPE_MISMATCH", "INTERNAL"):
        assert policy.delay_s(1, errors.error_for(code, "no")) is None, code


def test_retry_after_is_a_floor_with_bounded_jitter() -> None:
    policy = RetryPolicy(base_delay_s=0.1, max_delay_s=1.0, retry_after_jitter=0.1)
    limited = errors.error_for("RATE_LIMITED", "slow", retry_after_s=2.0)
    assert policy.delay_s(1, limited, rng=lambda: 0.0) == pytest.approx(2.0)
    assert policy.delay_s(1, limited, rng=lambda: 1.0) == pytest.approx(2.2)
    # A Retry-After shorter than the backoff does not shorten the backoff.
    quick = errors.error_for("RATE_LIMITED", "slow", retry_after_s=0.0)
    assert policy.delay_s(3, quick, rng=lambda: 1.0) == pytest.approx(0.4)


def test_a_duplicate_answering_a_retry_is_retried_but_not_a_first_attempt() -> None:
    policy = RetryPolicy()
    duplicate = errors.error_for("DUPLICATE_REQUEST", "seen", retriable=False)
    assert policy.delay_s(1, duplicate) is None
    assert policy.delay_s(2, duplicate) is not None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"base_delay_s": -1},
        {"base_delay_s": 2, "max_delay_s": 1},
        {"deadline_s": 0},
        {"retry_after_jitter": 1.5},
    ],
)
def test_bad_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]  # values are the test


async def test_retries_until_success_and_reports_the_remaining_deadline() -> None:
    time = FakeTime()
    seen: list[tuple[int, float | None]] = []

    async def attempt(n: int, remaining: float | None) -> str:
        seen.append((n, remaining))
        time.now += 1.0  # each attempt takes a second
        if n < 3:
            raise errors.error_for("GATEWAY_TIMEOUT", "slow workers")
        return "answer"

    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=0.5, deadline_s=10.0)
    result = await call_with_retries(
        attempt, policy, sleep=time.sleep, clock=time.clock, rng=lambda: 1.0
    )
    assert result == "answer"
    assert time.sleeps == [0.5, 0.5]
    assert seen == [(1, 10.0), (2, 8.5), (3, 7.0)]


async def test_the_last_error_is_raised_with_the_attempt_count() -> None:
    time = FakeTime()

    async def attempt(n: int, remaining: float | None) -> str:
        raise errors.error_for("STORE_UNAVAILABLE", f"attempt {n}")

    with pytest.raises(errors.StoreUnavailableError) as caught:
        await call_with_retries(
            attempt,
            RetryPolicy(max_attempts=4, deadline_s=None),
            sleep=time.sleep,
            clock=time.clock,
        )
    assert caught.value.attempts == 4
    assert caught.value.message == "attempt 4"
    assert len(time.sleeps) == 3


async def test_a_wait_past_the_deadline_is_not_started() -> None:
    time = FakeTime()
    calls = 0

    async def attempt(n: int, remaining: float | None) -> str:
        nonlocal calls
        calls += 1
        raise errors.error_for("RATE_LIMITED", "later", retry_after_s=30.0)

    with pytest.raises(errors.RateLimitedError) as caught:
        await call_with_retries(
            attempt,
            RetryPolicy(deadline_s=5.0),
            sleep=time.sleep,
            clock=time.clock,
        )
    assert calls == 1 and time.sleeps == []
    assert caught.value.attempts == 1


async def test_a_non_retriable_error_is_raised_at_once() -> None:
    time = FakeTime()

    async def attempt(n: int, remaining: float | None) -> str:
        raise errors.error_for("AUTH_REVOKED", "revoked")

    with pytest.raises(errors.RevokedKeyError):
        await call_with_retries(
            attempt, RetryPolicy(), sleep=time.sleep, clock=time.clock
        )
    assert time.sleeps == []
