"""The per-client risk view behind ``modelgate clients top|show|release``.

Workers write it once per batch, after policy (:meth:`ClientView.observe`);
the admin API reads it and releases clients. Layout, every per-client key
under the client's hash tag as in ``gateway.store``::

    {prefix}:{c:<client_id>}:view       hash: risk, action, ts_ms, scores (JSON),
                                        evidence (JSON, last non-empty),
                                        evidence_ts_ms, worker
    {prefix}:{c:<client_id>}:history    list of JSON entries, newest first,
                                        capped at admin.client_history_max
    {prefix}:clients:risk               sorted set: client -> latest risk,
                                        capped at admin.clients_top_max
    {prefix}:{c:<client_id>}:released   a release waiting for the owning
                                        worker: release time (ms)

Every key expires after ``admin.client_view_ttl_s`` without writes. A
client's view is rewritten when its action changes and otherwise at most
once a second, so its risk in the ranking may be that stale.

Release means an operator vouches for the client: it starts again from a
clean slate. The admin side leaves the marker, deletes the client's detector
snapshot (so a worker that takes the client over later does not reload the
old state) and lifts the Redis block, visible or hidden (the hidden record
of ``CounterStore.record_hidden``). The marker lives under the client's
hash tag, so the admission script reads it with the client's other keys and
reports it with every decision (``Admission.released``): the worker that
owns the client learns of the release in the round trip admission already
makes, and forgets all its in-memory state for the client *before* scoring
the batch (:meth:`ClientView.apply_releases`): the policy's flags, blocks
and query counts and every detector's history. So the very first request
after a release is judged from a clean slate. The marker is deleted in the
view's write of the same batch (:meth:`ClientView.observe`), so releasing
costs the batch path no round trip of its own; if that write fails, the
next batch applies the release again, resetting one batch's history more.
A second release landing between a batch's admission and its view write is
deleted with the first without being applied again; that batch was already
judged from the clean slate of the first.

Imports Redis and the gateway's batch, config, scoring and store modules;
nothing from Kafka or FastAPI.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from gateway import protocol
from gateway.batch import BatchItem
from gateway.config import Settings
from gateway.errors import StoreError
from gateway.scoring import Scorer
from gateway.store import CounterStore, RedisClient, check_client_id, redis_guard

logger = logging.getLogger(__name__)

# Which of a batch's actions describes the client: the most severe one.
_SEVERITY = {"allow": 0, "flag": 1, "degrade": 2, "throttle": 3, "reject": 3}
_BLOCK_SEVERITY = 4
# A worker remembers when it last wrote each client's view and history; past
# this many clients it forgets the oldest (it then writes them once more).
_LAST_WRITE_MAX = 100_000
# A view whose action has not changed is rewritten at most this often: the
# ranking may be this stale, and a busy client costs a few commands a second
# instead of a few per batch (measured: 200 clients in a batch took 69 ms to
# write every batch).
_VIEW_INTERVAL_S = 1.0
_MAX_EVIDENCE = 10


def _severity(action: str) -> int:
    return _BLOCK_SEVERITY if action == "block" else _SEVERITY.get(action, 1)


@dataclass(slots=True)
class _ClientBatch:
    requests: int = 0
    risk: float | None = None
    action: str = "allow"
    scores: dict[str, float] = field(default_factory=dict)
    evidence: list[str] = field(default_factory=list)
    codes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ClientSummary:
    """One row of ``clients top``: the latest view of a client."""

    client_id: str
    risk: float
    action: str
    ts_ms: int
    scores: dict[str, float]


@dataclass(frozen=True, slots=True)
class ClientDetail:
    """Everything ``clients show`` prints about one client."""

    client_id: str
    summary: ClientSummary | None
    evidence: list[str]
    evidence_ts_ms: int | None
    counters: dict[str, int]
    block_reason: str | None
    history: list[dict[str, Any]]


class ClientView:
    """Writes (worker side) and reads (admin side) the per-client view.

    Parameters
    ----------
    redis
        An asyncio client with ``decode_responses=False``.
    settings
        ``redis.key_prefix``, ``redis.socket_timeout_s`` and the ``admin``
        section's ``clients_top_max``, ``client_history_max``,
        ``client_history_interval_s`` and ``client_view_ttl_s``.
    """

    def __init__(self, redis: RedisClient, settings: Settings) -> None:
        self._redis = redis
        self._store = CounterStore(redis, settings)
        self._prefix = settings.redis.key_prefix
        self._timeout_s = settings.redis.socket_timeout_s
        admin = settings.admin
        self._top_max = admin.clients_top_max
        self._history_max = admin.client_history_max
        self._history_interval_s = admin.client_history_interval_s
        self._ttl_ms = max(1, round(admin.client_view_ttl_s * 1000))
        self._worker_id = settings.worker.worker_id
        # client -> (monotonic time, action) of the last view and history
        # entry this worker wrote.
        self._last_view: dict[str, tuple[float, str]] = {}
        self._last_push: dict[str, tuple[float, str]] = {}

    def key(self, client_id: str, suffix: str) -> str:
        return self._store.client_key(client_id, suffix)

    @property
    def risk_key(self) -> str:
        return f"{self._prefix}:clients:risk"

    def released_key(self, client_id: str) -> str:
        """A client's pending release marker (value: release time, ms)."""
        return self.key(client_id, "released")

    # Step: the worker's per-batch write ------------------------------------------

    def apply_releases(self, items: Sequence[BatchItem], scorer: Scorer) -> list[str]:
        """Forget the state of every client of this batch with a release
        waiting, before the batch is scored; returns those clients.

        No I/O: admission read the markers (``Admission.released``). Call it
        after the batch's snapshots are loaded (a snapshot saved between the
        release and now still holds the old state) and before scoring; the
        markers are deleted by :meth:`observe`.
        """
        released = _released(items)
        for client_id in released:
            scorer.forget(client_id)
            self._last_view.pop(client_id, None)
            logger.info(
                "client release applied: detector and policy state reset",
                extra={"client": client_id},
            )
        return released

    async def observe(self, items: Sequence[BatchItem]) -> None:
        """Record this batch's outcome per client and delete the release
        markers :meth:`apply_releases` applied.

        One pipelined round trip: the markers, then, for each client whose
        view is due, its view, ranking and (when due) history. A client's
        view is due when its action changed or ``_VIEW_INTERVAL_S`` passed
        since this worker last wrote it, its history on a change of action
        or every ``admin.client_history_interval_s``; so a busy client costs
        a few commands a second, not a few per batch. A Redis failure is
        logged and swallowed: the view is for people, and retrying the
        whole batch for it would re-send every answer (a marker left behind
        is applied again by the next batch).
        """
        batches = _aggregate(items)
        if not batches:
            return
        now_ms = protocol.now_ms()
        now = time.monotonic()
        clients = list(batches)
        viewed: dict[str, tuple[float, str]] = {}
        pushed: dict[str, tuple[float, str]] = {}

        pipe = self._redis.pipeline(transaction=False)
        for client_id in _released(items):
            pipe.delete(self.released_key(client_id))
        for client_id in clients:
            batch = batches[client_id]
            if not _due(
                self._last_view.get(client_id), batch.action, now, _VIEW_INTERVAL_S
            ):
                continue
            viewed[client_id] = (now, batch.action)
            view: dict[Any, Any] = {
                "action": batch.action,
                "ts_ms": now_ms,
                "worker": self._worker_id,
            }
            if batch.risk is not None:
                view["risk"] = repr(batch.risk)
                view["scores"] = json.dumps(batch.scores)
                pipe.zadd(self.risk_key, {client_id: batch.risk})
            if batch.evidence:
                view["evidence"] = json.dumps(batch.evidence[:_MAX_EVIDENCE])
                view["evidence_ts_ms"] = now_ms
            pipe.hset(self.key(client_id, "view"), mapping=view)
            pipe.pexpire(self.key(client_id, "view"), self._ttl_ms)
            if _due(
                self._last_push.get(client_id),
                batch.action,
                now,
                self._history_interval_s,
            ):
                entry = {
                    "ts_ms": now_ms,
                    "action": batch.action,
                    "risk": batch.risk,
                    "requests": batch.requests,
                    "scores": batch.scores,
                    "codes": batch.codes,
                    "evidence": batch.evidence[:_MAX_EVIDENCE],
                }
                self._push_history(pipe, client_id, entry)
                pushed[client_id] = (now, batch.action)
        if viewed:
            # Keep only the riskiest clients_top_max (ranks count from the
            # lowest).
            pipe.zremrangebyrank(self.risk_key, 0, -(self._top_max + 1))
            pipe.pexpire(self.risk_key, self._ttl_ms)

        try:
            async with redis_guard("clientview.observe", self._timeout_s, self._redis):
                await pipe.execute()
        except StoreError as exc:
            # Release markers included: the next batch applies them again.
            logger.warning("client view not written: %s", exc.message)
            return
        _remember(self._last_view, viewed)
        _remember(self._last_push, pushed)

    def _push_history(self, pipe: Any, client_id: str, entry: dict[str, Any]) -> None:
        history = self.key(client_id, "history")
        pipe.lpush(history, json.dumps(entry))
        pipe.ltrim(history, 0, self._history_max - 1)
        pipe.pexpire(history, self._ttl_ms)

    # Step: the admin side ----------------------------------------------------------

    async def top(self, limit: int) -> list[ClientSummary]:
        """The ``limit`` clients with the highest latest risk, highest first.

        Clients whose view expired are left out (and dropped from the index).
        """
        async with redis_guard("clientview.top", self._timeout_s, self._redis):
            ranked = cast(
                list[tuple[bytes, float]],
                await self._redis.zrevrange(
                    self.risk_key, 0, limit - 1, withscores=True
                ),
            )
            ids = [member.decode() for member, _ in ranked]
            pipe = self._redis.pipeline(transaction=False)
            for client_id in ids:
                pipe.hgetall(self.key(client_id, "view"))
            views = await pipe.execute() if ids else []
            stale = [c for c, v in zip(ids, views, strict=True) if not v]
            if stale:
                await self._redis.zrem(self.risk_key, *stale)
        return [
            _summary(client_id, view)
            for client_id, view in zip(ids, views, strict=True)
            if view
        ]

    async def show(self, client_id: str, history_limit: int) -> ClientDetail | None:
        """One client's view, counters, block and newest ``history_limit``
        history entries; ``None`` if nothing at all is known about it.

        Raises
        ------
        ValueError
            ``client_id`` is not a valid client id.
        """
        check_client_id(client_id)
        counters = await self._store.client_counters(client_id)
        async with redis_guard("clientview.show", self._timeout_s, self._redis):
            pipe = self._redis.pipeline(transaction=False)
            pipe.hgetall(self.key(client_id, "view"))
            pipe.lrange(self.key(client_id, "history"), 0, history_limit - 1)
            pipe.get(self.key(client_id, "block"))
            view, history, block = await pipe.execute()
        if not view and not history and not counters["requests"] and block is None:
            return None
        return ClientDetail(
            client_id=client_id,
            summary=_summary(client_id, view) if view else None,
            evidence=json.loads(view.get(b"evidence", b"[]")) if view else [],
            evidence_ts_ms=(
                int(view[b"evidence_ts_ms"]) if b"evidence_ts_ms" in view else None
            ),
            counters=counters,
            block_reason=None if block is None else block.decode(errors="replace"),
            history=[json.loads(raw) for raw in history],
        )

    async def release(self, client_id: str, actor: str) -> bool:
        """Release a client: leave the marker for its worker, drop its detector
        snapshot, then lift the block, visible or hidden. Returns whether the
        client was blocked (or throttled hidden).

        The marker goes first so that a batch landing between the steps (still
        refused as blocked) already resets the worker's state, and does not
        put a hidden block it still reads back into the policy
        (``enforce.restore_hidden`` skips released clients).
        """
        check_client_id(client_id)
        now_ms = protocol.now_ms()
        async with redis_guard("clientview.release", self._timeout_s, self._redis):
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(self.released_key(client_id), str(now_ms), px=self._ttl_ms)
            pipe.delete(self.key(client_id, "state"))
            self._push_history(
                pipe,
                client_id,
                {"ts_ms": now_ms, "action": "release", "by": actor},
            )
            await pipe.execute()
        was_blocked = await self._store.unblock(client_id)
        logger.info(
            "client released", extra={"client": client_id, "was_blocked": was_blocked}
        )
        return was_blocked


def _due(
    last: tuple[float, str] | None, action: str, now: float, interval_s: float
) -> bool:
    # On a change of action, else once per interval: a client flooding the
    # gateway while throttled or blocked must not push its earlier incidents
    # out of the capped history, nor cost writes per batch.
    return last is None or action != last[1] or now - last[0] >= interval_s


def _remember(
    marks: dict[str, tuple[float, str]], new: dict[str, tuple[float, str]]
) -> None:
    for client_id, mark in new.items():
        # Re-insert so dict order stays oldest-first for eviction below.
        marks.pop(client_id, None)
        marks[client_id] = mark
    while len(marks) > _LAST_WRITE_MAX:
        del marks[next(iter(marks))]


def _released(items: Sequence[BatchItem]) -> list[str]:
    return sorted(
        {
            i.client_id
            for i in items
            if i.client_id is not None
            and i.admission is not None
            and i.admission.released
        }
    )


def _aggregate(items: Sequence[BatchItem]) -> dict[str, _ClientBatch]:
    batches: dict[str, _ClientBatch] = {}
    for item in items:
        client_id = item.client_id
        if client_id is None:
            continue  # unauthenticated: no client to speak of
        batch = batches.setdefault(client_id, _ClientBatch())
        batch.requests += 1
        if _severity(item.action) > _severity(batch.action):
            batch.action = item.action
        if item.error is not None:
            batch.codes[item.error.code] = batch.codes.get(item.error.code, 0) + 1
        verdict = item.verdict
        if verdict is None:
            continue
        batch.risk = max(batch.risk or 0.0, verdict.risk)
        for name, score in item.scores.items():
            batch.scores[name] = max(batch.scores.get(name, score), score)
        for reason in verdict.reasons:
            if reason not in batch.evidence:
                batch.evidence.append(reason)
    return batches


def _summary(client_id: str, view: dict[bytes, bytes]) -> ClientSummary:
    return ClientSummary(
        client_id=client_id,
        risk=float(view.get(b"risk", b"0")),
        action=view.get(b"action", b"").decode(),
        ts_ms=int(view.get(b"ts_ms", b"0")),
        scores=json.loads(view.get(b"scores", b"{}")),
    )
