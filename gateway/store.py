"""Redis-backed per-client counters: admission (dedupe, block, the plan's GCRA
windows, daily quota and in-flight cap), blocks, totals and detector-state
snapshots.

Every key of one client shares the hash tag ``{c:<client_id>}``, so the Lua
admission script touches one slot and the layout works on Redis Cluster::

    {prefix}:{c:<client_id>}:tat:<window_ms> GCRA theoretical arrival time (us)
    {prefix}:{c:<client_id>}:inflight        sorted set: admitted, unanswered
    {prefix}:{c:<client_id>}:block           present while blocked (value: reason)
    {prefix}:{c:<client_id>}:totals          hash: requests, refused
    {prefix}:{c:<client_id>}:day             hash: d (UTC day), requests, refused
    {prefix}:{c:<client_id>}:req:<request>   dedupe: delivery of the admitted copy
    {prefix}:{c:<client_id>}:state           detector snapshot (bytes)

Every key has an expiry (API-key records, in ``gateway.keys``, are the one
exception, kept for audit). This module imports Redis and the gateway's config and
errors; nothing from Kafka, FastAPI or the detectors.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from redis import exceptions as redis_exc
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from gateway.config import FailMode, LimitsConfig, PlanConfig, RateRule, Settings
from gateway.errors import StoreError
from gateway.redis_breaker import CircuitOpen, breaker_for, register_breaker

logger = logging.getLogger(__name__)

# Client ids become part of key names: no ':' or braces, so a client id cannot
# forge another client's hash tag or key path.
CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9._@-]{1,128}$")

Outcome = Literal[
    "ok",
    "redelivery",
    "duplicate",
    "rate_limited",
    "blocked",
    "quota_exceeded",
    "too_many_in_flight",
    "store_unavailable",
]
_OUTCOMES: dict[str, Outcome] = {
    "ok": "ok",
    "redelivery": "redelivery",
    "duplicate": "duplicate",
    "rate_limited": "rate_limited",
    "blocked": "blocked",
    "quota_exceeded": "quota_exceeded",
    "too_many_in_flight": "too_many_in_flight",
}

# Totals outlive any billing or investigation window we have been asked for;
# an idle client's counters then go, so Redis cannot grow without bound.
TOTALS_TTL_S = 30 * 86_400
# The day hash must survive its whole UTC day plus a margin for late readers.
DAY_TTL_S = 2 * 86_400
_MAX_COMPILED_PLANS = 10_000
# Request ids come from clients; longer ones are hashed so a key name stays
# small whatever the client sends.
_MAX_REQUEST_ID_IN_KEY = 128

ADMIT_LUA: bytes = resources.files("gateway").joinpath("lua/admit.lua").read_bytes()
ADMIT_SHA: str = hashlib.sha1(ADMIT_LUA).hexdigest()

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
    """
    timeout_s = settings.redis.socket_timeout_s
    retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), retries=2)
    if settings.redis.cluster:
        cluster: RedisCluster = RedisCluster.from_url(
            settings.redis.url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=False,
            retry=retry,
        )
        register_breaker(
            cluster,
            settings.redis.breaker_cooldown_s,
            failures=settings.redis.breaker_failures,
            window_s=settings.redis.breaker_window_s,
        )
        return cluster
    client: Redis = Redis.from_url(
        settings.redis.url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        decode_responses=False,
        retry=retry,
    )
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
_RETRIABLE_REPLIES = (
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
            retriable=isinstance(exc, _RETRIABLE_REPLIES),
        ) from exc
    except BaseException:
        # Cancelled, or the caller's own error: no verdict on the server.
        breaker.abandoned(permit)
        raise
    else:
        breaker.succeeded(permit)


def _check_decoding(redis: RedisClient) -> None:
    if redis.get_encoder().decode_responses:
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
        A single 1 s GCRA rule (``burst`` requests at once, then
        ``rate_per_s``) that replaces the plan, for callers that set the
        limit themselves (the benchmark); both or neither.
    cost
        Cells this request uses in each GCRA window, ``1 <= cost <= burst``
        of every rule (a larger cost could never be admitted).
    plan
        The key's plan (``ApiKey.plan``), looked up in the store's current
        :class:`~gateway.config.LimitsConfig`.
    overrides
        The key's own overrides of that plan (``ApiKey.limit_overrides``):
        canonical JSON of some :class:`~gateway.config.PlanConfig` fields,
        or ``""`` for none.
    """

    client_id: str
    request_id: str
    delivery: str
    rate_per_s: float | None = None
    burst: int | None = None
    cost: int = 1
    plan: str = "default"
    overrides: str = ""

    def __post_init__(self) -> None:
        check_client_id(self.client_id)
        if (self.rate_per_s is None) != (self.burst is None):
            raise ValueError("give both rate_per_s and burst, or neither")
        if self.rate_per_s is not None and not (
            self.rate_per_s > 0 and math.isfinite(self.rate_per_s)
        ):
            raise ValueError("rate_per_s must be positive and finite")
        if self.burst is not None and self.burst < 1:
            raise ValueError("burst must be at least 1")
        if self.cost < 1 or (self.burst is not None and self.cost > self.burst):
            raise ValueError("cost must be between 1 and burst")


@dataclass(frozen=True, slots=True)
class Admission:
    """What the store decided for one item.

    ``outcome`` is ``ok`` (admitted and counted), ``redelivery`` (this Kafka
    record was admitted before, e.g. before a crash: answer it again, it is
    not counted again), ``duplicate`` (another record with this request id was
    admitted), ``rate_limited``, ``blocked``, ``quota_exceeded`` (the UTC
    day's quota is used up), ``too_many_in_flight`` or ``store_unavailable``
    (Redis unreachable and a rule in ``closed`` fail mode).
    ``retry_after_ms`` is the wait the refusal implies (0 when unknown or
    not refused). ``client_requests`` is the client's total of admitted
    requests after this item.

    ``limit``, ``remaining``, ``reset_ms`` and ``window_s`` describe the
    binding window after this decision: the GCRA rule (or daily quota) with
    the fewest requests left. ``limit`` is what that window lets through at
    once (a rule's burst, the quota), ``remaining`` how many more would pass
    now, ``reset_ms`` when it is full again, ``window_s`` its length. All 0
    when the plan has neither rules nor quota, or Redis was not consulted.
    ``in_flight`` says the item holds an in-flight slot (release it with
    :meth:`CounterStore.release_in_flight` once answered); ``without_store``
    that the decision was made without Redis (fail mode ``open``/``closed``).
    """

    outcome: Outcome
    retry_after_ms: int
    client_requests: int
    limit: int = 0
    remaining: int = 0
    reset_ms: int = 0
    window_s: float = 0.0
    in_flight: bool = False
    without_store: bool = False

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


# eq=False: compared and hashed by identity, which is what grouping a batch by
# plan needs, and cheap (hashing the nested PlanConfig per item is not).
@dataclass(frozen=True, slots=True, eq=False)
class CompiledPlan:
    """A plan with a key's overrides applied, ready to be script arguments.

    ``tat_suffixes`` name the rules' TAT keys (one per window, so a rule keeps
    its state when its limit changes); ``rule_args`` are the script's
    per-rule arguments; ``fail_modes`` the effective fail mode of each rule,
    then the quota's and the in-flight cap's (when the plan has them).
    """

    plan: PlanConfig
    count_refused: bool
    tat_suffixes: tuple[str, ...]
    rule_args: tuple[Any, ...]
    fail_modes: tuple[FailMode, ...]


def compile_plan(limits: LimitsConfig, plan: PlanConfig) -> CompiledPlan:
    """Resolve ``plan``'s defaults against ``limits`` into script arguments."""
    default_mode = plan.fail_mode or limits.fail_mode
    count_refused = (
        limits.count_refused if plan.count_refused is None else plan.count_refused
    )
    rule_args: list[Any] = []
    for rule in plan.rules:
        rule_args.extend(
            (repr(float(rule.limit)), rule.effective_burst, rule.window_ms)
        )
    modes: list[FailMode] = [rule.fail_mode or default_mode for rule in plan.rules]
    if plan.quota is not None:
        modes.append(plan.quota.fail_mode or default_mode)
    if plan.in_flight is not None:
        modes.append(plan.in_flight.fail_mode or default_mode)
    if not modes:
        # A plan without limits still needs an answer to "and without Redis?"
        modes.append(default_mode)
    return CompiledPlan(
        plan=plan,
        count_refused=count_refused,
        tat_suffixes=tuple(f"tat:{rule.window_ms}" for rule in plan.rules),
        rule_args=tuple(rule_args),
        fail_modes=tuple(modes),
    )


def apply_overrides(plan: PlanConfig, overrides: str) -> PlanConfig:
    """``plan`` with the fields in ``overrides`` (a JSON object of
    :class:`~gateway.config.PlanConfig` fields) replacing its own.

    Raises
    ------
    ValueError
        ``overrides`` is not a JSON object of valid PlanConfig fields
        (pydantic's ValidationError is a ValueError).
    """
    if not overrides:
        return plan
    changes = json.loads(overrides)
    if not isinstance(changes, dict):
        raise ValueError("limit overrides must be a JSON object")
    return PlanConfig.model_validate(plan.model_dump(exclude_unset=True) | changes)


class CounterStore:
    """Per-client admission counters, blocks and detector snapshots in Redis.

    Parameters
    ----------
    redis
        An asyncio client with ``decode_responses=False``, one node or a
        cluster: every call touches one client's keys (one hash slot), the
        cluster pipeline sends each node its share, and ``SCRIPT LOAD`` goes
        to every primary.
    settings
        ``redis.key_prefix``, ``redis.socket_timeout_s`` (bounds every
        operation), ``auth.replay_window_s`` (dedupe lifetime), ``limits``
        (plans; replace them live with :meth:`set_limits`) and
        ``policy.block_cooldown_s`` (default block length).
    clock_us
        For tests: "now" in microseconds since the epoch, passed to the
        script instead of reading the Redis server's clock.
    """

    def __init__(
        self,
        redis: RedisClient,
        settings: Settings,
        *,
        clock_us: Callable[[], int] | None = None,
    ) -> None:
        _check_decoding(redis)
        self._redis = redis
        self._prefix = settings.redis.key_prefix
        self._timeout_s = settings.redis.socket_timeout_s
        self._replay_ms = max(1, round(settings.auth.replay_window_s * 1000))
        self._default_cooldown_s = settings.policy.block_cooldown_s
        self._clock_us = clock_us
        self._limits = settings.limits
        # (plan, overrides, rate_per_s, burst) of an item -> its compiled plan
        # under the current limits.
        self._compiled: dict[
            tuple[str, str, float | None, int | None], CompiledPlan
        ] = {}

    @property
    def limits(self) -> LimitsConfig:
        """The limits in force."""
        return self._limits

    def set_limits(self, limits: LimitsConfig) -> None:
        """Put new plans and limits in force from the next batch on.

        No restart and no script reload: the script takes each call's rules
        as arguments. Counters carry over: a rule whose window is unchanged
        keeps its TAT (changing 50/s to 20/s does not forgive a client's
        debt); the day's count and in-flight slots stay.
        """
        self._limits = limits
        self._compiled = {}
        logger.info("limits replaced", extra={"plans": sorted(limits.plans)})

    def compiled(self, item: AdmitItem) -> CompiledPlan:
        """The plan that judges ``item``, with its key's overrides applied.

        A plan name the limits do not define falls back to the default plan,
        and overrides that do not validate against the current plan are
        ignored, both with a warning: a config change must never lock clients
        out.
        """
        cache_key = (item.plan, item.overrides, item.rate_per_s, item.burst)
        found = self._compiled.get(cache_key)
        if found is not None:
            return found

        if item.rate_per_s is not None and item.burst is not None:
            plan = PlanConfig(
                rules=(RateRule(limit=item.rate_per_s, window_s=1.0, burst=item.burst),)
            )
        else:
            if item.plan not in self._limits.plans and item.plan != "default":
                logger.warning(
                    "unknown plan; using the default plan", extra={"plan": item.plan}
                )
            plan = self._limits.plan(item.plan)
            try:
                plan = apply_overrides(plan, item.overrides)
            except ValueError as exc:
                logger.warning(
                    "limit overrides ignored: %s",
                    exc,
                    extra={"plan": item.plan, "client": item.client_id},
                )
        found = compile_plan(self._limits, plan)
        # Bounded by the distinct (plan, overrides) pairs of keys in use, and
        # emptied by every set_limits; the cap guards against a flood anyway.
        if len(self._compiled) < _MAX_COMPILED_PLANS:
            self._compiled[cache_key] = found
        return found

    def client_key(self, client_id: str, suffix: str) -> str:
        """``{prefix}:{c:<client_id>}:<suffix>``."""
        return f"{self._prefix}:{{c:{client_id}}}:{suffix}"

    def request_key(self, client_id: str, request_id: str) -> str:
        """The dedupe key of one request id."""
        return self.client_key(client_id, "req:" + self.request_member(request_id))

    @staticmethod
    def request_member(request_id: str) -> str:
        """A request id as it appears in key names and the in-flight set."""
        if len(request_id) > _MAX_REQUEST_ID_IN_KEY:
            return "sha256:" + hashlib.sha256(request_id.encode()).hexdigest()
        return request_id

    async def load_scripts(self) -> None:
        """Load the admission script now rather than on the first batch (which
        would otherwise pay two extra round trips for ``NOSCRIPT``)."""
        async with redis_guard("script load", self._timeout_s, self._redis):
            await self._redis.script_load(ADMIT_LUA)

    # Step: admission ------------------------------------------------------------

    async def admit_batch(self, items: Sequence[AdmitItem]) -> list[Admission]:
        """Admit a batch: dedupe, block check, the plan's limits (daily quota,
        GCRA windows, in-flight cap) and counting, per item.

        One network round trip: one ``EVALSHA`` per client, in item order within
        the client, all in a single non-transactional pipeline. Only if the
        server has lost the script (restart, ``SCRIPT FLUSH``) does it load it
        and retry the affected clients once. redis-py's ``register_script``
        is not used: in a pipeline it sends ``SCRIPT EXISTS`` before every
        execute, a second round trip per batch.

        A client's items are decided in order against one server-clock reading;
        different clients are independent. Items of one client whose keys have
        different plans go in one call per plan, one after the other (each
        plan's items in order). Retrying a batch after an error is
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

        # Group by client (and plan: a client's keys may have different
        # plans), keeping each client's items in batch order. One reading of
        # the test clock for the whole batch, as the server's is per call.
        groups: dict[tuple[str, CompiledPlan], list[int]] = {}
        for index, item in enumerate(items):
            key = (item.client_id, self.compiled(item))
            group = groups.get(key)
            if group is None:
                groups[key] = [index]
            else:
                group.append(index)
        now_us = "" if self._clock_us is None else str(int(self._clock_us()))
        calls = [
            (indices, self._admit_call(items, indices, plan, now_us))
            for (_, plan), indices in groups.items()
        ]

        async with redis_guard("admit", self._timeout_s, self._redis):
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
            lines = reply.decode().split("\n")
            for index, line in zip(indices, lines, strict=True):
                results[index] = _admission(line)

        admissions = [a for a in results if a is not None]
        if logger.isEnabledFor(logging.DEBUG):
            refused = sum(1 for a in admissions if not a.serve)
            logger.debug(
                "admitted batch",
                extra={"items": len(items), "calls": len(groups), "refused": refused},
            )
        return admissions

    def _admit_call(
        self,
        items: Sequence[AdmitItem],
        indices: list[int],
        plan: CompiledPlan,
        now_us: str,
    ) -> list[Any]:
        client_id = items[indices[0]].client_id
        quota = plan.plan.quota.daily if plan.plan.quota is not None else 0
        in_flight = plan.plan.in_flight
        keys: list[Any] = [
            self.client_key(client_id, "block"),
            self.client_key(client_id, "totals"),
            self.client_key(client_id, "day"),
            self.client_key(client_id, "inflight"),
            *(self.client_key(client_id, suffix) for suffix in plan.tat_suffixes),
        ]
        args: list[Any] = [
            self._replay_ms,
            "1" if plan.count_refused else "0",
            TOTALS_TTL_S * 1000,
            DAY_TTL_S * 1000,
            now_us,
            len(plan.tat_suffixes),
            quota,
            in_flight.limit if in_flight is not None else 0,
            round(in_flight.ttl_s * 1000) if in_flight is not None else 0,
            *plan.rule_args,
        ]
        req_prefix = self.client_key(client_id, "req:")
        for index in indices:
            item = items[index]
            member = self.request_member(item.request_id)
            keys.append(req_prefix + member)
            args.extend((item.delivery, member, item.cost))
        return [len(keys), *keys, *args]

    async def _run_admit(self, calls: list[list[Any]]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for call in calls:
            # execute_command, not pipe.evalsha: redis-py's cluster pipeline
            # refuses its EVALSHA method, yet routes the raw command by its
            # keys, which share one client's slot.
            pipe.execute_command("EVALSHA", ADMIT_SHA, *call)
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
        async with redis_guard("block", self._timeout_s, self._redis):
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
        async with redis_guard("unblock", self._timeout_s, self._redis):
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
            redis_guard("release", self._timeout_s, self._redis),
            self._redis.pipeline(transaction=False) as pipe,
        ):
            for key in keys:
                pipe.delete(key)
            await pipe.execute()

    async def release_in_flight(self, requests: Sequence[tuple[str, str]]) -> None:
        """Free the in-flight slots of these answered (client id, request id)
        pairs, in one round trip. Releasing a slot twice, or one that expired,
        does nothing."""
        if not requests:
            return
        async with (
            redis_guard("release_in_flight", self._timeout_s, self._redis),
            self._redis.pipeline(transaction=False) as pipe,
        ):
            for client_id, request_id in requests:
                pipe.zrem(
                    self.client_key(client_id, "inflight"),
                    self.request_member(request_id),
                )
            await pipe.execute()

    async def is_blocked(self, client_id: str) -> bool:
        check_client_id(client_id)
        async with redis_guard("is_blocked", self._timeout_s, self._redis):
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
        async with redis_guard("client_counters", self._timeout_s, self._redis):
            pipe = self._redis.pipeline(transaction=False)
            # Raw TIME: the cluster pipeline refuses its time() method (a
            # keyless command goes to any node; all share one clock source
            # closely enough for the UTC day).
            pipe.execute_command("TIME")
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
        async with redis_guard("save_states", self._timeout_s, self._redis):
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
        async with redis_guard("load_states", self._timeout_s, self._redis):
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


def _admission(line: str) -> Admission:
    name, retry_ms, requests, limit, remaining, reset_ms, window_ms, held = line.split(
        " "
    )
    outcome = _OUTCOMES.get(name)
    if outcome is None:
        raise StoreError(f"redis admit: unexpected outcome {name!r}", retriable=False)
    return Admission(
        outcome=outcome,
        retry_after_ms=int(retry_ms),
        client_requests=int(requests),
        limit=int(limit),
        remaining=int(remaining),
        reset_ms=int(reset_ms),
        window_s=int(window_ms) / 1000,
        in_flight=held == "1",
    )
