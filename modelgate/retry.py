"""When and how long to wait before sending a failed request again.

A request is sent again only when its error is ``retriable`` (rate limited,
blocked for a while, backend or store trouble, 502/503/504, timeouts,
connection failures), while attempts remain and the wait still fits the
request's deadline. The caller keeps the request id across attempts, so the
gateway recognises a retry: a request already served is answered again from
its replay cache instead of being refused as a duplicate.

Waits grow exponentially from ``base_delay_s``, capped at ``max_delay_s``,
with "equal jitter" (half fixed, half random) so that clients refused at the
same instant do not come back at the same instant. A server-given
``retry_after_s`` is a floor: the wait is the longer of the backoff and what
the gateway asked for plus up to ``retry_after_jitter`` of it at random.

This module is pure (standard library only) so it can be tested with a fake
clock and a fake sleep.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from modelgate.errors import DuplicateRequestError, GatewayError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How persistently a client retries.

    Parameters
    ----------
    max_attempts
        Sends per request, the first included (1 disables retries).
    base_delay_s
        Backoff before the second attempt, before jitter.
    max_delay_s
        Cap of the exponential backoff (a ``retry_after_s`` may exceed it).
    deadline_s
        Budget for the whole request, all attempts and waits included;
        ``None`` leaves only ``max_attempts`` as the bound. A wait that would
        end past the deadline is not started: the last error is raised.
    retry_after_jitter
        Fraction of a server-given wait added at random (0.1: up to 10 %).
    """

    max_attempts: int = 4
    base_delay_s: float = 0.1
    max_delay_s: float = 5.0
    deadline_s: float | None = 60.0
    retry_after_jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not (0 <= self.base_delay_s <= self.max_delay_s):
            raise ValueError("need 0 <= base_delay_s <= max_delay_s")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError("deadline_s must be positive (or None)")
        if not 0 <= self.retry_after_jitter <= 1:
            raise ValueError("retry_after_jitter must be within [0, 1]")

    def backoff_s(
        self, attempt: int, rng: Callable[[], float] = random.random
    ) -> float:
        """The wait after failed attempt number ``attempt`` (1-based), when
        the server gave no ``retry_after_s``: equal jitter over
        ``min(max_delay_s, base_delay_s * 2 ** (attempt - 1))``."""
        exponent = min(attempt - 1, 62)  # 2**62 s is already "capped"
        ceiling = min(self.max_delay_s, self.base_delay_s * math.ldexp(1.0, exponent))
        return ceiling / 2 + rng() * ceiling / 2

    def delay_s(
        self,
        attempt: int,
        error: GatewayError,
        rng: Callable[[], float] = random.random,
    ) -> float | None:
        """How long to wait before attempt ``attempt + 1``, or ``None`` if
        ``error`` (raised by attempt ``attempt``) should be raised instead.

        A ``DUPLICATE_REQUEST`` answering a *retry* counts as retriable: the
        first attempt is most likely still being served, and once it is, its
        kept answer is what the next retry gets.
        """
        if attempt >= self.max_attempts:
            return None
        retriable = error.retriable or (
            isinstance(error, DuplicateRequestError) and attempt > 1
        )
        if not retriable:
            return None
        if error.retry_after_s is not None and error.retry_after_s >= 0:
            jitter = rng() * self.retry_after_jitter * error.retry_after_s
            return max(error.retry_after_s + jitter, self.backoff_s(attempt, rng))
        return self.backoff_s(attempt, rng)


async def call_with_retries(
    attempt_once: Callable[[int, float | None], Awaitable[T]],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: Callable[[], float] = random.random,
) -> T:
    """Run ``attempt_once(attempt, remaining_s)`` until it returns, retrying
    retriable ``GatewayError``s as ``policy`` allows.

    ``remaining_s`` is what is left of ``policy.deadline_s`` (``None`` if no
    deadline): the attempt should bound its own wait by it.

    Raises
    ------
    GatewayError
        The last attempt's error, with ``attempts`` set to how many were made.
    """
    started = clock()
    attempt = 1
    while True:
        remaining = (
            None
            if policy.deadline_s is None
            else policy.deadline_s - (clock() - started)
        )
        try:
            return await attempt_once(attempt, remaining)
        except GatewayError as error:
            error.attempts = attempt
            wait_s = policy.delay_s(attempt, error, rng)
            if wait_s is None:
                raise
            if policy.deadline_s is not None:
                left_s = policy.deadline_s - (clock() - started)
                # Waiting past the deadline only to fail later helps nobody;
                # an attempt needs some time of its own after the wait, too.
                if wait_s >= left_s:
                    raise
            logger.info(
                "retrying after %s in %.3f s",
                error.code,
                wait_s,
                extra={"request": error.request_id, "attempt": attempt},
            )
            await sleep(wait_s)
            attempt += 1
