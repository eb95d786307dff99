"""Re-sending admin audit entries that missed the Kafka topic.

The Redis stream ``{prefix}:admin:audit`` is the record. Each action
produces its entry to ``kafka.topics.audit`` at once
(:mod:`gateway.admin.audit_topic`) and, when the broker acknowledges it,
marks the entry's id in the sorted set ``{prefix}:{admin-audit}:acked``. The
forwarder walks the stream from a cursor, ``{prefix}:{admin-audit}:cursor``
(the id up to which every entry is known to be on the topic): it passes the
marked entries, re-sends the unmarked ones in the stream's order, and moves
the cursor over what the broker acknowledged. Delivery is at least once: a
re-sent entry keeps its ``entry_id``, ``seq`` and ``hash``, so a reader drops
copies by ``entry_id``.

Ownership: every admin API process runs a forwarder, but only the holder of
the lease ``{prefix}:{admin-audit}:forwarder`` works (``lua/audit_lease.lua``);
it renews the lease each pass, and another process takes over within the
lease's length (three intervals plus ``kafka.request_timeout_s``) after it
stops. The cursor moves only while the lease is held
(``lua/audit_cursor.lua``), so a holder that lost its lease while paused can
send a duplicate but cannot move the cursor under the new holder.

An entry younger than ``admin.audit_kafka_timeout_s`` plus 1 s (by the Redis
server's clock, which also makes the stream ids) is left alone: its action
may still be waiting for its own acknowledgement.

The first pass with no cursor in Redis places it before the oldest entry
not known to be on the topic: it reads the topic's records from the stream's
oldest entry's time on (:meth:`AuditTopic.scan`, one bit per ``seq`` the
stream spans) and walks the stream, passing entries the topic or the
acknowledged set holds. Until Kafka can be read, it places none and sends
nothing.

Next to the cursor, ``{prefix}:{admin-audit}:cursor-seq`` holds the ``seq``
up to which every entry is on the topic or counted lost. An entry the stream
trimmed (past ``admin.audit_max_entries``) before it reached the topic cannot
be sent any more: the first entry after the cursor then has a ``seq`` beyond
the next one, and the missing ones (less those acknowledged) are logged at
ERROR with the code ``AUDIT_ENTRIES_LOST`` and counted in
``modelgate_admin_audit_kafka_lost_total``. A cursor from before that key
(no ``cursor-seq``) checks no gap until it first moves.

Imports Redis, the admin audit log and metrics, and the audit topic (aiokafka).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from importlib import resources
from typing import Any, cast

from gateway.admin.audit import AuditEntry, acked_key, entry_from_stream
from gateway.admin.audit_topic import AuditTopic, TopicRecord
from gateway.admin.metrics import AdminMetrics
from gateway.config import Settings
from gateway.errors import BrokerError, StoreError
from gateway.store import RedisClient, redis_guard

logger = logging.getLogger(__name__)

LEASE_LUA: bytes = (
    resources.files("gateway").joinpath("lua/audit_lease.lua").read_bytes()
)
CURSOR_LUA: bytes = (
    resources.files("gateway").joinpath("lua/audit_cursor.lua").read_bytes()
)
# Entries read per pass; the backlog gauge counts within them.
BATCH = 1000
_START = "0-0"
# The first pass reads the topic from this long before the stream's oldest
# entry: record timestamps are the producing replica's clock, stream ids the
# Redis server's.
_CLOCK_SLACK_MS = 60_000
# The stable code of entries trimmed from the stream before the topic had them.
LOST_CODE = "AUDIT_ENTRIES_LOST"


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or "0")


def _is_id(value: object) -> bool:
    ms, sep, seq = str(value).partition("-")
    return bool(sep) and ms.isdigit() and seq.isdigit()


class _OnTopic:
    """Which stream entries from ``first`` on the topic holds: a bit per
    ``seq`` from ``first``'s to ``last``'s, and the ids of unchained ones
    (``seq`` 0, before chaining: few, and only ever fewer)."""

    def __init__(self, first: AuditEntry, last: AuditEntry) -> None:
        self._first = _id_tuple(first.entry_id)
        self._low = max(first.seq, 1)
        self._bits = bytearray(max(0, last.seq - self._low + 1))
        self._unchained: set[str] = set()

    def add(self, record: TopicRecord) -> None:
        entry_id, seq = record.entry.get("entry_id"), record.entry.get("seq")
        # Older ids are entries trimmed from the stream, or an earlier chain
        # (a stream begun again from seq 1).
        if not _is_id(entry_id) or _id_tuple(str(entry_id)) < self._first:
            return
        if not isinstance(seq, int) or seq <= 0:
            self._unchained.add(str(entry_id))
        elif seq - self._low < len(self._bits):
            self._bits[seq - self._low] = 1

    def holds(self, entry: AuditEntry) -> bool:
        if entry.seq <= 0:
            return entry.entry_id in self._unchained
        at = entry.seq - self._low
        return 0 <= at < len(self._bits) and self._bits[at] == 1


class AuditForwarder:
    """One admin API process's share of re-sending missed audit entries.

    Parameters
    ----------
    redis
        An asyncio client with ``decode_responses=False``.
    settings
        ``redis``, ``kafka.request_timeout_s`` and ``admin``
        (``audit_forward_interval_s``, ``audit_kafka_timeout_s``).
    topic
        The producer the process's audit log uses.
    metrics
        Where the backlog, lease and re-sends are shown; None shows nothing.
    """

    def __init__(
        self,
        redis: RedisClient,
        settings: Settings,
        topic: AuditTopic,
        metrics: AdminMetrics | None = None,
    ) -> None:
        prefix = settings.redis.key_prefix
        self._redis = redis
        self._topic = topic
        self._metrics = metrics
        self._stream = f"{prefix}:admin:audit"
        self._lease = f"{prefix}:{{admin-audit}}:forwarder"
        self._cursor = f"{prefix}:{{admin-audit}}:cursor"
        self._cursor_seq = f"{prefix}:{{admin-audit}}:cursor-seq"
        self._acked = acked_key(settings)
        self._timeout_s = settings.redis.socket_timeout_s
        self._interval_s = settings.admin.audit_forward_interval_s
        self._lease_ms = int(
            (3 * self._interval_s + settings.kafka.request_timeout_s) * 1000
        )
        self._grace_ms = int(settings.admin.audit_kafka_timeout_s * 1000) + 1000
        self._id = uuid.uuid4().hex
        self._take_lease = redis.register_script(LEASE_LUA)
        self._move_cursor = redis.register_script(CURSOR_LUA)
        self._task: asyncio.Task[None] | None = None

    @property
    def cursor_key(self) -> str:
        return self._cursor

    @property
    def cursor_seq_key(self) -> str:
        return self._cursor_seq

    def start(self) -> None:
        """Run :meth:`run_once` every ``admin.audit_forward_interval_s`` in
        the background until :meth:`close`."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        """Stop the background task; idempotent. The lease is left to
        expire (another process takes over then)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except StoreError as exc:
                logger.warning("audit forwarder pass failed on Redis: %s", exc.message)
            except Exception:
                # A bug must not end re-sending for the process's life.
                logger.exception("audit forwarder pass failed")
            await asyncio.sleep(self._interval_s)

    async def run_once(self) -> int | None:
        """One pass: take the lease, re-send what is due, move the cursor.

        Returns
        -------
        int | None
            The backlog left (entries due and not on the topic, within
            :data:`BATCH`), or None when another process holds the lease or
            the first pass ever cannot read the topic yet.

        Raises
        ------
        StoreError
            Redis could not be reached.
        """
        # Step: the lease.
        async with redis_guard("admin.audit.lease", self._timeout_s, self._redis):
            held = await self._take_lease(
                keys=[self._lease], args=[self._id, self._lease_ms]
            )
        if self._metrics is not None:
            self._metrics.audit_forwarder.set(int(held))
        if not int(held):
            if self._metrics is not None:
                self._metrics.audit_backlog.set(0)
            return None

        # Step: what lies after the cursor, and which of it the broker has.
        loaded = await self._load_cursor()
        if loaded is None:
            return None
        cursor, cursor_seq = loaded
        async with redis_guard("admin.audit.forward", self._timeout_s, self._redis):
            seconds, micros = await self._redis.time()
            rows = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                await self._redis.xrange(self._stream, f"({cursor}", "+", count=BATCH),
            )
            scores: list[Any] = (
                await self._redis.zmscore(self._acked, [r[0].decode() for r in rows])
                if rows
                else []
            )
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        entries = [entry_from_stream(entry_id, row) for entry_id, row in rows]
        acked = [score is not None for score in scores]

        # Step: entries trimmed from the stream before they reached the topic.
        if entries and 0 < cursor_seq < entries[0].seq - 1:
            cursor_seq = await self._count_lost(cursor, cursor_seq, entries[0])

        # Step: re-send the unacknowledged entries that are due, in order,
        # up to the first one whose action may still be waiting for Kafka.
        due: list[tuple[AuditEntry, bool]] = []
        for entry, done in zip(entries, acked, strict=True):
            if not done and _id_tuple(entry.entry_id)[0] > now_ms - self._grace_ms:
                break
            due.append((entry, done))
        to_send = [entry for entry, done in due if not done]
        sent = await self._topic.resend(to_send)
        if sent:
            logger.info(
                "re-sent %d audit entries to the topic",
                sent,
                extra={"entry_id": to_send[0].entry_id},
            )

        # Step: move the cursor over the entries now on the topic.
        passed: list[AuditEntry] = []
        unsent = sent
        for entry, done in due:
            if not done:
                if unsent == 0:
                    break
                unsent -= 1
            passed.append(entry)
        if passed:
            # An unchained entry (seq 0) leaves the seq unknown: no gap check.
            await self._move(
                passed[-1].entry_id,
                max(passed[-1].seq, 0),
                [e.entry_id for e in passed],
            )
        backlog = len(to_send) - sent
        if self._metrics is not None:
            self._metrics.audit_backlog.set(backlog)
        return backlog

    async def _move(self, cursor: str, seq: int, passed: list[str]) -> None:
        """Set the cursor and its seq, forgetting ``passed`` marks, while
        the lease is held (``lua/audit_cursor.lua``)."""
        async with redis_guard("admin.audit.forward", self._timeout_s, self._redis):
            await self._move_cursor(
                keys=[self._lease, self._cursor, self._acked, self._cursor_seq],
                args=[self._id, cursor, _id_tuple(cursor)[0], seq, *passed],
            )

    async def _count_lost(self, cursor: str, cursor_seq: int, first: AuditEntry) -> int:
        """Log and count the entries between the cursor and ``first`` that
        the stream trimmed before the topic had them, and account for them
        (the cursor's seq moves up to ``first``'s predecessor, so that no
        later pass counts them again). Returns the new cursor seq."""
        missing = first.seq - cursor_seq - 1
        # Entries acknowledged when their action ran reached the topic even
        # though the forwarder never passed them.
        low, high = _id_tuple(cursor), _id_tuple(first.entry_id)
        async with redis_guard("admin.audit.forward", self._timeout_s, self._redis):
            marks = cast(
                list[bytes],
                await self._redis.zrangebyscore(self._acked, low[0], high[0]),
            )
        acked = sum(1 for m in marks if low < _id_tuple(m.decode()) < high)
        lost = max(0, missing - acked)
        if lost:
            if self._metrics is not None:
                self._metrics.audit_lost.inc(lost)
            logger.error(
                "[%s] %d audit entries (seq %d to %d) were trimmed from the Redis "
                "stream before they reached the topic; raise "
                "admin.audit_max_entries or bring Kafka back sooner",
                LOST_CODE,
                lost,
                cursor_seq + 1,
                first.seq - 1,
                extra={
                    "code": LOST_CODE,
                    "lost": lost,
                    "first_seq": cursor_seq + 1,
                    "last_seq": first.seq - 1,
                },
            )
        await self._move(cursor, first.seq - 1, [])
        return first.seq - 1

    async def _load_cursor(self) -> tuple[str, int] | None:
        """The cursor and its seq (0: unknown); placed on the first pass
        ever by :meth:`_first_cursor`. None while that cannot read the
        topic."""
        async with redis_guard("admin.audit.forward", self._timeout_s, self._redis):
            stored, seq = await self._redis.mget(self._cursor, self._cursor_seq)
        if stored is not None:
            return cast(bytes, stored).decode(), int(seq or 0)
        try:
            start, start_seq = await self._first_cursor()
        except BrokerError as exc:
            logger.warning(
                "audit forwarder waits for Kafka to place its first cursor: %s",
                exc.message,
            )
            return None
        await self._move(start, start_seq, [])
        logger.info(
            "audit forwarder cursor placed", extra={"entry_id": start, "seq": start_seq}
        )
        return start, start_seq

    async def _first_cursor(self) -> tuple[str, int]:
        """The id (and seq) just before the stream's oldest entry that is
        neither on the topic nor acknowledged; the newest entry's when all
        are, ``0-0`` when the oldest is not.

        Raises
        ------
        BrokerError
            The topic could not be read.
        """
        async with redis_guard("admin.audit.forward", self._timeout_s, self._redis):
            oldest = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                await self._redis.xrange(self._stream, "-", "+", count=1),
            )
            newest = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                await self._redis.xrevrange(self._stream, "+", "-", count=1),
            )
        if not oldest or not newest:
            return _START, 0
        first, last = entry_from_stream(*oldest[0]), entry_from_stream(*newest[0])
        on_topic = _OnTopic(first, last)
        since_ms = _id_tuple(first.entry_id)[0] - _CLOCK_SLACK_MS
        await self._topic.scan(on_topic.add, since_ms=max(0, since_ms))

        cursor, cursor_seq = _START, 0
        lower = "-"
        while True:
            async with redis_guard("admin.audit.forward", self._timeout_s, self._redis):
                rows = cast(
                    list[tuple[bytes, dict[bytes, bytes]]],
                    await self._redis.xrange(self._stream, lower, "+", count=BATCH),
                )
                scores: list[Any] = (
                    await self._redis.zmscore(
                        self._acked, [r[0].decode() for r in rows]
                    )
                    if rows
                    else []
                )
            for (entry_id, row), score in zip(rows, scores, strict=True):
                entry = entry_from_stream(entry_id, row)
                if score is None and not on_topic.holds(entry):
                    return cursor, cursor_seq
                cursor, cursor_seq = entry.entry_id, max(entry.seq, 0)
            if len(rows) < BATCH:
                return cursor, cursor_seq
            lower = f"({cursor}"
