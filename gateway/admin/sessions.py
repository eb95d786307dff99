"""Admin sessions and the login guard (account lockout, per-source rate).

A session token is 256 random bits shown once to the client; Redis holds only
its SHA-256 (a slow hash buys nothing against a 256-bit secret), so a dump of
Redis gives no usable token. Layout::

    {prefix}:admin:session:<sha256>        hash: sid, user, created_ms,
                                           expires_ms, source (expires itself)
    {prefix}:admin:sessions:<user>         hash: sid -> sha256 (for list/revoke)
    {prefix}:admin:{login:<user>}:fail     failed logins in the current window
    {prefix}:admin:{login:<user>}:lock     present while the account is locked
    {prefix}:admin:{src:<address>}:logins  attempts from one source this window
                                           (an IPv6 source counts its /64)

Sessions are absolute (``admin.session_ttl_s`` from login, never extended).
Every session is two-factor: the only way to get one is
:meth:`SessionStore.create` after both factors were checked.

Imports Redis and the gateway's config and store helpers; nothing from FastAPI.
"""

from __future__ import annotations

import builtins
import hashlib
import ipaddress
import logging
import re
import secrets
from dataclasses import dataclass
from typing import cast

from gateway import protocol
from gateway.admin.errors import AdminError
from gateway.admin.users import USERNAME_PATTERN
from gateway.config import Settings
from gateway.store import RedisClient, redis_guard

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "mgs_"
_TOKEN_PATTERN = re.compile(r"^mgs_[A-Za-z0-9_-]{43}$")
_SID_PATTERN = re.compile(r"^[0-9a-f]{16}$")
# Source addresses become part of key names: anything else is pooled as one.
_SOURCE_PATTERN = re.compile(r"^[0-9A-Fa-f.:]{1,45}$")

# Counts a failure; the Nth within the window sets the lock for the same time.
_FAIL_LUA = """
local n = redis.call("INCR", KEYS[1])
if n == 1 then redis.call("PEXPIRE", KEYS[1], ARGV[2]) end
if n >= tonumber(ARGV[1]) then
  redis.call("SET", KEYS[2], "1", "PX", ARGV[2])
  redis.call("DEL", KEYS[1])
  return 1
end
return 0
"""
# Fixed window: the first attempt starts it.
_ATTEMPT_LUA = """
local n = redis.call("INCR", KEYS[1])
if n == 1 then redis.call("PEXPIRE", KEYS[1], ARGV[1]) end
return {n, redis.call("PTTL", KEYS[1])}
"""


@dataclass(frozen=True, slots=True)
class Session:
    """A live session (never its token)."""

    session_id: str
    user: str
    created_ms: int
    expires_ms: int
    source: str


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def source_label(address: str | None) -> str:
    """A client address fit for key names and the audit log, in one spelling
    per address (``2001:DB8:0::1`` and ``2001:db8::1`` are one source; an
    IPv4 address mapped into IPv6 is the IPv4 address); ``unknown`` for
    anything that is not an address."""
    if not address or not _SOURCE_PATTERN.fullmatch(address):
        return "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "unknown"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def login_bucket(source: str) -> str:
    """What the per-source login limit counts: an IPv4 address, or the /64
    of an IPv6 one (one host is usually given a whole /64, so counting
    single addresses would give it 2^64 sources)."""
    try:
        ip = ipaddress.ip_address(source)
    except ValueError:
        return source
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)


class SessionStore:
    """Create, resolve, list and revoke sessions.

    Parameters
    ----------
    redis
        An asyncio client with ``decode_responses=False``.
    settings
        ``admin.session_ttl_s``, ``admin.max_sessions_per_user``,
        ``redis.key_prefix`` and ``redis.socket_timeout_s``.
    """

    def __init__(self, redis: RedisClient, settings: Settings) -> None:
        self._redis = redis
        self._prefix = settings.redis.key_prefix
        self._timeout_s = settings.redis.socket_timeout_s
        self._ttl_ms = max(1, round(settings.admin.session_ttl_s * 1000))
        self._max_per_user = settings.admin.max_sessions_per_user

    def session_key(self, digest: str) -> str:
        return f"{self._prefix}:admin:session:{digest}"

    def user_index_key(self, user: str) -> str:
        return f"{self._prefix}:admin:sessions:{user}"

    async def create(self, user: str, source: str) -> tuple[str, Session]:
        """Open a session for ``user`` (both factors already checked) and return
        its token, which is not stored anywhere. Past
        ``admin.max_sessions_per_user`` the oldest session is revoked."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = token_digest(token)
        now = protocol.now_ms()
        session = Session(
            session_id=secrets.token_hex(8),
            user=user,
            created_ms=now,
            expires_ms=now + self._ttl_ms,
            source=source,
        )
        async with redis_guard("admin.session.create", self._timeout_s, self._redis):
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(
                self.session_key(digest),
                mapping={
                    "sid": session.session_id,
                    "user": user,
                    "created_ms": session.created_ms,
                    "expires_ms": session.expires_ms,
                    "source": source,
                },
            )
            pipe.pexpire(self.session_key(digest), self._ttl_ms)
            pipe.hset(self.user_index_key(user), session.session_id, digest)
            pipe.pexpire(self.user_index_key(user), self._ttl_ms)
            await pipe.execute()

        live = await self.list(user)
        for old in live[: max(0, len(live) - self._max_per_user)]:
            await self.revoke(user, old.session_id)
        return token, session

    async def resolve(self, token: str) -> Session | None:
        """The live session of ``token``, or ``None``; malformed tokens never
        reach Redis."""
        if not _TOKEN_PATTERN.fullmatch(token):
            return None
        async with redis_guard("admin.session.resolve", self._timeout_s, self._redis):
            row = cast(
                dict[bytes, bytes],
                await self._redis.hgetall(self.session_key(token_digest(token))),
            )
        if not row:
            return None
        session = _session(row)
        # Redis expiry is the rule; this also refuses a record whose expiry was
        # lost (e.g. PERSIST by hand).
        return session if session.expires_ms > protocol.now_ms() else None

    async def list(self, user: str) -> builtins.list[Session]:
        """The user's live sessions, oldest first; forgets expired ones."""
        if not USERNAME_PATTERN.fullmatch(user):
            return []
        async with redis_guard("admin.session.list", self._timeout_s, self._redis):
            index = cast(
                dict[bytes, bytes],
                await self._redis.hgetall(self.user_index_key(user)),
            )
            sids = [(sid.decode(), digest.decode()) for sid, digest in index.items()]
            pipe = self._redis.pipeline(transaction=False)
            for _, digest in sids:
                pipe.hgetall(self.session_key(digest))
            rows = await pipe.execute() if sids else []
            gone = [sid for (sid, _), row in zip(sids, rows, strict=True) if not row]
            if gone:
                await self._redis.hdel(self.user_index_key(user), *gone)
        sessions = [_session(row) for row in rows if row]
        return sorted(sessions, key=lambda s: (s.created_ms, s.session_id))

    async def revoke(self, user: str, session_id: str) -> bool:
        """End one of ``user``'s sessions; returns whether it was live."""
        if not _SID_PATTERN.fullmatch(session_id) or not USERNAME_PATTERN.fullmatch(
            user
        ):
            return False
        async with redis_guard("admin.session.revoke", self._timeout_s, self._redis):
            digest = cast(
                bytes | None,
                await self._redis.hget(self.user_index_key(user), session_id),
            )
            if digest is None:
                return False
            removed = await self._redis.delete(self.session_key(digest.decode()))
            await self._redis.hdel(self.user_index_key(user), session_id)
        if removed:
            logger.info(
                "admin session revoked", extra={"user": user, "session": session_id}
            )
        return bool(removed)

    async def revoke_all(self, user: str) -> int:
        """End every session of ``user`` (role change, deletion, TOTP reset)."""
        count = 0
        for session in await self.list(user):
            count += await self.revoke(user, session.session_id)
        return count


class LoginGuard:
    """Account lockout and per-source rate limiting for the login call.

    Failures are counted per account name, existing or not, so a lockout says
    nothing about which names exist. Lockout is a denial-of-service lever
    against a known admin name; the per-source limit bounds how fast one
    address can pull it, and an admin can still log in from the host CLI
    after ``admin.lockout_s``.
    """

    def __init__(self, redis: RedisClient, settings: Settings) -> None:
        self._redis = redis
        self._prefix = settings.redis.key_prefix
        self._timeout_s = settings.redis.socket_timeout_s
        admin = settings.admin
        self._max_failures = admin.max_failures
        self._lockout_ms = max(1, round(admin.lockout_s * 1000))
        self._attempts = admin.login_attempts_per_window
        self._window_ms = max(1, round(admin.login_window_s * 1000))

    def _login_key(self, user: str, suffix: str) -> str:
        return f"{self._prefix}:admin:{{login:{user}}}:{suffix}"

    async def check_source(self, source: str) -> None:
        """Count one attempt from ``source``.

        Raises
        ------
        AdminError
            ``LOGIN_RATE_LIMITED`` past ``admin.login_attempts_per_window``.
        """
        key = f"{self._prefix}:admin:{{src:{login_bucket(source)}}}:logins"
        async with redis_guard("admin.login.source", self._timeout_s, self._redis):
            count, pttl = await self._redis.eval(_ATTEMPT_LUA, 1, key, self._window_ms)
        if int(count) > self._attempts:
            raise AdminError(
                "too many login attempts from this address",
                code="LOGIN_RATE_LIMITED",
                retry_after_s=max(int(pttl), 1) / 1000,
            )

    async def check_locked(self, user: str) -> None:
        """Raises ``ACCOUNT_LOCKED`` while ``user`` is locked."""
        if not USERNAME_PATTERN.fullmatch(user):
            return
        async with redis_guard("admin.login.locked", self._timeout_s, self._redis):
            pttl = await self._redis.pttl(self._login_key(user, "lock"))
        if int(pttl) > 0:
            raise AdminError(
                "account locked after repeated failed logins",
                code="ACCOUNT_LOCKED",
                retry_after_s=int(pttl) / 1000,
            )

    async def record_failure(self, user: str) -> bool:
        """Count a failed login; returns whether it locked the account."""
        if not USERNAME_PATTERN.fullmatch(user):
            return False
        async with redis_guard("admin.login.fail", self._timeout_s, self._redis):
            locked = await self._redis.eval(
                _FAIL_LUA,
                2,
                self._login_key(user, "fail"),
                self._login_key(user, "lock"),
                self._max_failures,
                self._lockout_ms,
            )
        if locked:
            logger.warning("admin account locked", extra={"user": user})
        return bool(locked)

    async def record_success(self, user: str) -> None:
        """A good login clears the account's failure count."""
        async with redis_guard("admin.login.ok", self._timeout_s, self._redis):
            await self._redis.delete(self._login_key(user, "fail"))


def _session(row: dict[bytes, bytes]) -> Session:
    return Session(
        session_id=row[b"sid"].decode(),
        user=row[b"user"].decode(),
        created_ms=int(row[b"created_ms"]),
        expires_ms=int(row[b"expires_ms"]),
        source=row.get(b"source", b"").decode(),
    )
