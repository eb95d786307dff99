"""The gateway's Redis client: one node or a cluster, built from the
settings (:func:`redis_from_settings`), and the guard every exchange passes
(:func:`redis_guard`: the timeout, the breaker, failures as ``StoreError``).

Re-exported from :mod:`gateway.store`, where every module imports them from.
Imports Redis and the gateway's config, errors and breaker; nothing from
Kafka, FastAPI or the detectors.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from redis import exceptions as redis_exc
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from gateway.config import Settings
from gateway.errors import StoreError
from gateway.redis_breaker import CircuitOpen, breaker_for, register_breaker

# What every Redis user in the gateway accepts: one node or a Redis Cluster.
# Both speak the same commands for what the gateway does (single-slot Lua
# scripts, non-transactional pipelines of single-key commands).
RedisClient = Redis | RedisCluster


def redis_from_settings(settings: Settings) -> RedisClient:
    """An asyncio Redis client for ``redis.url`` with the timeouts from config.

    With ``redis.cluster`` on, a :class:`~redis.asyncio.cluster.RedisCluster`
    that discovers the other nodes from the one ``redis.url`` names; same
    timeouts and retries either way.
    ``decode_responses`` stays off: snapshots and ciphertexts are bytes.
    Retries are few and short because callers also bound each operation by
    ``redis.socket_timeout_s`` (:func:`redis_guard`; breaker: ``redis.breaker_*``).
    ``redis.password``, if set, authenticates every connection (each node's,
    for a cluster); the URL never carries one (``RedisConfig`` refuses it).
    """
    password = settings.redis.password_value()
    timeout_s = settings.redis.socket_timeout_s
    retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), retries=2)
    # The same options for one node and a cluster; only the class differs.
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "decode_responses": False,
        "retry": retry,
        "password": password,
    }
    client: RedisClient
    if settings.redis.cluster:
        client = RedisCluster.from_url(settings.redis.url, **options)
    else:
        client = Redis.from_url(settings.redis.url, **options)
    register_breaker(
        client,
        settings.redis.breaker_cooldown_s,
        failures=settings.redis.breaker_failures,
        window_s=settings.redis.breaker_window_s,
    )
    return client


# Replies that mean "this server cannot do it right now" rather than "this call
# is wrong": out of memory, a replica after failover, a script cache emptied
# again between our load and our retry.
RETRIABLE_REPLIES = (
    redis_exc.OutOfMemoryError,
    redis_exc.ReadOnlyError,
    redis_exc.NoScriptError,
)


@contextlib.asynccontextmanager
async def redis_guard(
    operation: str, timeout_s: float, redis: RedisClient
) -> AsyncIterator[None]:
    """Bound a Redis exchange by ``timeout_s`` and turn failures into StoreError.

    Unreachable, timed out and busy-loading servers give a retriable
    ``STORE_UNAVAILABLE``; other errors the server answers with (out of memory
    or read-only is retriable, a script bug is not) also become ``StoreError``,
    chained.

    Each exchange passes the breaker of ``redis``, the client the block uses
    (``gateway.redis_breaker``): while it is open the guard raises the same
    ``STORE_UNAVAILABLE`` at once, without running the block.
    """
    breaker = breaker_for(redis)
    try:
        permit = breaker.acquire()
    except CircuitOpen as exc:
        raise StoreError(f"redis {operation}: {exc}") from exc
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except TimeoutError as exc:
        message = f"no answer within {timeout_s} s"
        breaker.failed(permit, waited=True, operation=operation, reason=message)
        raise StoreError(f"redis {operation}: {message}") from exc
    except (
        redis_exc.ConnectionError,
        redis_exc.TimeoutError,
        # Not a RedisError: a cluster client raises it when no startup node
        # answers or slots are uncovered. Retriable: the gateway's own calls
        # are single-slot by construction, so what is left is the topology.
        redis_exc.RedisClusterException,
    ) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        waited = isinstance(exc, redis_exc.TimeoutError)
        breaker.failed(permit, waited=waited, operation=operation, reason=reason)
        raise StoreError(f"redis {operation}: {reason}") from exc
    except redis_exc.RedisError as exc:
        # An error reply: the server is up and answering.
        breaker.succeeded(permit)
        raise StoreError(
            f"redis {operation}: {type(exc).__name__}: {exc}",
            retriable=isinstance(exc, RETRIABLE_REPLIES),
        ) from exc
    except BaseException:
        # Cancelled, or the caller's own error: no verdict on the server.
        breaker.abandoned(permit)
        raise
    else:
        breaker.succeeded(permit)


def check_decoding(redis: RedisClient) -> None:
    if redis.get_encoder().decode_responses:
        raise ValueError("the Redis client must have decode_responses=False")
