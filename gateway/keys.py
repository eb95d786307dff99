"""API keys: the server key, key records in Redis, and request authentication.

A client holds a token ``<key_id>.<secret>`` shown once at creation. Requests
name the key id and carry an HMAC of the value under the secret
(``gateway.protocol.sign``), so no secret ever travels through Kafka. Because
the worker must recompute that HMAC, the secret cannot be stored as a one-way
hash: it is encrypted at rest with Fernet under the server key, and only a
process holding the server key can recover it.

This module imports Redis, ``cryptography`` and the gateway's config, errors,
protocol and store modules; nothing from Kafka or FastAPI.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
import logging
import math
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.fernet import Fernet, InvalidToken
from redis.typing import EncodableT

from gateway import protocol
from gateway.config import PlanConfig, Settings
from gateway.errors import AuthError, ConfigError, StoreError
from gateway.store import RedisClient, check_client_id, redis_guard

logger = logging.getLogger(__name__)

KEY_ID_PREFIX = "mgk_"
KEY_ID_PATTERN = protocol.KEY_ID_PATTERN
SECRET_BYTES = 32

KeyStatus = Literal["active", "revoked"]

# Bounds the local cache so a flood of made-up key ids (each cached negatively)
# cannot grow a worker's memory without limit.
_CACHE_MAX_ENTRIES = 100_000
# While Redis is unreachable, a cached key may be used this long after it was
# last read (see KeyStore.get_many_or_stale): long enough to ride out a Redis
# restart or failover, short enough that an old revocation cannot be missed
# for longer than that.
STALE_IF_ERROR_S = 3_600.0
# Used for unknown keys so that refusing one costs about as much as checking a
# real signature; the value is irrelevant.
_DUMMY_SECRET = b"\x00" * SECRET_BYTES
_HEX_SIGNATURE = re.compile(r"^[0-9a-f]{64}$")
_URLSAFE_B64 = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")

# Both scripts touch one key only (the record), so they are cluster-safe; they
# run as EVAL because they are admin calls, not worth a SHA cache.
# Writes the record only if the id is new: ids are 48 random bits, so among a
# million keys a collision is unlikely but not negligible (~0.2 %).
_CREATE_IF_ABSENT_LUA = """
if redis.call("EXISTS", KEYS[1]) == 1 then return 0 end
redis.call("HSET", KEYS[1], unpack(ARGV))
return 1
"""
# Marks the record revoked only if it exists, so a typo creates nothing.
# Returns the key's client id (for the by-client index), or false.
_REVOKE_LUA = """
if redis.call("EXISTS", KEYS[1]) == 0 then return false end
redis.call("HSET", KEYS[1], "status", "revoked")
return redis.call("HGET", KEYS[1], "client_id")
"""
# Sets a key's plan and overrides only if the record exists; returns as
# _REVOKE_LUA does.
_SET_PLAN_LUA = """
if redis.call("EXISTS", KEYS[1]) == 0 then return false end
redis.call("HSET", KEYS[1], "plan", ARGV[1], "limit_overrides", ARGV[2])
return redis.call("HGET", KEYS[1], "client_id")
"""
# Version of the by-client index: the marker holding it says every record
# written before the index existed has been added (KeyStore.key_ids_of).
_CLIENT_INDEX_VERSION = b"1"
_CREATE_ATTEMPTS = 3
PLAN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def canonical_overrides(overrides: Mapping[str, Any] | None) -> str:
    """Per-key plan overrides as stored: canonical JSON, ``""`` for none.

    Raises
    ------
    ValueError
        Not a mapping of valid :class:`~gateway.config.PlanConfig` fields
        (checked on their own; the plan they will apply to may change live).
    """
    if not overrides:
        return ""
    PlanConfig.model_validate(dict(overrides))
    return json.dumps(dict(overrides), sort_keys=True, separators=(",", ":"))


def check_plan_name(plan: str) -> None:
    """Raise ``ValueError`` unless ``plan`` is a well-formed plan name."""
    if not PLAN_NAME_PATTERN.fullmatch(plan):
        raise ValueError(f"plan must match {PLAN_NAME_PATTERN.pattern}")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One API key with its decrypted secret.

    ``models`` empty means every served model. ``repr`` never shows the secret,
    so logging a key or an exception holding one cannot leak it. ``plan``
    names the limits plan (``limits.plans``; an unknown name gets the default
    plan) and ``limit_overrides`` is canonical JSON of PlanConfig fields that
    replace the plan's for this key (``""``: none).
    """

    key_id: str
    client_id: str
    secret: bytes = field(repr=False)
    models: tuple[str, ...]
    status: KeyStatus
    created_ms: int
    expires_ms: int | None = None
    plan: str = "default"
    limit_overrides: str = ""

    def allows_model(self, model: str) -> bool:
        """Whether this key is scoped to ``model`` (an empty scope allows all)."""
        return not self.models or model in self.models


# Step: the server key -------------------------------------------------------


def load_server_key(settings: Settings) -> bytes:
    """Return the Fernet key that encrypts API-key secrets at rest.

    Uses ``auth.server_key`` when set; otherwise reads ``auth.server_key_file``,
    creating it (mode 0600, parent directories 0700) with a fresh key if it does
    not exist. Blocking file I/O: call it at start-up, not on the event loop.

    Parameters
    ----------
    settings
        Process settings.

    Returns
    -------
    bytes
        The urlsafe-base64 Fernet key.

    Raises
    ------
    ConfigError
        The configured or stored key is not a valid Fernet key, or the file
        cannot be read or created.
    """
    if settings.auth.server_key is not None:
        key = settings.auth.server_key.get_secret_value().strip().encode()
        _check_fernet_key(key, "auth.server_key")
        return key

    path = settings.auth.server_key_file
    try:
        key = _read_or_create_key_file(path)
    except OSError as exc:
        raise ConfigError(
            f"auth.server_key_file: cannot read or create {path}: {exc.strerror}"
        ) from exc
    _check_fernet_key(key, "auth.server_key_file")
    return key


def _read_or_create_key_file(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Write a complete file under a temporary name, then link it into place:
        # link fails if another process won the race, and nobody ever reads a
        # half-written key.
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".server.key.")
        try:
            # mkstemp creates the file 0600 already; a written-down mode survives
            # a reader's doubt and a future change of helper.
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(Fernet.generate_key() + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp_name, path)
                logger.info("created server key file", extra={"path": str(path)})
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp_name)

    mode = path.stat().st_mode
    if mode & 0o077:
        logger.warning(
            "server key file is readable by group or others",
            extra={"path": str(path), "mode": oct(mode & 0o777)},
        )
    return path.read_bytes().strip()


def _check_fernet_key(key: bytes, source: str) -> None:
    try:
        Fernet(key)
    except (ValueError, binascii.Error) as exc:
        raise ConfigError(f"{source}: not a valid Fernet key") from exc


# Step: encryption at rest -----------------------------------------------------


def encrypt_secret(fernet: Fernet, key_id: str, secret: bytes) -> bytes:
    """Encrypt ``secret`` bound to ``key_id``.

    Fernet has no associated data, so the key id goes inside the plaintext; a
    ciphertext copied onto another key's record then fails to decrypt there.
    """
    return fernet.encrypt(key_id.encode("ascii") + b"\x00" + secret)


def decrypt_secret(fernet: Fernet, key_id: str, token: bytes) -> bytes | None:
    """Inverse of :func:`encrypt_secret`; ``None`` if the token is not valid for
    this server key and key id."""
    try:
        plain = fernet.decrypt(token)
    except InvalidToken:
        return None
    bound_id, sep, secret = plain.partition(b"\x00")
    if not sep or bound_id != key_id.encode("ascii"):
        return None
    return secret


# Step: tokens -------------------------------------------------------------------


def format_token(key_id: str, secret: bytes) -> str:
    """The one-time token shown to the key's owner: ``<key_id>.<urlsafe b64>``."""
    encoded = base64.urlsafe_b64encode(secret).rstrip(b"=").decode("ascii")
    return f"{key_id}.{encoded}"


class KeyStore:
    """API-key records in Redis, with a short-lived local cache.

    Layout: ``{prefix}:key:{<key_id>}`` is a hash (``client_id``,
    ``secret_enc``, ``models`` as JSON, ``status``, ``created_ms``,
    ``expires_ms``, empty when none; ``plan`` and ``limit_overrides``, absent
    in records older than plans); ``{prefix}:keys`` is the set of ids, for
    listing; ``{prefix}:client-keys:{<client_id>}`` the set of one client's
    key ids, revoked ones included (:meth:`key_ids_of`). The key id is the
    hash tag so a lookup touches one slot on Redis Cluster. Records and the
    id sets never expire (unlike every per-client counter): revoked and
    expired keys stay for audit.

    Parameters
    ----------
    redis
        An asyncio client with ``decode_responses=False``.
    settings
        Process settings: ``redis.key_prefix``, ``redis.socket_timeout_s``,
        ``auth.key_cache_ttl_s`` and the server key.
    server_key
        The Fernet key; loaded with :func:`load_server_key` when omitted.
    """

    def __init__(
        self, redis: RedisClient, settings: Settings, *, server_key: bytes | None = None
    ) -> None:
        self._redis = redis
        self._prefix = settings.redis.key_prefix
        self._timeout_s = settings.redis.socket_timeout_s
        self._cache_ttl_s = settings.auth.key_cache_ttl_s
        self._fernet = Fernet(server_key or load_server_key(settings))
        # key_id -> (monotonic expiry, record or None for "not found").
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}

    def record_key(self, key_id: str) -> str:
        """Redis key of one API-key hash."""
        return f"{self._prefix}:key:{{{key_id}}}"

    @property
    def index_key(self) -> str:
        """Redis key of the set of all key ids."""
        return f"{self._prefix}:keys"

    def client_index_key(self, client_id: str) -> str:
        """Redis key of the set of one client's key ids."""
        return f"{self._prefix}:client-keys:{{{client_id}}}"

    @property
    def client_index_marker(self) -> str:
        """Redis key saying the by-client index covers every record (its
        value is the index's version)."""
        return f"{self._prefix}:client-keys:built"

    @staticmethod
    def parse_token(token: str) -> tuple[str, bytes]:
        """Split a token into its key id and secret.

        Raises
        ------
        AuthError
            ``AUTH_UNKNOWN_KEY`` if the part before the ``.`` is not a key id
            (no key can have it); ``AUTH_BAD_SIGNATURE`` if it is one but the
            secret after it is missing or malformed, the code a wrong secret
            gets (such a secret cannot sign). Which one says nothing about
            whether a key exists: no store is asked. The message never
            repeats the token.

        Examples
        --------
        >>> key_id, secret = KeyStore.parse_token(format_token("mgk_" + "0" * 12,
        ...                                                    b"s" * 32))
        >>> key_id, len(secret)
        ('mgk_000000000000', 32)
        """
        key_id, sep, encoded = token.strip().partition(".")
        if not KEY_ID_PATTERN.fullmatch(key_id):
            raise AuthError(
                "malformed API key token: it must be the whole token "
                "`modelgate keys create` printed, <key id>.<secret>, the key id "
                "being mgk_ and 12 lowercase hex digits",
                code="AUTH_UNKNOWN_KEY",
            )
        fault = (
            "no secret follows it"
            if not encoded
            else f"the secret after its '.' is not the {SECRET_BYTES} bytes in "
            "URL-safe base64 that `modelgate keys create` printed"
        )
        bad_secret = AuthError(
            f"malformed API key token: the key id is well formed, but {fault}",
            code="AUTH_BAD_SIGNATURE",
        )
        # b64decode with altchars still accepts "+" and "/"; be strict.
        if not sep or not _URLSAFE_B64.fullmatch(encoded):
            raise bad_secret
        try:
            padded = encoded + "=" * (-len(encoded) % 4)
            secret = base64.b64decode(padded, altchars=b"-_", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise bad_secret from exc
        if len(secret) != SECRET_BYTES:
            raise bad_secret
        return key_id, secret

    async def check_token(self, token: str) -> tuple[str, bytes]:
        """:meth:`parse_token`, answering a malformed secret as the worker would.

        The worker looks a key up before it checks the signature
        (:func:`authenticate`), so a well-formed key id with a missing or
        malformed secret is ``AUTH_UNKNOWN_KEY`` when no key has that id and
        ``AUTH_BAD_SIGNATURE`` when one does. Everything that parses a token
        next to a key store (the front door, the CLI) asks it here, so every
        path gives one code for one token.

        Raises
        ------
        AuthError
            As :meth:`parse_token`, with ``AUTH_UNKNOWN_KEY`` for an unknown
            key id followed by a malformed secret.
        StoreError
            Redis could not be reached (asked only for a malformed secret).
        """
        try:
            return self.parse_token(token)
        except AuthError as exc:
            if exc.code != "AUTH_BAD_SIGNATURE":
                raise
            key_id = token.strip().partition(".")[0]
            if (await self.get_many([key_id])).get(key_id) is None:
                raise AuthError("unknown API key", code="AUTH_UNKNOWN_KEY") from None
            raise

    async def create(
        self,
        client_id: str,
        models: Iterable[str] = (),
        ttl_s: float | None = None,
        plan: str = "default",
        limit_overrides: Mapping[str, Any] | None = None,
    ) -> tuple[ApiKey, str]:
        """Create a key for ``client_id`` and return it with its one-time token.

        The token is the only place the secret appears in plain form; it is not
        stored or logged, so a lost token means a new key.

        Parameters
        ----------
        client_id
            The identity requests made with this key act as
            (``[A-Za-z0-9._@-]{1,128}``: it becomes part of Redis key names).
        models
            Models the key may call; empty means all.
        ttl_s
            Lifetime in seconds; ``None`` for a key that does not expire.
        plan
            The limits plan (see :class:`ApiKey`).
        limit_overrides
            PlanConfig fields replacing the plan's for this key.

        Raises
        ------
        ValueError
            Bad ``client_id``, model name, ``ttl_s``, plan name or overrides.
        StoreError
            Redis could not be reached.
        """
        check_client_id(client_id)
        scope = tuple(dict.fromkeys(models))
        if any(not m for m in scope):
            raise ValueError("model names must be non-empty")
        if ttl_s is not None and not (ttl_s > 0 and math.isfinite(ttl_s)):
            raise ValueError("ttl_s must be positive and finite")
        check_plan_name(plan)
        overrides = canonical_overrides(limit_overrides)

        for _ in range(_CREATE_ATTEMPTS):
            key, token = await self._create_once(
                client_id, scope, ttl_s, plan, overrides
            )
            if key is not None:
                logger.info(
                    "api key created",
                    extra={"client": client_id, "key_id": key.key_id, "models": scope},
                )
                return key, token
        raise StoreError(
            f"no free key id after {_CREATE_ATTEMPTS} attempts", retriable=True
        )

    async def _create_once(
        self,
        client_id: str,
        scope: tuple[str, ...],
        ttl_s: float | None,
        plan: str,
        overrides: str,
    ) -> tuple[ApiKey | None, str]:
        key_id = KEY_ID_PREFIX + secrets.token_hex(6)
        secret = secrets.token_bytes(SECRET_BYTES)
        created_ms = protocol.now_ms()
        expires_ms = None if ttl_s is None else created_ms + round(ttl_s * 1000)
        key = ApiKey(
            key_id=key_id,
            client_id=client_id,
            secret=secret,
            models=scope,
            status="active",
            created_ms=created_ms,
            expires_ms=expires_ms,
            plan=plan,
            limit_overrides=overrides,
        )
        fields: list[EncodableT] = [
            "client_id",
            client_id,
            "secret_enc",
            encrypt_secret(self._fernet, key_id, secret),
            "models",
            json.dumps(scope),
            "status",
            "active",
            "created_ms",
            created_ms,
            "expires_ms",
            "" if expires_ms is None else expires_ms,
            "plan",
            plan,
            "limit_overrides",
            overrides,
        ]

        # The record and the id sets live in different slots, so no MULTI.
        # The set entries go first and list() and key_ids_of() skip ids
        # without a record, so a failure in between leaves nothing usable
        # behind.
        async with redis_guard("keys.create", self._timeout_s, self._redis):
            pipe = self._redis.pipeline(transaction=False)
            pipe.sadd(self.index_key, key_id)
            pipe.sadd(self.client_index_key(client_id), key_id)
            pipe.eval(_CREATE_IF_ABSENT_LUA, 1, self.record_key(key_id), *fields)
            _, _, written = await pipe.execute()
        if not written:
            # The colliding id stays in this client's set: key_ids_of reads
            # the records, and the other key's names its own client.
            logger.warning(
                "api key id collision; drawing another", extra={"key_id": key_id}
            )
            return None, ""

        self._cache.pop(key_id, None)
        return key, format_token(key_id, secret)

    async def revoke(self, key_id: str) -> bool:
        """Mark a key revoked. Returns whether it existed.

        This process sees it at once; other processes within
        ``auth.key_cache_ttl_s``.
        """
        if not KEY_ID_PATTERN.fullmatch(key_id):
            return False
        async with redis_guard("keys.revoke", self._timeout_s, self._redis):
            client = await self._redis.eval(_REVOKE_LUA, 1, self.record_key(key_id))
        if not client:
            return False
        self._cache.pop(key_id, None)
        await self._index_client(key_id, client)
        logger.info("api key revoked", extra={"key_id": key_id})
        return True

    async def set_plan(
        self,
        key_id: str,
        plan: str,
        limit_overrides: Mapping[str, Any] | None = None,
    ) -> bool:
        """Give a key a plan and per-key overrides (replacing any it had).

        Workers apply it within ``auth.key_cache_ttl_s``, without a restart.
        Returns whether the key exists.

        Raises
        ------
        ValueError
            Bad plan name or overrides.
        StoreError
            Redis could not be reached.
        """
        check_plan_name(plan)
        overrides = canonical_overrides(limit_overrides)
        if not KEY_ID_PATTERN.fullmatch(key_id):
            return False
        async with redis_guard("keys.set_plan", self._timeout_s, self._redis):
            client = await self._redis.eval(
                _SET_PLAN_LUA, 1, self.record_key(key_id), plan, overrides
            )
        if not client:
            return False
        self._cache.pop(key_id, None)
        await self._index_client(key_id, client)
        logger.info(
            "api key plan set",
            extra={"key_id": key_id, "plan": plan, "overrides": overrides},
        )
        return True

    async def _index_client(self, key_id: str, client: object) -> None:
        """Put ``key_id`` in its client's set (again: idempotent), so a key
        the index build missed, written by an older process during an
        upgrade, is indexed once it is revoked or given a plan."""
        client_id = client.decode() if isinstance(client, bytes) else str(client)
        async with redis_guard("keys.index", self._timeout_s, self._redis):
            await self._redis.sadd(self.client_index_key(client_id), key_id)

    async def key_ids_of(self, client_id: str) -> builtins.list[str]:
        """The ids of every key issued to ``client_id`` (revoked and expired
        ones included), sorted; empty when none was.

        Reads the client's set and its records: O(keys of that client),
        whatever the number of keys. The first call ever against a Redis
        whose records predate the index (no marker) builds it first, once:
        every record is read then (:meth:`build_client_index`).

        Known shortcoming: during a rolling upgrade, a key created by a
        process older than the index after the build ran is in no client's
        set until it is revoked or given a plan; no key-creating process of
        an older version may run once the index is in use.

        Raises
        ------
        ValueError
            ``client_id`` is not a valid client id.
        StoreError
            Redis could not be reached.
        """
        check_client_id(client_id)
        async with redis_guard("keys.of_client", self._timeout_s, self._redis):
            built = await self._redis.get(self.client_index_marker)
        if built != _CLIENT_INDEX_VERSION:
            await self.build_client_index()
        async with redis_guard("keys.of_client", self._timeout_s, self._redis):
            members = await self._redis.smembers(self.client_index_key(client_id))
            ids = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
            pipe = self._redis.pipeline(transaction=False)
            for key_id in ids:
                pipe.hget(self.record_key(key_id), "client_id")
            owners = await pipe.execute() if ids else []
        # An id whose record is missing (a failed create) or names another
        # client (a colliding id drawn again) is not this client's key.
        return [
            key_id
            for key_id, owner in zip(ids, owners, strict=True)
            if owner is not None and owner.decode() == client_id
        ]

    async def build_client_index(self) -> int:
        """Add every key record to its client's set, then set the marker
        that :meth:`key_ids_of` checks. Idempotent, safe beside creates
        (which index their own key) and beside another build.

        Returns
        -------
        int
            The number of records read.

        Raises
        ------
        StoreError
            Redis could not be reached (the marker is then not set, and the
            next :meth:`key_ids_of` builds again).
        """
        async with redis_guard("keys.index_build", self._timeout_s, self._redis):
            members = await self._redis.smembers(self.index_key)
            ids = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
            pipe = self._redis.pipeline(transaction=False)
            for key_id in ids:
                pipe.hget(self.record_key(key_id), "client_id")
            owners = await pipe.execute() if ids else []
            pipe = self._redis.pipeline(transaction=False)
            for key_id, owner in zip(ids, owners, strict=True):
                if owner is not None:
                    pipe.sadd(self.client_index_key(owner.decode()), key_id)
            pipe.set(self.client_index_marker, _CLIENT_INDEX_VERSION)
            await pipe.execute()
        logger.info("api key index by client built", extra={"keys": len(ids)})
        return len(ids)

    async def get(self, key_id: str) -> ApiKey | None:
        """One key, or ``None`` if unknown; see :meth:`get_many`."""
        return (await self.get_many([key_id])).get(key_id)

    async def get_many(self, key_ids: Iterable[str]) -> dict[str, ApiKey]:
        """Look up keys for a batch of requests.

        Answers from the local cache where an entry is younger than
        ``auth.key_cache_ttl_s`` (unknown ids are cached too, for the same
        time), and fetches every miss in one pipelined round trip. Ids that are
        not well-formed never reach Redis.

        Returns
        -------
        dict[str, ApiKey]
            Known keys by id, revoked and expired ones included (the caller
            decides with :func:`authenticate`); unknown ids are absent.

        Raises
        ------
        StoreError
            Redis could not be reached.
        """
        now = time.monotonic()
        found: dict[str, ApiKey] = {}
        misses: builtins.list[str] = []
        for key_id in dict.fromkeys(key_ids):
            if not KEY_ID_PATTERN.fullmatch(key_id):
                continue
            cached = self._cache.get(key_id)
            if cached is not None and cached[0] > now:
                if cached[1] is not None:
                    found[key_id] = cached[1]
                continue
            misses.append(key_id)
        if not misses:
            return found

        async with redis_guard("keys.get_many", self._timeout_s, self._redis):
            pipe = self._redis.pipeline(transaction=False)
            for key_id in misses:
                pipe.hgetall(self.record_key(key_id))
            rows = await pipe.execute()

        expires_at = time.monotonic() + self._cache_ttl_s
        for key_id, row in zip(misses, rows, strict=True):
            key = self._decode(key_id, row) if row else None
            if key is not None:
                found[key_id] = key
            self._remember(key_id, expires_at, key)
        return found

    async def get_many_or_stale(
        self, key_ids: Iterable[str]
    ) -> tuple[dict[str, ApiKey], set[str]]:
        """Like :meth:`get_many`, but when Redis is unreachable answer from the
        cache, expired entries included if read within ``STALE_IF_ERROR_S``.

        For the fail modes ``open`` and ``closed`` of the limits, which keep
        answering during an outage. The cost: a key revoked after this worker
        last read it stays usable here until Redis answers again (at most
        ``STALE_IF_ERROR_S``).

        Returns
        -------
        tuple[dict[str, ApiKey], set[str]]
            Known keys by id, and the ids that could not be looked up (not
            cached, or cached too long ago); the set is empty when Redis
            answered.
        """
        ids = list(dict.fromkeys(key_ids))
        try:
            return await self.get_many(ids), set()
        except StoreError as exc:
            if not exc.retriable:
                raise
        now = time.monotonic()
        found: dict[str, ApiKey] = {}
        unavailable: set[str] = set()
        for key_id in ids:
            if not KEY_ID_PATTERN.fullmatch(key_id):
                continue  # never a key, with or without Redis
            cached = self._cache.get(key_id)
            fresh_until = now - STALE_IF_ERROR_S + self._cache_ttl_s
            if cached is None or cached[0] < fresh_until:
                unavailable.add(key_id)
            elif cached[1] is not None:
                found[key_id] = cached[1]
        logger.warning(
            "redis unreachable; api keys served from the cache",
            extra={"keys": len(found), "unavailable": len(unavailable)},
        )
        return found, unavailable

    def _decode(self, key_id: str, row: dict[bytes, bytes]) -> ApiKey | None:
        try:
            return self._decode_fields(key_id, row)
        except (KeyError, ValueError, UnicodeDecodeError):
            # json.JSONDecodeError is a ValueError. A damaged record must refuse
            # its key, not stop the batch.
            logger.error("api key record is damaged", extra={"key_id": key_id})
            return None

    def _decode_fields(self, key_id: str, row: dict[bytes, bytes]) -> ApiKey | None:
        secret = decrypt_secret(self._fernet, key_id, row.get(b"secret_enc", b""))
        if secret is None:
            # Most likely the server key changed since the key was created; the
            # key is unusable, and refusing it is the only safe answer.
            logger.error(
                "cannot decrypt api key secret; is this the server key that "
                "created it?",
                extra={"key_id": key_id},
            )
            return None
        status = row.get(b"status", b"").decode()
        expires = row.get(b"expires_ms", b"")
        client_id = row[b"client_id"].decode()
        # Redis keys and record keys are built from it; a damaged one
        # refuses this key (ValueError) rather than failing a batch later.
        check_client_id(client_id)
        plan = row.get(b"plan", b"").decode() or "default"
        check_plan_name(plan)
        return ApiKey(
            key_id=key_id,
            client_id=client_id,
            secret=secret,
            models=tuple(json.loads(row.get(b"models", b"[]"))),
            # Anything but an explicit "active" is treated as revoked.
            status="active" if status == "active" else "revoked",
            created_ms=int(row.get(b"created_ms", b"0")),
            expires_ms=int(expires) if expires else None,
            plan=plan,
            limit_overrides=row.get(b"limit_overrides", b"").decode(),
        )

    def _remember(self, key_id: str, expires_at: float, key: ApiKey | None) -> None:
        if self._cache_ttl_s <= 0:
            return
        # Re-insert so dict order stays oldest-first for eviction below.
        self._cache.pop(key_id, None)
        self._cache[key_id] = (expires_at, key)
        if len(self._cache) > _CACHE_MAX_ENTRIES:
            now = time.monotonic()
            for stale in [k for k, (exp, _) in self._cache.items() if exp <= now]:
                del self._cache[stale]
            while len(self._cache) > _CACHE_MAX_ENTRIES:
                del self._cache[next(iter(self._cache))]

    def forget(self, key_id: str | None = None) -> None:
        """Drop one cached key, or the whole cache."""
        if key_id is None:
            self._cache.clear()
        else:
            self._cache.pop(key_id, None)

    # Last in the class: the method name shadows the builtin ``list`` for
    # annotations evaluated in the class body after it.
    async def list(self) -> builtins.list[dict[str, object]]:
        """Every key's record without its secret, oldest first.

        Two round trips (the id set, then the records); an admin call, not a
        hot path.

        Raises
        ------
        StoreError
            Redis could not be reached.
        """
        async with redis_guard("keys.list", self._timeout_s, self._redis):
            members = await self._redis.smembers(self.index_key)
            ids = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
            pipe = self._redis.pipeline(transaction=False)
            for key_id in ids:
                pipe.hgetall(self.record_key(key_id))
            rows = await pipe.execute() if ids else []

        listing: builtins.list[tuple[int, str, dict[str, object]]] = []
        for key_id, row in zip(ids, rows, strict=True):
            if not row:
                continue
            created_ms = int(row.get(b"created_ms", b"0"))
            expires = row.get(b"expires_ms", b"")
            entry: dict[str, object] = {
                "key_id": key_id,
                "client_id": row.get(b"client_id", b"").decode(),
                "models": json.loads(row.get(b"models", b"[]")),
                "status": row.get(b"status", b"").decode(),
                "created_ms": created_ms,
                "expires_ms": int(expires) if expires else None,
                "plan": row.get(b"plan", b"").decode() or "default",
                "limit_overrides": json.loads(row.get(b"limit_overrides") or b"{}"),
            }
            listing.append((created_ms, key_id, entry))
        listing.sort(key=lambda item: (item[0], item[1]))
        return [entry for _, _, entry in listing]


def authenticate(
    key: ApiKey | None,
    value: bytes,
    signature: str | None,
    ts_ms: int,
    model: str,
    now_ms: int,
    max_skew_ms: int,
) -> ApiKey:
    """Decide whether a request proves possession of a live key for ``model``.

    Checks run in this order, first failure wins: signature present, key
    known, signature valid, key not revoked, not expired, timestamp within
    skew, model in scope. Everything after the signature check is told only to
    whoever holds the secret, so a stranger learns no more than whether a key
    id exists; for unknown ids an HMAC is still computed, to keep timing alike.

    Replays: a replay older than ``max_skew_ms`` is ``AUTH_STALE``; a newer
    one is caught by request-id deduplication in the counter store, whose
    window (``auth.replay_window_s``) must be at least the skew.

    Parameters
    ----------
    key
        The record for the request's key id, or ``None`` if unknown.
    value
        The exact Kafka value bytes that were signed.
    signature
        The ``mg-sig`` header (lowercase hex), or ``None`` if absent.
    ts_ms
        The request's own timestamp (from the signed value).
    model
        The model the request names (from the signed value).
    now_ms
        The worker's clock.
    max_skew_ms
        Largest accepted ``|now_ms - ts_ms|``.

    Returns
    -------
    ApiKey
        ``key``, now known to be good.

    Raises
    ------
    AuthError
        With code ``AUTH_MISSING``, ``AUTH_UNKNOWN_KEY``,
        ``AUTH_BAD_SIGNATURE``, ``AUTH_REVOKED``, ``AUTH_EXPIRED``,
        ``AUTH_STALE`` or ``AUTH_MODEL_FORBIDDEN``.
    """
    if not signature:
        raise AuthError("no signature header", code="AUTH_MISSING")
    # compare_digest raises TypeError on non-ASCII str, so malformed headers
    # are refused here, by shape, before any comparison.
    well_formed = _HEX_SIGNATURE.fullmatch(signature) is not None
    if key is None:
        protocol.verify(_DUMMY_SECRET, value, "0" * 64)
        raise AuthError("unknown API key", code="AUTH_UNKNOWN_KEY")
    if not well_formed or not protocol.verify(key.secret, value, signature):
        raise AuthError("signature does not match", code="AUTH_BAD_SIGNATURE")
    if key.status != "active":
        raise AuthError("API key revoked", code="AUTH_REVOKED")
    if key.expires_ms is not None and now_ms >= key.expires_ms:
        raise AuthError("API key expired", code="AUTH_EXPIRED")
    if abs(now_ms - ts_ms) > max_skew_ms:
        raise AuthError(
            "request timestamp outside the accepted clock skew", code="AUTH_STALE"
        )
    if not key.allows_model(model):
        raise AuthError("API key not scoped to this model", code="AUTH_MODEL_FORBIDDEN")
    return key
