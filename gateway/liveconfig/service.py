"""Publishing the live configuration: validate, version, publish, audit.

``ConfigService`` is the one library behind ``modelgate config`` and the admin
API. Every change is validated before anything is published; a change names
its parent version and is refused when that is no longer the current one; the
new version goes to the compacted topic ``live.topic`` (one partition, one key
per version) as a :class:`~gateway.liveconfig.document.ConfigRecord` carrying
author, time, parent, full document and the field-level diff, which is the
audit trail ``config history`` reads.

Publishers serialise through a Redis lock (``{prefix}:config:lock``, expiring
after ``live.lock_ttl_s``), because Kafka has no compare-and-set: under the
lock the service reads the topic to its end, checks the parent, publishes and
only then releases. Workers acknowledge in the Redis hash
``{prefix}:config:acks`` (see :mod:`gateway.liveconfig.follower`).

Imports Kafka, Redis and the gateway's config; nothing from FastAPI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict

from gateway.config import Settings
from gateway.errors import BrokerError, ConfigError
from gateway.group_clients import close_clients
from gateway.liveconfig.document import (
    ChangeKind,
    ConfigConflict,
    ConfigRecord,
    FieldChange,
    LiveConfig,
    UnknownVersion,
    diff,
    get_path,
    live_links,
    parse_value,
    record_key,
    summarize,
    validate_document,
    with_changes,
)
from gateway.store import RedisClient, redis_from_settings, redis_guard
from gateway.topics import ensure_compacted_topic

logger = logging.getLogger(__name__)

# Release the lock only if it is still ours: it may have expired and been
# taken by another publisher meanwhile.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_LOCK_POLL_S = 0.05
_FETCH_MAX_WAIT_MS = 50


def acks_key(settings: Settings) -> str:
    return f"{settings.redis.key_prefix}:config:acks"


def lock_key(settings: Settings) -> str:
    return f"{settings.redis.key_prefix}:config:lock"


class WorkerAck(BaseModel):
    """What one worker last said about its configuration."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    worker_id: str
    version: int
    applied_at_ms: int
    seen_at_ms: int
    refused_version: int | None = None
    refused_reason: str | None = None

    def is_stale(self, ttl_s: float, now_ms: int | None = None) -> bool:
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        return now_ms - self.seen_at_ms > ttl_s * 1000


def parse_assignments(pairs: Sequence[str]) -> dict[str, Any]:
    """``["policy.flag_at=1.2", ...]`` to ``{"policy.flag_at": 1.2, ...}``."""
    changes: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{pair!r}: expected KEY=VALUE")
        changes[key.strip()] = parse_value(value.strip())
    return changes


def load_document_file(path: Path) -> dict[str, Any]:
    """A whole document from a ``.toml`` or ``.json`` file (not yet validated)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: not valid {path.suffix or 'JSON'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the document must be a table/object")
    return data


class ConfigService:
    """Read and change the live configuration; one instance per process.

    Use as ``async with ConfigService(settings) as svc``. Methods that change
    the configuration take ``actor`` (who, for the audit trail) and an optional
    ``parent``: the version the caller based its change on. A change whose
    parent is no longer current is refused with ``CONFIG_CONFLICT`` rather
    than silently overwriting a change made meanwhile.

    Parameters
    ----------
    settings
        ``live.*`` names the topic and timings; ``kafka`` and ``redis`` where
        they are. Version 1 (published with the first change) is built from
        this process's ``limits``, ``policy`` and ``detectors``.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._tp = TopicPartition(settings.live.topic, 0)
        self._records: dict[int, ConfigRecord] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._redis: RedisClient | None = None
        self._refresh_lock = asyncio.Lock()

    @property
    def redis(self) -> RedisClient | None:
        """The Redis client while started (for its breaker's metrics)."""
        return self._redis

    async def __aenter__(self) -> ConfigService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._consumer is not None:
            return
        s = self.settings
        timeout_s = s.kafka.request_timeout_s
        await ensure_compacted_topic(s, s.live.topic)
        self._redis = redis_from_settings(s)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka.bootstrap,
            enable_auto_commit=False,
            request_timeout_ms=int(timeout_s * 1000) + 10_000,
            # The broker answers a connection's requests in order, so a
            # refresh's ListOffsets waits behind a fetch's long poll (500 ms
            # at the default); the partition is paused between refreshes, and
            # this bounds the wait for a fetch still in flight after one.
            fetch_max_wait_ms=_FETCH_MAX_WAIT_MS,
        )
        self._producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka.bootstrap,
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=int(timeout_s * 1000),
        )
        try:
            await asyncio.wait_for(self._consumer.start(), timeout_s)
            await asyncio.wait_for(self._producer.start(), timeout_s)
        except (KafkaError, TimeoutError, OSError) as exc:
            await self.stop()
            raise BrokerError(f"cannot reach Kafka at {s.kafka.bootstrap}") from exc
        self._consumer.assign([self._tp])
        await self._consumer.seek_to_beginning(self._tp)
        # Fetch only inside refresh(): no background long poll is then in
        # flight when a refresh asks for the end offset.
        self._consumer.pause(self._tp)

    async def stop(self) -> None:
        consumer, producer, client = self._consumer, self._producer, self._redis
        self._consumer = self._producer = self._redis = None
        await close_clients(
            consumer, producer, client, self.settings.kafka.request_timeout_s
        )

    # -- reading -----------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the topic up to its current end (every version published
        before this call)."""
        consumer = self._consumer
        assert consumer is not None, "start() first"
        timeout_s = self.settings.kafka.request_timeout_s
        async with self._refresh_lock:
            try:
                async with asyncio.timeout(timeout_s):
                    end = (await consumer.end_offsets([self._tp]))[self._tp]
                    if await consumer.position(self._tp) < end:
                        consumer.resume(self._tp)
                        try:
                            while await consumer.position(self._tp) < end:
                                batch = await consumer.getmany(self._tp, timeout_ms=200)
                                for message in batch.get(self._tp, []):
                                    self._take(message.value, message.offset)
                        finally:
                            consumer.pause(self._tp)
            except (KafkaError, TimeoutError) as exc:
                raise BrokerError(
                    f"cannot read {self._tp.topic} within {timeout_s} s: {exc!r}"
                ) from exc

    def _take(self, value: bytes | None, offset: int) -> None:
        try:
            record = ConfigRecord.decode(value or b"")
        except ConfigError as exc:
            # Not ours to fix here: history skips it, workers refuse it.
            logger.warning(
                "unreadable configuration record: %s",
                exc.message,
                extra={"offset": offset},
            )
            return
        # A retried publish may write the same version twice: keep the first.
        self._records.setdefault(record.version, record)

    async def current(self) -> tuple[int, LiveConfig]:
        """The newest published version and its document; ``(0, settings)``
        before anything was published."""
        await self.refresh()
        if not self._records:
            return 0, LiveConfig.from_settings(self.settings)
        newest = max(self._records)
        return newest, self._records[newest].document

    async def get(self, key: str | None = None) -> Any:
        """The whole document as plain data, or the value at dotted ``key``."""
        _, document = await self.current()
        return document.as_dict() if key is None else get_path(document, key)

    async def history(self, limit: int = 50) -> list[ConfigRecord]:
        """The newest ``limit`` versions, oldest first."""
        await self.refresh()
        return [self._records[v] for v in sorted(self._records)[-limit:]]

    async def record(self, version: int) -> ConfigRecord:
        await self.refresh()
        found = self._records.get(version)
        if found is None:
            raise UnknownVersion(f"version {version}: never published")
        return found

    async def diff(
        self, against: LiveConfig | Mapping[str, Any] | int | None = None
    ) -> tuple[FieldChange, ...]:
        """From the current document to ``against`` (a proposed document or a
        version); with nothing, what the current version changed."""
        version, document = await self.current()
        if against is None:
            if version == 0:
                return ()
            record = self._records[version]
            parent = self._records.get(record.parent)
            return diff(parent.document if parent else None, document)
        if isinstance(against, int):
            return diff(document, (await self.record(against)).document)
        if not isinstance(against, LiveConfig):
            against = validate_document(against)
        return diff(document, against)

    async def status(self) -> list[WorkerAck]:
        """Every worker's last acknowledgement, by worker id."""
        assert self._redis is not None, "start() first"
        async with redis_guard(
            "config acks", self.settings.redis.socket_timeout_s, self._redis
        ):
            raw = await self._redis.hgetall(acks_key(self.settings))
        acks = []
        for worker_id, blob in raw.items():
            try:
                acks.append(WorkerAck.model_validate_json(blob))
            except ValueError:
                logger.warning(
                    "unreadable acknowledgement", extra={"worker": worker_id}
                )
        return sorted(acks, key=lambda a: a.worker_id)

    # -- changing ----------------------------------------------------------------

    async def set(
        self, changes: Mapping[str, Any], actor: str, *, parent: int | None = None
    ) -> ConfigRecord | None:
        """Set dotted keys (``{"policy.flag_at": 1.2}``); values are checked
        against the field's type and bounds. ``None`` when nothing changed."""
        if not changes:
            raise ConfigError("no KEY=VALUE given")
        summary = ", ".join(f"{k}={json.dumps(v)}" for k, v in changes.items())
        return await self._publish(
            lambda current: with_changes(self._with_links(current), changes),
            actor,
            parent,
            "set",
            f"set {summary}",
        )

    def _with_links(self, document: LiveConfig) -> LiveConfig:
        """``document`` with an absent ``links`` section filled from this
        process's settings, so that setting one field keeps the others at the
        values the workers run rather than at the defaults."""
        if document.links is not None:
            return document
        return document.model_copy(
            update={"links": live_links(self.settings.cross_client)}
        )

    async def apply(
        self,
        document: LiveConfig | Mapping[str, Any],
        actor: str,
        *,
        parent: int | None = None,
        source: str = "document",
    ) -> ConfigRecord | None:
        """Replace the whole document; fields it omits take their defaults."""
        new = (
            document
            if isinstance(document, LiveConfig)
            else validate_document(document)
        )
        return await self._publish(
            lambda _current: new, actor, parent, "apply", f"apply {source}"
        )

    async def rollback(
        self, version: int, actor: str, *, parent: int | None = None
    ) -> ConfigRecord | None:
        """Publish version ``version``'s document again, as a new version."""
        target = (await self.record(version)).document
        return await self._publish(
            lambda _current: target, actor, parent, "rollback", f"rollback to {version}"
        )

    async def _publish(
        self,
        build: Callable[[LiveConfig], LiveConfig],
        actor: str,
        parent: int | None,
        kind: ChangeKind,
        what: str,
    ) -> ConfigRecord | None:
        token = await self._lock()
        try:
            version, current = await self.current()
            if parent is not None and parent != version:
                raise ConfigConflict(
                    f"parent version {parent} is stale: the current version is "
                    f"{version}; re-read it and apply your change on top"
                )
            new = build(current)
            changes = diff(current, new)
            if not changes:
                return None
            if version == 0:
                # The baseline goes first, so history shows what the first
                # change changed and a rollback can return to it.
                await self._send(
                    ConfigRecord(
                        version=1,
                        parent=0,
                        author=actor,
                        at_ms=_now_ms(),
                        kind="initial",
                        document=current,
                        changes=diff(None, current),
                        summary="initial version from the publisher's settings",
                    )
                )
                version = 1
            record = ConfigRecord(
                version=version + 1,
                parent=version,
                author=actor,
                at_ms=_now_ms(),
                kind=kind,
                document=new,
                changes=changes,
                summary=f"{what}: {summarize(changes)}"[:4000],
            )
            await self._send(record)
        finally:
            await self._unlock(token)
        logger.info(
            "configuration version %d published by %s: %s",
            record.version,
            actor,
            record.summary,
            extra={"version": record.version, "parent": record.parent},
        )
        return record

    async def _send(self, record: ConfigRecord) -> None:
        assert self._producer is not None, "start() first"
        timeout_s = min(
            self.settings.kafka.request_timeout_s, self.settings.live.lock_ttl_s / 2
        )
        try:
            await asyncio.wait_for(
                self._producer.send_and_wait(
                    self._tp.topic,
                    record.encode(),
                    key=record_key(record.version),
                    partition=0,
                ),
                timeout_s,
            )
        except (KafkaError, TimeoutError) as exc:
            raise BrokerError(
                f"version {record.version} not published to {self._tp.topic}: {exc!r}"
            ) from exc
        self._records.setdefault(record.version, record)

    async def _lock(self) -> str:
        """Take the publishers' lock, waiting up to ``live.lock_ttl_s``."""
        assert self._redis is not None, "start() first"
        token = secrets.token_hex(16)
        ttl_ms = int(self.settings.live.lock_ttl_s * 1000)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.live.lock_ttl_s
        timeout_s = self.settings.redis.socket_timeout_s
        while True:
            async with redis_guard("config lock", timeout_s, self._redis):
                taken = await self._redis.set(
                    lock_key(self.settings), token, nx=True, px=ttl_ms
                )
            if taken:
                return token
            if loop.time() > deadline:
                raise ConfigConflict(
                    "another configuration change is being published; try again"
                )
            await asyncio.sleep(_LOCK_POLL_S)  # polling a lock held by another

    async def _unlock(self, token: str) -> None:
        assert self._redis is not None
        async with redis_guard(
            "config unlock", self.settings.redis.socket_timeout_s, self._redis
        ):
            await self._redis.eval(_RELEASE_LUA, 1, lock_key(self.settings), token)


def _now_ms() -> int:
    return int(time.time() * 1000)
