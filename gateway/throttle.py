"""The throttle action: a penalty bucket in Redis for clients policy throttles.

Policy (``gateway.policy``) decides that a client is throttled and for how
long; this module enforces the reduced rate. It runs ``lua/throttle.lua``, a
GCRA at ``rate / factor`` (burst ``burst / factor``, at least 1), where rate
is that of the slowest rule of the client's plan and burst the smallest of
its rules' (the ``limits`` section's ``rate_per_s`` and ``burst`` when the
plan has no rules), on one key
per client, ``{prefix}:{c:<client_id>}:throttle``, after the ordinary
admission has let the request through. It is kept apart from ``store.py`` and
``admit.lua`` so that plan limits and policy penalties can change independently.

Imports Redis and the gateway's config and store helpers; nothing from Kafka.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from gateway.config import LimitsConfig, PlanConfig, Settings
from gateway.store import RedisClient, check_client_id, redis_guard

logger = logging.getLogger(__name__)

THROTTLE_LUA: str = resources.files("gateway").joinpath("lua/throttle.lua").read_text()


@dataclass(frozen=True, slots=True)
class ThrottleCheck:
    """Requests of one throttled client in this batch.

    Parameters
    ----------
    client_id
        The client.
    factor
        Rate divisor (>= 1) policy set.
    count
        How many of its requests to decide, in batch order.
    rate_per_s, burst
        The client's own long-run rate and burst (its plan's slowest rate
        and tightest burst, see :func:`plan_rate`) that ``factor`` divides;
        ``None`` for the
        ``limits`` section's ``rate_per_s`` and ``burst``.
    """

    client_id: str
    factor: float
    count: int
    rate_per_s: float | None = None
    burst: int | None = None


def plan_rate(plan: PlanConfig) -> tuple[float, int] | None:
    """The long-run rate (requests per second) of ``plan``'s slowest GCRA
    rule, which is what bounds a client over time, and the smallest burst of
    any of its rules, which is what bounds it at once: the pair a penalty
    must divide to be tighter than every rule. ``None`` for a plan without
    rules.

    The slowest rule's own burst would not do: a long window's burst is
    large (a day rule of 100,000 allows 100,000 at once by default), so a
    client throttled by 4 could still send 25,000 requests at the fastest
    rule's full speed, outlasting the throttle itself.
    """
    if not plan.rules:
        return None
    slowest = min(plan.rules, key=lambda rule: rule.limit / rule.window_s)
    tightest = min(rule.effective_burst for rule in plan.rules)
    return slowest.limit / slowest.window_s, tightest


class ThrottleStore:
    """Penalty buckets of throttled clients.

    Parameters
    ----------
    redis
        An asyncio client with ``decode_responses=False``.
    settings
        ``redis.key_prefix``, ``redis.socket_timeout_s`` and ``limits``
        (``rate_per_s`` and ``burst``, which the factor divides).
    """

    def __init__(self, redis: RedisClient, settings: Settings) -> None:
        self._redis = redis
        self._prefix = settings.redis.key_prefix
        self._timeout_s = settings.redis.socket_timeout_s
        self._rate_per_s = settings.limits.rate_per_s
        self._burst = settings.limits.burst

    def set_limits(self, limits: LimitsConfig) -> None:
        """Follow a live change of ``limits.rate_per_s`` and ``limits.burst``
        from the next batch on."""
        self._rate_per_s = limits.rate_per_s
        self._burst = limits.burst

    def key(self, client_id: str) -> str:
        return f"{self._prefix}:{{c:{client_id}}}:throttle"

    async def check(self, checks: Sequence[ThrottleCheck]) -> list[list[int]]:
        """Decide every check's requests in one round trip.

        Returns
        -------
        list[list[int]]
            Per check, per request: 0 if it passes, else the retry-after in
            milliseconds.

        Raises
        ------
        StoreError
            Redis could not be reached or failed.
        """
        if not checks:
            return []
        # EVAL, not EVALSHA: only throttled clients pay for this round trip,
        # and the script is a few hundred bytes.
        pipe = self._redis.pipeline(transaction=False)
        for check in checks:
            check_client_id(check.client_id)
            if not (check.factor >= 1 and math.isfinite(check.factor)):
                raise ValueError("factor must be finite and at least 1")
            rate_per_s = (
                self._rate_per_s if check.rate_per_s is None else check.rate_per_s
            )
            burst = self._burst if check.burst is None else check.burst
            args: list[Any] = [
                repr(rate_per_s / check.factor),
                max(1, math.floor(burst / check.factor)),
                check.count,
            ]
            pipe.eval(THROTTLE_LUA, 1, self.key(check.client_id), *args)
        async with redis_guard("throttle", self._timeout_s, self._redis):
            replies = await pipe.execute()
        return [[int(v) for v in reply] for reply in replies]
