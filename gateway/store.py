"""Redis-backed per-client counters: admission (dedupe, block, the plan's GCRA
windows, daily quota and in-flight cap), blocks, totals and detector-state
snapshots.

Every key of one client shares the hash tag ``{c:<client_id>}``, so the Lua
admission script touches one slot and the layout works on Redis Cluster::

    {prefix}:{c:<client_id>}:tat:<window_ms> GCRA theoretical arrival time (us)
    {prefix}:{c:<client_id>}:inflight        sorted set: admitted, unanswered
    {prefix}:{c:<client_id>}:block           present while blocked (value: reason)
    {prefix}:{c:<client_id>}:hidden          present while a block or throttle is
                                             served hidden (value: "block" or
                                             "throttle"; expires with it)
    {prefix}:{c:<client_id>}:released        a release waiting for the owning
                                             worker (value: release time, ms)
    {prefix}:{c:<client_id>}:totals          hash: requests, refused
    {prefix}:{c:<client_id>}:day             hash: d (UTC day), requests, refused
    {prefix}:{c:<client_id>}:req:<request>   dedupe: delivery of the admitted copy
    {prefix}:{c:<client_id>}:state           detector snapshot (bytes)

Every key has an expiry (API-key records, in ``gateway.keys``, are the one
exception, kept for audit).

This module holds :class:`CounterStore`, which runs the admission script and
keeps blocks, totals and snapshots. What admission decides apart from Redis
(items, decisions, the GCRA reference, compiled plans) is in
``gateway._admission``, the Redis client and its guard in
``gateway._redisclient``; their public names are re-exported here, where the
rest of the gateway imports them from. This module imports Redis and the
gateway's config and errors; nothing from Kafka, FastAPI or the detectors.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from typing import Any

from redis import exceptions as redis_exc

from gateway._admission import CLIENT_ID_PATTERN as CLIENT_ID_PATTERN
from gateway._admission import Admission as Admission
from gateway._admission import AdmitItem as AdmitItem
from gateway._admission import CompiledPlan as CompiledPlan
from gateway._admission import GcraDecision as GcraDecision
from gateway._admission import HiddenAction as HiddenAction
from gateway._admission import Outcome as Outcome
from gateway._admission import apply_overrides as apply_overrides
from gateway._admission import check_client_id as check_client_id
from gateway._admission import compile_plan as compile_plan
from gateway._admission import gcra as gcra
from gateway._admission import parse_admission as parse_admission
from gateway._admission import parse_reply
from gateway._redisclient import RETRIABLE_REPLIES, check_decoding
from gateway._redisclient import RedisClient as RedisClient
from gateway._redisclient import redis_from_settings as redis_from_settings
from gateway._redisclient import redis_guard as redis_guard
from gateway.config import LimitsConfig, PlanConfig, RateRule, Settings
from gateway.errors import StoreError

logger = logging.getLogger(__name__)

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
        check_decoding(redis)
        self._redis = redis
        self._prefix = settings.redis.key_prefix
        self._timeout_s = settings.redis.socket_timeout_s
        self._replay_window_s = settings.auth.replay_window_s
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
    def replay_window_s(self) -> float:
        """``auth.replay_window_s``: how long a request id is remembered, and
        how far back a request's broker time is judged (``admit.lua``). Read
        once: ``auth`` is not live, a change needs a restart."""
        return self._replay_window_s

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
                    retriable=isinstance(reply, RETRIABLE_REPLIES),
                ) from reply
            for index, admission in zip(
                indices, parse_reply(reply.decode()), strict=True
            ):
                results[index] = admission

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
            self.client_key(client_id, "hidden"),
            self.client_key(client_id, "released"),
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
            sent = "" if item.sent_us is None else f"{item.sent_us:.0f}"
            args.extend((item.delivery, member, item.cost, sent))
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

    async def record_hidden(
        self, records: Mapping[str, tuple[HiddenAction, float]]
    ) -> None:
        """Record blocks and throttles served hidden, client -> (action, s
        left), in one round trip.

        Under ``hide_suspicion`` a block or throttle is served late and
        coarse, not refused, so the block key above is not set; this record
        keeps it for the rest of its time whatever happens to the policy's
        memory (a snapshot refused, deleted or never saved): admission
        returns it with every decision and the worker puts it back into the
        policy before scoring. It refuses nothing. Recording again replaces
        the action and the time left.
        """
        if not records:
            return
        async with redis_guard("record_hidden", self._timeout_s, self._redis):
            pipe = self._redis.pipeline(transaction=False)
            for client_id, (action, left_s) in records.items():
                check_client_id(client_id)
                if not (left_s > 0 and math.isfinite(left_s)):
                    raise ValueError("the time left must be positive and finite")
                pipe.set(
                    self.client_key(client_id, "hidden"),
                    action.encode(),
                    px=max(1, math.ceil(left_s * 1000)),
                )
            await pipe.execute()
        logger.debug("hidden enforcement recorded", extra={"clients": len(records)})

    async def unblock(self, client_id: str) -> bool:
        """Lift a block early, visible or hidden (the record of
        :meth:`record_hidden`). Returns whether the client was blocked
        either way."""
        check_client_id(client_id)
        async with redis_guard("unblock", self._timeout_s, self._redis):
            # One DEL for both: they share the client's hash slot.
            removed = await self._redis.delete(
                self.client_key(client_id, "block"),
                self.client_key(client_id, "hidden"),
            )
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
            ``day_refused`` (current UTC day, server clock), ``blocked_ms``
            (remaining block, 0 if none) and ``hidden_ms`` (remaining block or
            throttle served hidden, :meth:`record_hidden`; 0 if none).
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
            pipe.pttl(self.client_key(client_id, "hidden"))
            (seconds, _), totals, day, block_pttl, hidden_pttl = await pipe.execute()

        today = int(seconds) // 86_400
        current = day if int(day.get(b"d", -1)) == today else {}
        return {
            "requests": int(totals.get(b"requests", 0)),
            "refused": int(totals.get(b"refused", 0)),
            "day_requests": int(current.get(b"requests", 0)),
            "day_refused": int(current.get(b"refused", 0)),
            "blocked_ms": max(int(block_pttl), 0),
            "hidden_ms": max(int(hidden_pttl), 0),
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
