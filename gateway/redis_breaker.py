"""A circuit breaker for one Redis client, shared by every coroutine using it.

A hung Redis (a stopped process, a network black hole) answers nothing, so
each call waits out its whole timeout; a batch makes several calls, and
without a breaker every batch paid all of them. With it, ``failures``
consecutive failed calls open the breaker (a success in between starts the
count again), and for ``cooldown_s`` every call is refused at once (the
caller raises the same retriable error the timeout would have, without the
wait). Then the breaker is half-open: exactly one call goes through as a
probe while the others are still refused; the probe's success closes the
breaker, its failure opens it again at once for another cool-down.

The threshold trades two costs. Opening on one failure spends a whole
cool-down of fail-mode answers on a one-off blip (one timeout, one
connection that failed after redis-py's retries). A threshold of ``n``
lets a hung Redis cost at most ``n`` timeouts in a row before the breaker
opens, once per outage: after that, failed probes reopen it at once. The
configured default, 3 (``redis.breaker_failures``), rides out an isolated
failure and a second one close behind it, for at most two extra timeouts
(4 s at the default 2 s ``redis.socket_timeout_s``) when Redis really hangs.

Failures in a row are counted only while they come close together: a
failure counts towards the threshold only if its call began within
``window_s`` (``redis.breaker_window_s``, 10 s by default) of the previous
failure of the run; otherwise it starts a new run, of one. So three blips
minutes apart, with no call in between, do not open the breaker. The gap is
measured to the start of the failing call, not to its end, because a hung
Redis makes each call wait its whole timeout first: calls that fail back to
back against it are 0 s apart whatever ``redis.socket_timeout_s`` is, so the
window never keeps a hung Redis from opening the breaker. ``window_s`` 0
counts every failure in a row however far apart (the behaviour before the
window existed).

Calls that were already under way when the breaker opened (and the stale
verdicts they bring back later) do not move it: only calls admitted since
the breaker last closed (or was made) count towards opening it or reset
that count, and only the probe can close it. That is what keeps the state
right when many coroutines share one breaker.

The breaker is driven by :func:`gateway.store.redis_guard`, which finds a
client's breaker here (:func:`breaker_for`). The state machine talks to no
server, so its tests need no Redis and no sleeping: the clock is injected. It
belongs to one event loop: transitions run between awaits, so they need no
lock (a metrics scrape from another thread only reads counters). This module
imports the gateway's config and redis-py's client types, nothing else of
the gateway.

One breaker guards one client: a Redis Cluster client has one for all its
nodes, so one hung node makes every call fail fast for a cool-down, even
those for healthy nodes.

The backends' breaker (``gateway.backends.breaker``) also counts
consecutive failures, but lets any late success close it; Redis cannot
afford that (a straggler's success while Redis is still hung would close it
again).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.config import RedisConfig

logger = logging.getLogger(__name__)

BreakerState = Literal["closed", "half_open", "open"]

# For the metrics gauge, as the backends' breaker gauge: larger means less
# traffic gets through.
STATE_LEVEL: dict[BreakerState, int] = {"closed": 0, "half_open": 1, "open": 2}


class CircuitOpen(Exception):
    """A call refused without trying: the breaker is open or a probe runs.

    ``retry_in_s`` is the time left before the next probe may go (0 while
    half-open: a probe is in flight and its verdict is near).
    """

    def __init__(self, target: str, state: BreakerState, retry_in_s: float) -> None:
        self.target = target
        self.state = state
        self.retry_in_s = retry_in_s
        if state == "open":
            detail = f"circuit open, next probe in {retry_in_s:.1f} s"
        else:
            detail = "circuit half-open, a probe is in flight"
        super().__init__(f"{target}: {detail}")


@dataclass(eq=False, slots=True)
class Permit:
    """Leave to make one call, to be settled exactly once.

    ``probe`` says this call decides a half-open breaker; ``generation`` is
    the number of openings before it was granted, so a verdict that arrives
    after the breaker has moved on is recognised as stale.
    """

    probe: bool
    generation: int
    # Clock reading when the call was allowed, for the failure window.
    started_at: float = 0.0


@dataclass(slots=True)
class BreakerStats:
    """Counters since the breaker was made (monotonic, for metrics).

    ``opens`` counts every entry into ``open`` (the failure that reached the
    threshold and each failed probe), ``closes`` every return to ``closed``,
    ``rejected`` the calls refused at once, ``waited`` the calls that failed
    only after waiting out their timeout (whether or not they moved the
    breaker), ``probes`` the calls let through while half-open.
    """

    opens: int = 0
    closes: int = 0
    rejected: int = 0
    waited: int = 0
    probes: int = 0


@dataclass(frozen=True, slots=True)
class _Outage:
    since: float
    rejected_before: int


class RedisBreaker:
    """Open after ``failures`` failures in a row (each call begun within
    ``window_s`` of the failure before it), refuse for ``cooldown_s``, then
    probe once.

    Parameters
    ----------
    target
        What the client connects to (``host:port/db``, never a password), for
        messages and logs.
    cooldown_s
        Seconds the breaker stays open before one call may probe.
    failures
        Consecutive failed calls, admitted while closed, that open the
        breaker (>= 1; 1 opens on the first failure). A successful call, an
        error reply included, starts the count again. The gateway passes
        ``redis.breaker_failures`` (3 unless configured).
    window_s
        Seconds: a failure whose call began more than this after the previous
        counted failure starts the count again, at 1 (>= 0; 0 never does).
        The gateway passes ``redis.breaker_window_s`` (10 unless configured).
    clock
        Monotonic seconds; injectable so tests need not sleep.

    Raises
    ------
    ValueError
        ``cooldown_s`` is not positive, ``failures`` is below 1 or
        ``window_s`` is negative.

    Examples
    --------
    >>> now = [0.0]
    >>> breaker = RedisBreaker(
    ...     "127.0.0.1:6379/0", 5.0, failures=2, clock=lambda: now[0]
    ... )
    >>> for _ in range(2):
    ...     permit = breaker.acquire()
    ...     breaker.failed(permit, waited=True, operation="admit", reason="timeout")
    ...     print(breaker.state)
    closed
    open
    >>> now[0] = 5.0
    >>> probe = breaker.acquire()
    >>> probe.probe, breaker.state
    (True, 'half_open')
    >>> breaker.succeeded(probe)
    >>> breaker.state
    'closed'
    """

    def __init__(
        self,
        target: str,
        cooldown_s: float,
        *,
        failures: int = 1,
        window_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not cooldown_s > 0:
            raise ValueError("cooldown_s must be positive")
        if failures < 1:
            raise ValueError(f"failures must be at least 1, got {failures}")
        if not window_s >= 0:
            raise ValueError(f"window_s must not be negative, got {window_s}")
        self.target = target
        self.cooldown_s = cooldown_s
        self.failures = failures
        self.window_s = window_s
        self.stats = BreakerStats()
        self._clock = clock
        self._state: BreakerState = "closed"
        # Failed calls in a row since the last success, opening or close.
        self._consecutive = 0
        # Clock reading of the last failure counted in ``_consecutive``.
        self._last_failure_at = 0.0
        self._generation = 0
        self._opened_at = 0.0
        self._probe: Permit | None = None
        # The outage in progress (first opening until the close), for the
        # close's log line.
        self._outage: _Outage | None = None

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def probe_in_s(self) -> float:
        """Seconds until the next call may probe: 0 unless open and cooling
        down."""
        if self._state != "open":
            return 0.0
        return max(0.0, self._opened_at + self.cooldown_s - self._clock())

    def acquire(self) -> Permit:
        """Ask to make one call.

        Returns
        -------
        Permit
            Settle it exactly once, with :meth:`succeeded`, :meth:`failed` or
            :meth:`abandoned`.

        Raises
        ------
        CircuitOpen
            The breaker is open (cool-down not over) or half-open with a probe
            in flight.
        """
        if self._state == "closed":
            return Permit(
                probe=False, generation=self._generation, started_at=self._clock()
            )
        if self._state == "open":
            wait_s = self.probe_in_s
            if wait_s > 0:
                self.stats.rejected += 1
                raise CircuitOpen(self.target, "open", wait_s)
            self._state = "half_open"
            logger.debug("redis breaker half-open", extra={"redis": self.target})
        if self._probe is not None:
            self.stats.rejected += 1
            raise CircuitOpen(self.target, "half_open", 0.0)
        self._probe = Permit(
            probe=True, generation=self._generation, started_at=self._clock()
        )
        self.stats.probes += 1
        return self._probe

    def succeeded(self, permit: Permit) -> None:
        """The call got an answer (an error reply counts: the server is up)."""
        if permit is not self._probe:
            if self._state == "closed" and permit.generation == self._generation:
                self._consecutive = 0
            # Otherwise a straggler from before an opening: Redis answering
            # it says little about Redis now, and only the probe may close
            # the breaker.
            return
        self._probe = None
        self._state = "closed"
        self.stats.closes += 1
        outage = self._outage
        self._outage = None
        if outage is not None:
            logger.info(
                "redis breaker closed: redis answers again",
                extra={
                    "redis": self.target,
                    "open_s": round(self._clock() - outage.since, 3),
                    "rejected": self.stats.rejected - outage.rejected_before,
                },
            )

    def failed(
        self, permit: Permit, *, waited: bool, operation: str, reason: str
    ) -> None:
        """The call timed out (``waited``) or could not reach the server.

        ``operation`` and ``reason`` (an exception's type and message, no
        payload) go to the log line of an opening.
        """
        if waited:
            self.stats.waited += 1
        if permit is self._probe:
            self._probe = None
            self._open()
            logger.debug(
                "redis breaker probe failed; open again",
                extra={"redis": self.target, "operation": operation, "reason": reason},
            )
            return
        if self._state != "closed" or permit.generation != self._generation:
            # Already open (another call saw the failure first), or a
            # straggler from before an earlier opening: nothing new.
            return
        now = self._clock()
        if (
            self.window_s > 0
            and self._consecutive > 0
            and permit.started_at - self._last_failure_at > self.window_s
        ):
            # Begun long after the run's last failure, with nothing heard in
            # between: an unrelated blip, not the same outage.
            self._consecutive = 0
        self._consecutive += 1
        self._last_failure_at = now
        if self._consecutive < self.failures:
            logger.debug(
                "redis call failed; breaker stays closed",
                extra={
                    "redis": self.target,
                    "operation": operation,
                    "reason": reason,
                    "failures": self._consecutive,
                },
            )
            return
        self._open()
        self._outage = _Outage(self._opened_at, self.stats.rejected)
        logger.warning(
            "redis breaker open: calls fail at once for %.1f s, then one probes",
            self.cooldown_s,
            extra={
                "redis": self.target,
                "operation": operation,
                "reason": reason,
                "failures": self.failures,
                "window_s": self.window_s,
                "cooldown_s": self.cooldown_s,
            },
        )

    def abandoned(self, permit: Permit) -> None:
        """The call ended with no verdict on Redis (cancelled, or an error of
        the caller's own). A probe's slot is freed for the next call."""
        if permit is self._probe:
            self._probe = None

    def _open(self) -> None:
        self._state = "open"
        self._opened_at = self._clock()
        self._generation += 1
        self._consecutive = 0
        self.stats.opens += 1


# One breaker per client, so every store sharing a client (all of a worker's)
# shares its verdict on the server; a breaker goes when its client does.
_BREAKERS: weakref.WeakKeyDictionary[Redis | RedisCluster, RedisBreaker] = (
    weakref.WeakKeyDictionary()
)


def register_breaker(
    redis: Redis | RedisCluster,
    cooldown_s: float,
    *,
    failures: int = 1,
    window_s: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
) -> RedisBreaker:
    """Give ``redis`` a fresh breaker with ``cooldown_s``, ``failures`` and
    ``window_s`` (see :class:`RedisBreaker`) and return it (``clock``:
    monotonic seconds, for tests)."""
    breaker = RedisBreaker(
        _target(redis),
        cooldown_s,
        failures=failures,
        window_s=window_s,
        clock=clock,
    )
    _BREAKERS[redis] = breaker
    return breaker


def breaker_for(redis: Redis | RedisCluster) -> RedisBreaker:
    """The breaker of ``redis``: the registered one, or (for a client not made
    by :func:`gateway.store.redis_from_settings`) one with the default
    ``redis.breaker_cooldown_s``, ``redis.breaker_failures`` and
    ``redis.breaker_window_s``, made on first use."""
    breaker = _BREAKERS.get(redis)
    if breaker is None:
        fields = RedisConfig.model_fields
        breaker = register_breaker(
            redis,
            fields["breaker_cooldown_s"].default,
            failures=fields["breaker_failures"].default,
            window_s=fields["breaker_window_s"].default,
        )
    return breaker


def _target(redis: Redis | RedisCluster) -> str:
    # From the pool's parameters, never the URL: that may hold a password.
    if isinstance(redis, RedisCluster):
        return "cluster via " + ",".join(sorted(redis.nodes_manager.startup_nodes))
    kwargs = redis.connection_pool.connection_kwargs
    where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
    return f"{where}/{kwargs.get('db', 0)}"
