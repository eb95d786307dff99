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
may still be waiting for its own acknowledgement. The first pass with no
cursor in Redis starts at the stream's newest entry, so entries written
before the upgrade that added the forwarder are not re-sent.

Known shortcoming: an entry trimmed from the stream (past
``admin.audit_max_entries``) before it reached the topic is lost to the topic;
the backlog gauge shows the debt growing long before that.

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
from gateway.admin.audit_topic import AuditTopic
from gateway.admin.metrics import AdminMetrics
from gateway.config import Settings
from gateway.errors import StoreError
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


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or "0")


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
            :data:`BATCH`), or None when another process holds the lease.

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
        cursor = await self._load_cursor()
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
        passed: list[str] = []
        unsent = sent
        for entry, done in due:
            if not done:
                if unsent == 0:
                    break
                unsent -= 1
            passed.append(entry.entry_id)
        if passed:
            async with redis_guard("admin.audit.forward", self._timeout_s, self._redis):
                await self._move_cursor(
                    keys=[self._lease, self._cursor, self._acked],
                    args=[
                        self._id,
                        passed[-1],
                        _id_tuple(passed[-1])[0],
                        *passed,
                    ],
                )
        backlog = len(to_send) - sent
        if self._metrics is not None:
            self._metrics.audit_backlog.set(backlog)
        return backlog

    async def _load_cursor(self) -> str:
        """The cursor; set, on the first pass ever, to the newest entry."""
        async with redis_guard("admin.audit.forward", self._timeout_s, self._redis):
            stored = await self._redis.get(self._cursor)
            if stored is not None:
                return cast(bytes, stored).decode()
            newest = cast(
                list[tuple[bytes, Any]],
                await self._redis.xrevrange(self._stream, "+", "-", count=1),
            )
            start = newest[0][0].decode() if newest else _START
            await self._redis.set(self._cursor, start, nx=True)
            stored = await self._redis.get(self._cursor)
        return cast(bytes, stored).decode() if stored is not None else start
