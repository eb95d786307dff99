"""The admin audit log: who did what, when, from where, with what outcome.

Entries go to the Redis stream ``{prefix}:admin:audit``, trimmed to about
``admin.audit_max_entries`` (approximate trimming, so Redis trims whole
nodes cheaply), and each is also logged at INFO on this module's logger so a
log shipper keeps a copy past the cap. With an
:class:`~gateway.admin.audit_topic.AuditTopic` (the admin API has one), each
entry also goes to the Kafka topic ``kafka.topics.audit``, which keeps it for
``kafka.topics.audit_retention_ms``; that module says what happens when Kafka
cannot take it (the action proceeds; the miss is logged at ERROR and counted).

Imports Redis and the gateway's config and store helpers only (the audit
topic, which imports aiokafka, is handed in).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from gateway import protocol
from gateway.config import Settings
from gateway.store import RedisClient, redis_guard

if TYPE_CHECKING:
    from gateway.admin.audit_topic import AuditTopic

logger = logging.getLogger(__name__)

_MAX_DETAIL_CHARS = 500


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audited action.

    ``outcome`` is ``ok``, ``denied`` (refused by authentication, role, lock or
    rate) or ``failed`` (allowed but could not be done, e.g. not found).
    ``detail`` never holds a password, code, token or key secret.
    """

    entry_id: str
    ts_ms: int
    actor: str
    action: str
    target: str
    source: str
    outcome: str
    detail: dict[str, str] = field(default_factory=dict)


class AuditLog:
    """Append and read audit entries.

    Parameters
    ----------
    redis
        An asyncio client with ``decode_responses=False``.
    settings
        ``redis.key_prefix``, ``redis.socket_timeout_s``,
        ``admin.audit_max_entries``.
    topic
        Where each entry is also produced; None: the stream and log only.
    """

    def __init__(
        self, redis: RedisClient, settings: Settings, topic: AuditTopic | None = None
    ) -> None:
        self._redis = redis
        self._key = f"{settings.redis.key_prefix}:admin:audit"
        self._timeout_s = settings.redis.socket_timeout_s
        self._max_entries = settings.admin.audit_max_entries
        self._topic = topic
        # Held from the stream append to the hand-over to the producer, so
        # that the topic receives entries in the stream's order (one actor's
        # on one partition stay in it); the broker's acknowledgement is
        # awaited outside it.
        self._order = asyncio.Lock()

    @property
    def key(self) -> str:
        return self._key

    async def record(
        self,
        *,
        actor: str,
        action: str,
        target: str,
        source: str,
        outcome: str,
        detail: Mapping[str, str] | None = None,
    ) -> None:
        """Append one entry (and produce it to the audit topic, if any).

        Raises
        ------
        StoreError
            Redis could not be reached: the caller's action must then fail too,
            since it could not be audited. Kafka failing raises nothing: see
            :mod:`gateway.admin.audit_topic`.
        """
        ts_ms = protocol.now_ms()
        target = target[:_MAX_DETAIL_CHARS]
        details = {
            name: str(value)[:_MAX_DETAIL_CHARS]
            for name, value in (detail or {}).items()
        }
        fields: dict[Any, Any] = {
            "ts_ms": ts_ms,
            "actor": actor,
            "action": action,
            "target": target,
            "source": source,
            "outcome": outcome,
        }
        for name, value in details.items():
            fields[f"d.{name}"] = value
        logger.info(
            "audit %s %s",
            action,
            outcome,
            extra={"actor": actor, "target": target, "source": source},
        )
        # Kafka's share of this action's time starts now, not once the lock
        # is ours: entries queued behind one waiting for Kafka wait at most
        # their own timeout, not one more per entry ahead.
        deadline = None if self._topic is None else self._topic.deadline()
        async with self._order:
            async with redis_guard("admin.audit.record", self._timeout_s, self._redis):
                entry_id = await self._redis.xadd(
                    self._key, fields, maxlen=self._max_entries, approximate=True
                )
            if self._topic is None:
                return
            entry = AuditEntry(
                entry_id=entry_id.decode()
                if isinstance(entry_id, bytes)
                else str(entry_id),
                ts_ms=ts_ms,
                actor=actor,
                action=action,
                target=target,
                source=source,
                outcome=outcome,
                detail=details,
            )
            pending = await self._topic.enqueue(entry, deadline)
        await self._topic.confirm(pending)

    async def read(
        self, limit: int = 100, before: str | None = None
    ) -> list[AuditEntry]:
        """The newest ``limit`` entries (older than entry id ``before`` if
        given), newest first."""
        upper = f"({before}" if before else "+"
        async with redis_guard("admin.audit.read", self._timeout_s, self._redis):
            rows = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                await self._redis.xrevrange(self._key, upper, "-", count=limit),
            )
        return [_entry(entry_id, row) for entry_id, row in rows]


def _entry(entry_id: bytes, row: dict[bytes, bytes]) -> AuditEntry:
    text = {k.decode(): v.decode() for k, v in row.items()}
    return AuditEntry(
        entry_id=entry_id.decode(),
        ts_ms=int(text.get("ts_ms", "0")),
        actor=text.get("actor", ""),
        action=text.get("action", ""),
        target=text.get("target", ""),
        source=text.get("source", ""),
        outcome=text.get("outcome", ""),
        detail={k[2:]: v for k, v in text.items() if k.startswith("d.")},
    )
