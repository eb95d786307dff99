"""A circuit breaker for one remote model backend.

Closed: calls go through and consecutive failures are counted. After
``failures`` of them in a row it opens: every call is refused at once (the
caller answers BACKEND_UNAVAILABLE instead of waiting on a dead backend) until
``cooldown_s`` has passed. Then it is half-open: exactly one call goes through
as a probe while the others are still refused; the probe's success closes the
breaker, its failure opens it for another cool-down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal

from gateway.errors import BackendUnavailableError

logger = logging.getLogger(__name__)

BreakerState = Literal["closed", "half_open", "open"]

# For the metrics gauge: larger means less traffic gets through.
STATE_LEVEL: dict[BreakerState, int] = {"closed": 0, "half_open": 1, "open": 2}


class CircuitBreaker:
    """Consecutive-failure breaker; safe to share between threads.

    Parameters
    ----------
    name
        The model it guards, for messages and logs.
    failures
        Consecutive failures that open the breaker.
    cooldown_s
        Seconds the breaker stays open before letting one probe through.
    clock
        Monotonic seconds; injectable so tests need not sleep.
    on_change
        Called with the new state after every transition (under the lock, so
        calls arrive in transition order; keep it cheap).
    """

    def __init__(
        self,
        name: str,
        failures: int,
        cooldown_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        if failures < 1 or cooldown_s <= 0:
            raise ValueError("failures must be >= 1 and cooldown_s > 0")
        self.name = name
        self._failures_to_open = failures
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._state

    def acquire(self) -> None:
        """Ask to make one call; raise ``BackendUnavailableError`` if refused.

        Every successful ``acquire`` must be followed by exactly one
        ``record_success`` or ``record_failure``.
        """
        with self._lock:
            if self._state == "closed":
                return
            if self._state == "open":
                wait_s = self._opened_at + self._cooldown_s - self._clock()
                if wait_s > 0:
                    raise BackendUnavailableError(
                        f"model backend for {self.name} is unavailable "
                        f"(circuit open, next probe in {wait_s:.1f} s)"
                    )
                self._set("half_open")
            # Half-open: one probe at a time; the rest wait for its verdict.
            if self._probe_in_flight:
                raise BackendUnavailableError(
                    f"model backend for {self.name} is unavailable "
                    "(circuit half-open, a probe is in flight)"
                )
            self._probe_in_flight = True

    def record_success(self) -> None:
        with self._lock:
            self._consecutive = 0
            self._probe_in_flight = False
            if self._state != "closed":
                self._set("closed")

    def record_failure(self) -> None:
        with self._lock:
            self._probe_in_flight = False
            self._consecutive += 1
            if self._state == "half_open" or (
                self._state == "closed" and self._consecutive >= self._failures_to_open
            ):
                self._opened_at = self._clock()
                self._set("open")

    def _set(self, state: BreakerState) -> None:
        self._state = state
        logger.log(
            logging.INFO if state == "closed" else logging.WARNING,
            "circuit breaker %s",
            state,
            extra={"model": self.name, "consecutive_failures": self._consecutive},
        )
        if self._on_change is not None:
            self._on_change(state)
