"""Redis-backed per-client counters: admission (dedupe, block, GCRA rate limit),
blocks, totals and detector-state snapshots.

Every key of one client shares the hash tag ``{c:<client_id>}``, so the Lua
admission script touches one slot and the layout works on Redis Cluster::

    {prefix}:{c:<client_id>}:tat             GCRA theoretical arrival time (us)
    {prefix}:{c:<client_id>}:block           present while blocked (value: reason)
    {prefix}:{c:<client_id>}:totals          hash: requests, refused
    {prefix}:{c:<client_id>}:day             hash: d (UTC day), requests, refused
    {prefix}:{c:<client_id>}:req:<request>   dedupe: delivery of the admitted copy
    {prefix}:{c:<client_id>}:state           detector snapshot (bytes)

Every key has an expiry. This module imports Redis and the gateway's config and
errors; nothing from Kafka, FastAPI or the detectors.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from redis import exceptions as redis_exc
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from gateway.config import Settings
from gateway.errors import StoreError

logger = logging.getLogger(__name__)

# Client ids become part of key names: no ':' or braces, so a client id cannot
# forge another client's hash tag or key path.
CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9._@-]{1,128}$")

Outcome = Literal["ok", "redelivery", "duplicate", "rate_limited", "blocked"]
_OUTCOMES: dict[str, Outcome] = {
    "ok": "ok",
    "redelivery": "redelivery",
    "duplicate": "duplicate",
    "rate_limited": "rate_limited",
    "blocked": "blocked",
}

# Totals outlive any billing or investigation window we have been asked for;
# an idle client's counters then go, so Redis cannot grow without bound.
TOTALS_TTL_S = 30 * 86_400
# The day hash must survive its whole UTC day plus a margin for late readers.
DAY_TTL_S = 2 * 86_400
# Request ids come from clients; longer ones are hashed so a key name stays
# small whatever the client sends.
_MAX_REQUEST_ID_IN_KEY = 128

ADMIT_LUA: bytes = resources.files("gateway").joinpath("lua/admit.lua").read_bytes()
ADMIT_SHA: str = hashlib.sha1(ADMIT_LUA).hexdigest()


def redis_from_settings(settings: Settings) -> Redis:
    """An asyncio Redis client for ``redis.url`` with the timeouts from config.

    ``decode_responses`` stays off: snapshots and ciphertexts are bytes.
    Retries are few and short because callers also bound each operation by
    ``redis.socket_timeout_s`` (see :func:`redis_guard`).
    """
    timeout_s = settings.redis.socket_timeout_s
    client: Redis = Redis.from_url(
        settings.redis.url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        decode_responses=False,
        retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), retries=2),
    )
    return client


# Replies that mean "this server cannot do it right now" rather than "this call
# is wrong": out of memory, a replica after failover, a script cache emptied
# again between our load and our retry.
_RETRIABLE_REPLIES = (
    redis_exc.OutOfMemoryError,
    redis_exc.ReadOnlyError,
    redis_exc.NoScriptError,
)


@contextlib.asynccontextmanager
async def redis_guard(operation: str, timeout_s: float) -> AsyncIterator[None]:
    """Bound a Redis exchange by ``timeout_s`` and turn failures into StoreError.

    Unreachable, timed out and busy-loading servers give a retriable
    ``STORE_UNAVAILABLE``; other errors the server answers with (out of memory
    or read-only is retriable, a script bug is not) also become ``StoreError``,
    chained.
    """
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except TimeoutError as exc:
        raise StoreError(f"redis {operation}: no answer within {timeout_s} s") from exc
    except (redis_exc.ConnectionError, redis_exc.TimeoutError) as exc:
        raise StoreError(f"redis {operation}: {type(exc).__name__}: {exc}") from exc
    except redis_exc.RedisError as exc:
        raise StoreError(
            f"redis {operation}: {type(exc).__name__}: {exc}",
            retriable=isinstance(exc, _RETRIABLE_REPLIES),
        ) from exc


def _check_decoding(redis: Redis) -> None:
    kwargs: dict[str, Any] = redis.connection_pool.connection_kwargs
    if kwargs.get("decode_responses"):
        raise ValueError("the Redis client must have decode_responses=False")


@dataclass(frozen=True, slots=True)
class AdmitItem:
    """One request to admit.

    Parameters
    ----------
    client_id
        The client, from its API key (never from the payload).
    request_id
        The client's request id; repeated ids are duplicates.
    delivery
        Identifies the Kafka record (``"partition:offset"``), to tell a
        redelivery of the same record from a client resending the same id.
    rate_per_s, burst
        GCRA limits: ``burst`` requests at once, then ``rate_per_s``.
    cost
        Cells this request uses, ``1 <= cost <= burst`` (a larger cost could
        never be admitted).
    """

    client_id: str
    request_id: str
    delivery: str
    rate_per_s: float
    burst: int
    cost: int = 1

    def __post_init__(self) -> None:
        check_client_id(self.client_id)
        if not (self.rate_per_s > 0 and math.isfinite(self.rate_per_s)):
            raise ValueError("rate_per_s must be positive and finite")
        if self.burst < 1:
            raise ValueError("burst must be at least 1")
        if not 1 <= self.cost <= self.burst:
            raise ValueError("cost must be between 1 and burst")


@dataclass(frozen=True, slots=True)
class Admission:
    """What the store decided for one item.

    ``outcome`` is ``ok`` (admitted and counted), ``redelivery`` (this Kafka
    record was admitted before, e.g. before a crash: answer it again, it is
    not counted again), ``duplicate`` (another record with this request id was
    admitted), ``rate_limited`` or ``blocked``. ``retry_after_ms`` is set for
    the last two (0 otherwise). ``client_requests`` is the client's total of
    admitted requests after this item.
    """

    outcome: Outcome
    retry_after_ms: int
    client_requests: int
    # The binding rate window after this item (see ``protocol.RateInfo``):
    # ``limit`` = burst, ``remaining`` = whole cells the GCRA would still
    # admit at once, ``reset_ms`` = time until the TAT falls back to now (the
    # bucket is full again), ``window_s`` = burst / rate, the time one full
    # burst takes to drain back. 0 everywhere when unknown.
    limit: int = 0
    remaining: int = 0
    reset_ms: int = 0
    window_s: float = 0.0

    @property
    def serve(self) -> bool:
        """Whether the request should be answered with a prediction."""
        return self.outcome in ("ok", "redelivery")


@dataclass(frozen=True, slots=True)
class GcraDecision:
    allowed: bool
    tat_us: float
    retry_after_us: float


def gcra(
    tat_us: float | None, now_us: float, rate_per_s: float, burst: int, cost: int = 1
) -> GcraDecision:
    """The GCRA step ``admit.lua`` performs, in Python, as a reference.

    Emission interval ``T = 1e6 / rate_per_s`` us and tolerance
    ``tau = T * (burst - 1)``. A request is allowed iff
    ``now >= max(TAT, now) + T * cost - T * burst`` (for ``cost`` 1:
    ``now >= TAT - tau``); then ``TAT = max(TAT, now) + T * cost``. A refusal
    leaves the TAT alone and waits ``TAT - tau - now`` (cost 1).

    Examples
    --------
    >>> d = gcra(None, 0.0, rate_per_s=10, burst=5)
    >>> d.allowed, d.tat_us
    (True, 100000.0)
    >>> gcra(500_000.0, 0.0, rate_per_s=10, burst=5).retry_after_us
    100000.0
    """
    interval = 1e6 / rate_per_s
    base = now_us if tat_us is None else max(tat_us, now_us)
    new_tat = base + interval * cost
    allow_at = new_tat - interval * burst
    if now_us < allow_at:
        unchanged = now_us if tat_us is None else tat_us
        return GcraDecision(False, unchanged, allow_at - now_us)
    return GcraDecision(True, new_tat, 0.0)


class CounterStore:
    """Per-client admission counters, blocks and detector snapshots in Redis.

    Parameters
    ----------
    redis
        An asyncio client with ``decode_responses=False``.
        TODO: only a single Redis node is supported: a ``RedisCluster`` client
        would need its own pipeline (one per node) and ``SCRIPT LOAD`` on
        every primary; the key layout is already cluster-safe, so only
        ``_run_admit`` and ``load_scripts`` would change.
    settings
        ``redis.key_prefix``, ``redis.socket_timeout_s`` (bounds every
        operation), ``auth.replay_window_s`` (dedupe lifetime) and
        ``limits.count_refused`` (whether refused requests still use up rate)
        and ``policy.block_cooldown_s`` (default block length).
    """

    def __init__(self, redis: Redis, settings: Settings) -> None:
        _check_decoding(redis)
        self._redis = redis
        self._prefix = settings.redis.key_prefix
        self._timeout_s = settings.redis.socket_timeout_s
        self._replay_ms = max(1, round(settings.auth.replay_window_s * 1000))
        self._count_refused = settings.limits.count_refused
        self._default_cooldown_s = settings.policy.block_cooldown_s

    def client_key(self, client_id: str, suffix: str) -> str:
        """``{prefix}:{c:<client_id>}:<suffix>``."""
        return f"{self._prefix}:{{c:{client_id}}}:{suffix}"

    def request_key(self, client_id: str, request_id: str) -> str:
        """The dedupe key of one request id."""
        if len(request_id) > _MAX_REQUEST_ID_IN_KEY:
            request_id = "sha256:" + hashlib.sha256(request_id.encode()).hexdigest()
        return self.client_key(client_id, "req:" + request_id)

    async def load_scripts(self) -> None:
        """Load the admission script now rather than on the first batch (which
        would otherwise pay two extra round trips for ``NOSCRIPT``)."""
        async with redis_guard("script load", self._timeout_s):
            await self._redis.script_load(ADMIT_LUA)

    # Step: admission ------------------------------------------------------------

    async def admit_batch(self, items: Sequence[AdmitItem]) -> list[Admission]:
        """Admit a batch: dedupe, block check, GCRA and counting, per item.

        One network round trip: one ``EVALSHA`` per client, in item order within
        the client, all in a single non-transactional pipeline. Only if the
        server has lost the script (restart, ``SCRIPT FLUSH``) does it load it
        and retry the affected clients once. redis-py's ``register_script``
        is not used: in a pipeline it sends ``SCRIPT EXISTS`` before every
        execute, a second round trip per batch.

        A client's items are decided in order against one server-clock reading;
        different clients are independent. Retrying a batch after an error is
        safe: admitted items come back as ``redelivery``.

        Returns
        -------
        list[Admission]
            One per item, in the order of ``items``.

        Raises
        ------
        StoreError
            Redis could not be reached or failed (``STORE_UNAVAILABLE``).
        """
        if not items:
            return []

        # Group by client, keeping each client's items in batch order.
        groups: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(item.client_id, []).append(index)
        calls = [
            (indices, self._admit_call(items, indices)) for indices in groups.values()
        ]

        async with redis_guard("admit", self._timeout_s):
            replies = await self._run_admit([call for _, call in calls])
            missing = [
                i
                for i, r in enumerate(replies)
                if isinstance(r, redis_exc.NoScriptError)
            ]
            if missing:
                logger.info("admission script missing on server; loading it")
                await self._redis.script_load(ADMIT_LUA)
                retried = await self._run_admit([calls[i][1] for i in missing])
                for i, reply in zip(missing, retried, strict=True):
                    replies[i] = reply

        results: list[Admission | None] = [None] * len(items)
        for (indices, _), reply in zip(calls, replies, strict=True):
            if isinstance(reply, Exception):
                raise StoreError(
                    f"redis admit: {type(reply).__name__}: {reply}",
                    retriable=isinstance(reply, _RETRIABLE_REPLIES),
                ) from reply
            for index, row in zip(indices, reply, strict=True):
                results[index] = _admission(row, items[index])

        admissions = [a for a in results if a is not None]
        if logger.isEnabledFor(logging.DEBUG):
            refused = sum(1 for a in admissions if not a.serve)
            logger.debug(
                "admitted batch",
                extra={"items": len(items), "clients": len(groups), "refused": refused},
            )
        return admissions

    def _admit_call(self, items: Sequence[AdmitItem], indices: list[int]) -> list[Any]:
        client_id = items[indices[0]].client_id
        keys: list[Any] = [
            self.client_key(client_id, "tat"),
            self.client_key(client_id, "block"),
            self.client_key(client_id, "totals"),
            self.client_key(client_id, "day"),
        ]
        args: list[Any] = [
            self._replay_ms,
            "1" if self._count_refused else "0",
            TOTALS_TTL_S * 1000,
            DAY_TTL_S * 1000,
        ]
        for index in indices:
            item = items[index]
            keys.append(self.request_key(client_id, item.request_id))
            args.extend(
                (item.delivery, repr(float(item.rate_per_s)), item.burst, item.cost)
            )
        return [len(keys), *keys, *args]

    async def _run_admit(self, calls: list[list[Any]]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for call in calls:
            pipe.evalsha(ADMIT_SHA, *call)
        # Errors come back in place so one client's failure (e.g. NOSCRIPT) does
        # not hide the others' results, which have already been applied.
        return await pipe.execute(raise_on_error=False)

    # Step: blocks ---------------------------------------------------------------

    async def block(
        self, client_id: str, cooldown_s: float | None, reason: str
    ) -> None:
        """Block a client for ``cooldown_s`` (``None``: ``policy.block_cooldown_s``).

        Admission then answers ``blocked`` with the remaining time; the block
        lifts by itself. Blocking again replaces the cool-down.
        """
        check_client_id(client_id)
        if cooldown_s is None:
            cooldown_s = self._default_cooldown_s
        if not (cooldown_s > 0 and math.isfinite(cooldown_s)):
            raise ValueError("cooldown_s must be positive and finite")
        async with redis_guard("block", self._timeout_s):
            await self._redis.set(
                self.client_key(client_id, "block"),
                reason.encode(),
                px=max(1, round(cooldown_s * 1000)),
            )
        logger.info(
            "client blocked",
            extra={"client": client_id, "cooldown_s": cooldown_s, "reason": reason},
        )

    async def unblock(self, client_id: str) -> bool:
        """Lift a block early. Returns whether the client was blocked."""
        check_client_id(client_id)
        async with redis_guard("unblock", self._timeout_s):
            removed = await self._redis.delete(self.client_key(client_id, "block"))
        if removed:
            logger.info("client unblocked", extra={"client": client_id})
        return bool(removed)

    async def release_requests(self, requests: Sequence[tuple[str, str]]) -> None:
        """Forget that these (client id, request id) pairs were admitted.

        For requests admitted but then not served (model failure, a block
        decided after admission): the client's retry under the same id must be
        served, not refused as a duplicate. One round trip for all of them.
        """
        if not requests:
            return
        keys = [self.request_key(client, request) for client, request in requests]
        # One DEL per key, pipelined: keys of different clients live in
        # different hash slots, which a multi-key DEL would refuse on a cluster.
        async with (
            redis_guard("release", self._timeout_s),
            self._redis.pipeline(transaction=False) as pipe,
        ):
            for key in keys:
                pipe.delete(key)
            await pipe.execute()

    async def is_blocked(self, client_id: str) -> bool:
        check_client_id(client_id)
        async with redis_guard("is_blocked", self._timeout_s):
            return bool(await self._redis.exists(self.client_key(client_id, "block")))

    async def client_counters(self, client_id: str) -> dict[str, int]:
        """A client's counters in one round trip.

        Returns
        -------
        dict[str, int]
            ``requests`` and ``refused`` (totals), ``day_requests`` and
            ``day_refused`` (current UTC day, server clock) and ``blocked_ms``
            (remaining block, 0 if none).
        """
        check_client_id(client_id)
        async with redis_guard("client_counters", self._timeout_s):
            pipe = self._redis.pipeline(transaction=False)
            pipe.time()
            pipe.hgetall(self.client_key(client_id, "totals"))
            pipe.hgetall(self.client_key(client_id, "day"))
            pipe.pttl(self.client_key(client_id, "block"))
            (seconds, _), totals, day, block_pttl = await pipe.execute()

        today = int(seconds) // 86_400
        current = day if int(day.get(b"d", -1)) == today else {}
        return {
            "requests": int(totals.get(b"requests", 0)),
            "refused": int(totals.get(b"refused", 0)),
            "day_requests": int(current.get(b"requests", 0)),
            "day_refused": int(current.get(b"refused", 0)),
            "blocked_ms": max(int(block_pttl), 0),
        }

    # Step: detector snapshots --------------------------------------------------

    async def save_states(self, states: Mapping[str, bytes], ttl_s: float) -> None:
        """Store each client's detector snapshot, in one round trip, for
        ``ttl_s`` (the new owner after a rebalance reads it on first sight)."""
        if not states:
            return
        ttl_ms = max(1, round(ttl_s * 1000))
        async with redis_guard("save_states", self._timeout_s):
            pipe = self._redis.pipeline(transaction=False)
            for client_id, blob in states.items():
                check_client_id(client_id)
                pipe.set(self.client_key(client_id, "state"), blob, px=ttl_ms)
            await pipe.execute()
        logger.debug("saved detector states", extra={"clients": len(states)})

    async def load_states(self, client_ids: Iterable[str]) -> dict[str, bytes]:
        """Snapshots of the given clients, in one round trip; absent ones are
        left out."""
        ids = list(dict.fromkeys(client_ids))
        for client_id in ids:
            check_client_id(client_id)
        if not ids:
            return {}
        async with redis_guard("load_states", self._timeout_s):
            pipe = self._redis.pipeline(transaction=False)
            for client_id in ids:
                pipe.get(self.client_key(client_id, "state"))
            blobs = await pipe.execute()
        return {
            cid: blob for cid, blob in zip(ids, blobs, strict=True) if blob is not None
        }


def check_client_id(client_id: str) -> None:
    """Raise ``ValueError`` unless ``client_id`` may appear in Redis keys."""
    if not CLIENT_ID_PATTERN.fullmatch(client_id):
        raise ValueError(f"client_id must match {CLIENT_ID_PATTERN.pattern}")


def _admission(row: list[Any], item: AdmitItem) -> Admission:
    name = row[0].decode() if isinstance(row[0], bytes) else str(row[0])
    outcome = _OUTCOMES.get(name)
    if outcome is None:
        raise StoreError(f"redis admit: unexpected outcome {name!r}", retriable=False)
    limit, remaining, reset_ms, window_s = rate_window(
        int(row[3]) if len(row) > 3 else 0, item.rate_per_s, item.burst
    )
    return Admission(
        outcome=outcome,
        retry_after_ms=int(row[1]),
        client_requests=int(row[2]),
        limit=limit,
        remaining=remaining,
        reset_ms=reset_ms,
        window_s=window_s,
    )


def rate_window(
    tat_ahead_us: float, rate_per_s: float, burst: int
) -> tuple[int, int, int, float]:
    """The single GCRA window as (limit, remaining, reset_ms, window_s).

    A GCRA with emission interval ``T`` and ``burst`` cells is a token bucket
    of ``burst`` tokens refilled one per ``T``; the TAT running ``ahead`` of
    now means ``ceil(ahead / T)`` tokens are spent. So ``remaining`` is
    ``burst - ceil(ahead / T)``, ``reset_ms`` is ``ahead`` (the bucket is full
    once the TAT is reached) and ``window_s`` is ``burst * T``: a client that
    spends a full burst waits that long to have it all back.

    Examples
    --------
    >>> rate_window(0, rate_per_s=10, burst=5)
    (5, 5, 0, 0.5)
    >>> rate_window(100_000, rate_per_s=10, burst=5)
    (5, 4, 100, 0.5)
    """
    interval_us = 1e6 / rate_per_s
    ahead_us = max(float(tat_ahead_us), 0.0)
    spent = math.ceil(ahead_us / interval_us - 1e-9)
    remaining = min(max(burst - spent, 0), burst)
    return burst, remaining, math.ceil(ahead_us / 1000), burst / rate_per_s
