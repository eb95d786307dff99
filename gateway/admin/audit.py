"""The admin audit log: who did what, when, from where, with what outcome.

Entries go to the Redis stream ``{prefix}:admin:audit``, trimmed to about
``admin.audit_max_entries`` (approximate trimming, so Redis trims whole
nodes cheaply), and each is also logged at INFO on this module's logger so a
log shipper keeps a copy past the cap. Each entry is chained to the one
before it and signed under ``admin.audit_key`` (:mod:`gateway.admin.audit_chain`);
the append runs as one Lua script (``lua/audit_append.lua``) that adds the
entry only if the chain head it was signed against is still the newest, so
concurrent admin replicas cannot fork the chain.

With an :class:`~gateway.admin.audit_topic.AuditTopic` (the admin API has
one), each entry also goes to the Kafka topic ``kafka.topics.audit``, which
keeps it for ``kafka.topics.audit_retention_ms``; entries the broker
acknowledges are marked in Redis, and those it did not are re-sent later by
:class:`~gateway.admin.audit_forward.AuditForwarder`.

Imports Redis and the gateway's config and store helpers only (the audit
topic, which imports aiokafka, is handed in).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, cast

from gateway import protocol
from gateway.admin.audit_chain import Chained, canonical, key_id, link_hash, sign
from gateway.config import Settings
from gateway.errors import StoreError
from gateway.store import RedisClient, redis_guard

if TYPE_CHECKING:
    from gateway.admin.audit_topic import AuditTopic

logger = logging.getLogger(__name__)

_MAX_DETAIL_CHARS = 500
APPEND_LUA: bytes = (
    resources.files("gateway").joinpath("lua/audit_append.lua").read_bytes()
)
# Appends that find the chain head moved (another replica appended first)
# sign again; this many in a row means something keeps writing the stream.
_MAX_APPEND_ATTEMPTS = 50


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audited action.

    ``outcome`` is ``ok``, ``denied`` (refused by authentication, role, lock or
    rate) or ``failed`` (allowed but could not be done, e.g. not found).
    ``detail`` never holds a password, code, token or key secret.
    ``seq``, ``prev``, ``hash``, ``mac`` and ``kid`` are its link in the
    chain (:mod:`gateway.admin.audit_chain`); empty for entries written
    before chaining (``kid`` for entries signed before key ids).
    """

    entry_id: str
    ts_ms: int
    actor: str
    action: str
    target: str
    source: str
    outcome: str
    detail: dict[str, str] = field(default_factory=dict)
    seq: int = 0
    prev: str = ""
    hash: str = ""
    mac: str = ""
    kid: str = ""

    def chained(self) -> Chained:
        """The entry as :func:`gateway.admin.audit_chain.verify` reads it."""
        return Chained(
            entry_id=self.entry_id,
            seq=self.seq,
            prev=self.prev,
            hash=self.hash,
            mac=self.mac,
            ts_ms=self.ts_ms,
            actor=self.actor,
            action=self.action,
            target=self.target,
            source=self.source,
            outcome=self.outcome,
            detail=self.detail,
            kid=self.kid,
        )


def audit_key(settings: Settings) -> bytes | None:
    """The HMAC key of the chain, ``admin.audit_key``; None when unset."""
    secret = settings.admin.audit_key
    return None if secret is None else secret.get_secret_value().encode()


def audit_keys(settings: Settings) -> list[bytes]:
    """Every key an entry may be signed under: ``admin.audit_key`` first,
    then ``admin.audit_retired_keys``; empty when none is set."""
    current = audit_key(settings)
    retired = [s.get_secret_value().encode() for s in settings.admin.audit_retired_keys]
    return ([current] if current is not None else []) + retired


def acked_key(settings: Settings) -> str:
    """The sorted set of stream ids the broker acknowledged and the
    forwarder has not yet passed, scored by the id's millisecond
    (gateway/admin/audit_forward.py)."""
    return f"{settings.redis.key_prefix}:{{admin-audit}}:acked"


class AuditLog:
    """Append and read audit entries.

    Parameters
    ----------
    redis
        An asyncio client with ``decode_responses=False``.
    settings
        ``redis.key_prefix``, ``redis.socket_timeout_s``,
        ``admin.audit_max_entries``, ``admin.audit_key``.
    topic
        Where each entry is also produced; None: the stream and log only.
    """

    def __init__(
        self, redis: RedisClient, settings: Settings, topic: AuditTopic | None = None
    ) -> None:
        self._redis = redis
        self._key = f"{settings.redis.key_prefix}:admin:audit"
        self._acked = acked_key(settings)
        self._timeout_s = settings.redis.socket_timeout_s
        self._max_entries = settings.admin.audit_max_entries
        self._topic = topic
        self._mac_key = audit_key(settings)
        self._kid = "" if self._mac_key is None else key_id(self._mac_key)
        self._append = redis.register_script(APPEND_LUA)
        # The newest entry's (hash, seq) as this process last saw it: a guess
        # the append script checks, so one process's appends usually take
        # one round trip.
        self._head: tuple[str, int] = ("", 0)
        # Held from the stream append to the hand-over to the producer, so
        # that the topic receives entries in the stream's order (one actor's
        # on one partition stay in it), and so this process's appends do not
        # race each other for the chain head; the broker's acknowledgement is
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
        logger.info(
            "audit %s %s",
            action,
            outcome,
            extra={"actor": actor, "target": target, "source": source},
        )
        unchained = AuditEntry(
            entry_id="",
            ts_ms=ts_ms,
            actor=actor,
            action=action,
            target=target,
            source=source,
            outcome=outcome,
            detail=details,
        )
        # Kafka's share of this action's time starts now, not once the lock
        # is ours: entries queued behind one waiting for Kafka wait at most
        # their own timeout, not one more per entry ahead.
        deadline = None if self._topic is None else self._topic.deadline()
        async with self._order:
            entry = await self._append_chained(unchained)
            if self._topic is None:
                return
            pending = await self._topic.enqueue(entry, deadline)
        if await self._topic.confirm(pending):
            await self._mark_acked(entry.entry_id)

    async def _append_chained(self, entry: AuditEntry) -> AuditEntry:
        """Sign ``entry`` against the chain head and append it, signing
        again whenever another writer moved the head first."""
        prev, prev_seq = self._head
        for _ in range(_MAX_APPEND_ATTEMPTS):
            seq = prev_seq + 1
            entry_hash = link_hash(
                canonical(
                    seq=seq,
                    prev=prev,
                    ts_ms=entry.ts_ms,
                    actor=entry.actor,
                    action=entry.action,
                    target=entry.target,
                    source=entry.source,
                    outcome=entry.outcome,
                    detail=entry.detail,
                )
            )
            mac = sign(self._mac_key, entry_hash)
            args: list[Any] = [prev, str(prev_seq), self._max_entries]
            args += ["ts_ms", entry.ts_ms, "actor", entry.actor]
            args += ["action", entry.action, "target", entry.target]
            args += ["source", entry.source, "outcome", entry.outcome]
            for name, value in entry.detail.items():
                args += [f"d.{name}", value]
            args += ["seq", seq, "prev", prev, "hash", entry_hash, "mac", mac]
            if self._kid:
                args += ["kid", self._kid]
            async with redis_guard("admin.audit.record", self._timeout_s, self._redis):
                result = cast(
                    list[Any], await self._append(keys=[self._key], args=args)
                )
            if int(result[0]) == 1:
                self._head = (entry_hash, seq)
                return AuditEntry(
                    entry_id=_text(result[1]),
                    ts_ms=entry.ts_ms,
                    actor=entry.actor,
                    action=entry.action,
                    target=entry.target,
                    source=entry.source,
                    outcome=entry.outcome,
                    detail=entry.detail,
                    seq=seq,
                    prev=prev,
                    hash=entry_hash,
                    mac=mac,
                    kid=self._kid,
                )
            prev, prev_seq = _text(result[1]), int(_text(result[2]) or "0")
        raise StoreError(
            f"admin.audit.record: the chain head moved {_MAX_APPEND_ATTEMPTS} "
            "times in a row"
        )

    async def _mark_acked(self, entry_id: str) -> None:
        """Tell the forwarder the broker has this entry. Failing here only
        costs a duplicate on the topic (the forwarder sends it again)."""
        try:
            async with redis_guard("admin.audit.acked", self._timeout_s, self._redis):
                await self._redis.zadd(
                    self._acked, {entry_id: int(entry_id.partition("-")[0])}
                )
        except StoreError as exc:
            logger.warning(
                "audit entry %s reached Kafka but could not be marked so; it "
                "will be sent again: %s",
                entry_id,
                exc.message,
                extra={"entry_id": entry_id},
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
        return [entry_from_stream(entry_id, row) for entry_id, row in rows]

    async def pages(self, page: int = 1000) -> AsyncIterator[list[AuditEntry]]:
        """Every entry in the stream, oldest first, ``page`` at a time: one
        round trip and at most ``page`` entries in memory per step (for
        verification of a stream of any length).

        Raises
        ------
        StoreError
            Redis could not be reached.
        """
        lower = "-"
        while True:
            async with redis_guard("admin.audit.read", self._timeout_s, self._redis):
                rows = cast(
                    list[tuple[bytes, dict[bytes, bytes]]],
                    await self._redis.xrange(self._key, lower, "+", count=page),
                )
            if rows:
                yield [entry_from_stream(entry_id, row) for entry_id, row in rows]
            if len(rows) < page:
                return
            lower = f"({_text(rows[-1][0])}"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def entry_from_stream(entry_id: bytes, row: dict[bytes, bytes]) -> AuditEntry:
    """An entry as the stream holds it (fields as bytes)."""
    text = {k.decode(): v.decode() for k, v in row.items()}
    seq = text.get("seq", "0")
    return AuditEntry(
        entry_id=entry_id.decode(),
        ts_ms=int(text.get("ts_ms", "0")),
        actor=text.get("actor", ""),
        action=text.get("action", ""),
        target=text.get("target", ""),
        source=text.get("source", ""),
        outcome=text.get("outcome", ""),
        detail={k[2:]: v for k, v in text.items() if k.startswith("d.")},
        seq=int(seq) if seq.isdigit() else -1,
        prev=text.get("prev", ""),
        hash=text.get("hash", ""),
        mac=text.get("mac", ""),
        kid=text.get("kid", ""),
    )
