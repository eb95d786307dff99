"""Admission that survives a Redis outage: each rule's fail mode, and the
per-worker local cap that stands in for Redis in ``open`` mode.

:class:`Admitter` asks :class:`~gateway.store.CounterStore` first. When Redis
cannot be reached, every item is judged by the fail modes of its plan's rules
(quota and in-flight cap included):

- any rule in ``retry``: the ``StoreError`` propagates and the worker rewinds
  and retries the whole batch (the behaviour before fail modes existed; no
  answer until Redis is back, nothing counted twice). It is checked for the
  whole batch before anything is decided locally, so a retried batch never
  spends local allowance twice;
- otherwise any rule in ``closed``: the item is refused ``store_unavailable``
  (``STORE_UNAVAILABLE``, retriable);
- otherwise (all ``open``): a :class:`LocalLimiter` admits it up to the
  per-worker cap, else refuses it like Redis would (``rate_limited``,
  ``quota_exceeded``, ``too_many_in_flight``).

Decisions made without Redis are counted in
``modelgate_decisions_without_store_total{mode="open"|"closed"}``.

Known shortcomings of ``open`` mode, by design of a local stand-in: request
ids are not deduplicated and blocks stored in Redis are not seen (the
worker's detectors still run and still refuse); what a worker admitted
locally is not added to the Redis counters when Redis returns; the local
caps are per worker, so they bound a client exactly only while one worker
owns it (true today: a client's records all go to one partition).

This module imports the gateway's config, errors and store, and
prometheus-client; nothing from Kafka.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

from prometheus_client import Counter

from gateway.errors import StoreError
from gateway.store import (
    Admission,
    AdmitItem,
    CompiledPlan,
    CounterStore,
    Outcome,
    gcra,
)

logger = logging.getLogger(__name__)

_DAY_S = 86_400
# Local state per client is small (a float per rule, two ints); past this many
# entries the rested ones are dropped, so an outage with many clients cannot
# grow a worker's memory without bound.
_MAX_LOCAL_ENTRIES = 100_000


class LocalLimiter:
    """Per-worker GCRA windows, day counts and in-flight counts per client,
    used only while Redis is unreachable.

    Each rule's local bucket is the rule scaled by its ``local_fraction``
    (limit and burst; at least 1), the quota likewise; the in-flight cap is
    taken as it is. The same GCRA as ``admit.lua``
    (:func:`gateway.store.gcra`).

    Parameters
    ----------
    backlog_s
        How far back a request's broker time may be judged: the store's
        ``auth.replay_window_s`` (:attr:`CounterStore.replay_window_s`), the
        bound ``admit.lua`` clamps to, so a backlog is judged alike with and
        without Redis.
    clock_s
        Seconds since the epoch (tests pass their own).
    """

    def __init__(
        self, *, backlog_s: float, clock_s: Callable[[], float] = time.time
    ) -> None:
        if not (backlog_s > 0 and math.isfinite(backlog_s)):
            raise ValueError("backlog_s must be positive and finite")
        self._backlog_us = backlog_s * 1e6
        self._clock_s = clock_s
        self._tats: dict[tuple[str, int], float] = {}
        self._days: dict[str, tuple[int, int]] = {}
        self._in_flight: dict[str, int] = {}

    def decide(self, item: AdmitItem, plan: CompiledPlan) -> Admission:
        """Judge ``item`` against ``plan`` with local state only."""
        now_s = self._clock_s()
        now_us = now_s * 1e6
        # Judged when sent, as admit.lua judges (AdmitItem.sent_us), and no
        # further back than its bound, auth.replay_window_s.
        at_us = now_us
        if item.sent_us is not None:
            at_us = min(max(item.sent_us, now_us - self._backlog_us), now_us)
        client = item.client_id
        rules = plan.plan.rules

        # Judge everything before charging anything, as the script does.
        decisions = []
        wait_us = 0.0
        for rule in rules:
            rate_per_s = rule.limit * rule.local_fraction / rule.window_s
            burst = max(1, math.floor(rule.effective_burst * rule.local_fraction))
            decision = gcra(
                self._tats.get((client, rule.window_ms)),
                now_us,
                rate_per_s,
                burst,
                min(item.cost, burst),
                at_us=at_us,
            )
            decisions.append(decision)
            if not decision.allowed:
                wait_us = max(wait_us, decision.retry_after_us)
        today = int(now_s // _DAY_S)
        day, used = self._days.get(client, (today, 0))
        if day != today:
            used = 0
        quota = plan.plan.quota
        in_flight = plan.plan.in_flight

        outcome: Outcome = "ok"
        retry_ms = 0
        if quota is not None and used + 1 > max(
            1, math.floor(quota.daily * quota.local_fraction)
        ):
            outcome = "quota_exceeded"
            retry_ms = math.ceil(((today + 1) * _DAY_S - now_s) * 1000)
        elif wait_us > 0:
            outcome = "rate_limited"
            retry_ms = math.ceil(wait_us / 1000)
        elif (
            in_flight is not None and self._in_flight.get(client, 0) >= in_flight.limit
        ):
            outcome = "too_many_in_flight"

        if outcome == "ok" or plan.count_refused:
            for rule, decision in zip(rules, decisions, strict=True):
                # A refused decision keeps the old TAT; charging it anyway
                # (count_refused) moves the TAT as an admission would.
                interval_us = rule.window_s * 1e6 / (rule.limit * rule.local_fraction)
                old = self._tats.get((client, rule.window_ms))
                base = at_us if old is None else max(old, at_us)
                tat = decision.tat_us if decision.allowed else base + interval_us
                self._tats[(client, rule.window_ms)] = tat
        if outcome == "ok":
            self._days[client] = (today, used + 1)
            if in_flight is not None:
                self._in_flight[client] = self._in_flight.get(client, 0) + 1
        self._prune(now_us)
        return Admission(
            outcome=outcome,
            retry_after_ms=retry_ms,
            client_requests=0,
            in_flight=outcome == "ok" and in_flight is not None,
            without_store=True,
        )

    def release(self, client_id: str) -> None:
        """Free one local in-flight slot of ``client_id``."""
        held = self._in_flight.get(client_id, 0)
        if held <= 1:
            self._in_flight.pop(client_id, None)
        else:
            self._in_flight[client_id] = held - 1

    def _prune(self, now_us: float) -> None:
        if len(self._tats) + len(self._days) <= _MAX_LOCAL_ENTRIES:
            return
        # A TAT in the past means "rested", the same as no entry.
        self._tats = {k: tat for k, tat in self._tats.items() if tat > now_us}
        today = int(now_us / 1e6 // _DAY_S)
        self._days = {c: d for c, d in self._days.items() if d[0] == today}


class Admitter:
    """Admission with fail modes: Redis when it answers, else each rule's
    fail mode (see the module docstring).

    Parameters
    ----------
    store
        The Redis counters; its ``limits`` decide plans and fail modes.
    without_store
        The ``modelgate_decisions_without_store`` counter (label ``mode``).
    limiter
        The local stand-in; when omitted, a fresh one judging backlogs over
        the store's ``replay_window_s``.
    """

    def __init__(
        self,
        store: CounterStore,
        without_store: Counter,
        limiter: LocalLimiter | None = None,
    ) -> None:
        self.store = store
        self.limiter = limiter or LocalLimiter(backlog_s=store.replay_window_s)
        self._without_store = without_store
        self._outage_logged = False

    async def admit(self, items: Sequence[AdmitItem]) -> list[Admission]:
        """One admission per item, in order.

        Raises
        ------
        StoreError
            Redis failed and some item's plan has a rule in ``retry`` mode, or
            Redis answered with a non-retriable error (a script bug): the
            batch must be retried.
        """
        try:
            admissions = await self.store.admit_batch(items)
        except StoreError as exc:
            if not exc.retriable:
                raise
            plans = [self.store.compiled(item) for item in items]
            if any("retry" in plan.fail_modes for plan in plans):
                raise
            if not self._outage_logged:
                logger.warning("redis unreachable; admitting by fail mode: %s", exc)
                self._outage_logged = True
            pairs = zip(items, plans, strict=True)
            return [self._decide(item, plan) for item, plan in pairs]
        if self._outage_logged:
            logger.warning("redis reachable again; admitting through redis")
            self._outage_logged = False
        return admissions

    def _decide(self, item: AdmitItem, plan: CompiledPlan) -> Admission:
        if "closed" in plan.fail_modes:
            self._without_store.labels("closed").inc()
            return Admission(
                outcome="store_unavailable",
                retry_after_ms=0,
                client_requests=0,
                without_store=True,
            )
        self._without_store.labels("open").inc()
        return self.limiter.decide(item, plan)

    async def release(self, held: Sequence[tuple[str, str, Admission]]) -> None:
        """Free the in-flight slots of answered (client, request, admission)
        triples: locally for decisions made without Redis, in Redis for the
        rest (one round trip).

        Raises
        ------
        StoreError
            Redis could not be reached (the slots free themselves after the
            in-flight rule's ``ttl_s``).
        """
        remote: list[tuple[str, str]] = []
        for client_id, request_id, admission in held:
            if not admission.in_flight:
                continue
            if admission.without_store:
                self.limiter.release(client_id)
            else:
                remote.append((client_id, request_id))
        await self.store.release_in_flight(remote)
