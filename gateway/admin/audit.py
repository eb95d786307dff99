"""The admin audit log: who did what, when, from where, with what outcome.

Entries go to the Redis stream ``{prefix}:admin:audit``, trimmed to about
``admin.audit_max_entries`` (approximate trimming, so Redis trims whole
nodes cheaply), and each is also logged at INFO on this module's logger so a
log shipper keeps a copy past the cap.

TODO: no Kafka topic (``modelgate.audit``) yet: the admin API holds no
producer. Adding one would give a retention the stream's cap does not; until
then, ship this module's log lines for long-term retention.

Imports Redis and the gateway's config and store helpers only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from gateway import protocol
from gateway.config import Settings
from gateway.store import RedisClient, redis_guard

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
    """

    def __init__(self, redis: RedisClient, settings: Settings) -> None:
        self._redis = redis
        self._key = f"{settings.redis.key_prefix}:admin:audit"
        self._timeout_s = settings.redis.socket_timeout_s
        self._max_entries = settings.admin.audit_max_entries

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
        """Append one entry.

        Raises
        ------
        StoreError
            Redis could not be reached: the caller's action must then fail too,
            since it could not be audited.
        """
        fields: dict[Any, Any] = {
            "ts_ms": protocol.now_ms(),
            "actor": actor,
            "action": action,
            "target": target[:_MAX_DETAIL_CHARS],
            "source": source,
            "outcome": outcome,
        }
        for name, value in (detail or {}).items():
            fields[f"d.{name}"] = str(value)[:_MAX_DETAIL_CHARS]
        logger.info(
            "audit %s %s",
            action,
            outcome,
            extra={"actor": actor, "target": target, "source": source},
        )
        async with redis_guard("admin.audit.record", self._timeout_s, self._redis):
            await self._redis.xadd(
                self._key, fields, maxlen=self._max_entries, approximate=True
            )

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
