"""Admin users in Redis: an Argon2 password hash and an encrypted TOTP secret.

A user record is the hash ``{prefix}:admin:user:<name>`` with ``role``,
``pw_hash`` (argon2-cffi's PHC string), ``totp_enc`` (the RFC 6238 secret,
Fernet-encrypted under the server key and bound to the user name, so a
ciphertext copied onto another user's record does not decrypt there),
``enrolled`` (``1`` once a first valid code has been seen), ``totp_last`` (the
last accepted time step, so a code is accepted at most once) and
``created_ms``. ``{prefix}:admin:users`` is the set of names.

The TOTP secret must be recoverable to compute codes, so it is encrypted, not
hashed; the password is only ever verified, so it is hashed.

Imports Redis, argon2-cffi, pyotp, segno and the gateway's config, keys and
store helpers; nothing from FastAPI or Kafka.
"""

from __future__ import annotations

import asyncio
import builtins
import hmac
import io
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import pyotp
import segno
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from cryptography.fernet import Fernet

from gateway import protocol
from gateway.config import Settings
from gateway.keys import decrypt_secret, encrypt_secret
from gateway.store import RedisClient, redis_guard

logger = logging.getLogger(__name__)

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")
ROLE_RANK: dict[str, int] = {role: rank for rank, role in enumerate(ROLES)}
USERNAME_PATTERN = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 1024
TOTP_INTERVAL_S = 30
TOTP_DIGITS = 6
# Codes of the previous and next 30 s step are accepted too: RFC 6238 section
# 5.2 recommends at most one step of allowed network delay and clock drift.
_TOTP_STEPS = (0, -1, 1)
_CODE_PATTERN = re.compile(r"^[0-9]{6}$")

_CREATE_IF_ABSENT_LUA = """
if redis.call("EXISTS", KEYS[1]) == 1 then return 0 end
redis.call("HSET", KEYS[1], unpack(ARGV))
return 1
"""
# Accepts a time step only if it is later than the last accepted one: the
# same code (or an older one still inside the window) is a replay.
_ACCEPT_STEP_LUA = """
if redis.call("EXISTS", KEYS[1]) == 0 then return 0 end
local last = tonumber(redis.call("HGET", KEYS[1], "totp_last") or "-1")
if tonumber(ARGV[1]) <= last then return 0 end
redis.call("HSET", KEYS[1], "totp_last", ARGV[1], "enrolled", "1")
return 1
"""
_SET_IF_PRESENT_LUA = """
if redis.call("EXISTS", KEYS[1]) == 0 then return 0 end
redis.call("HSET", KEYS[1], unpack(ARGV))
return 1
"""

LoginFailure = Literal["unknown_user", "bad_password", "bad_code", "replayed_code"]


@dataclass(frozen=True, slots=True)
class User:
    """An admin user as the API shows it (no hash, no secret)."""

    name: str
    role: Role
    enrolled: bool
    created_ms: int


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What a new (or reset) second factor is set up with: shown once.

    ``uri`` is the ``otpauth://`` provisioning URI an authenticator app reads
    from the QR code; it holds the secret, so it is never logged or stored.
    """

    user: User
    uri: str = ""

    def __repr__(self) -> str:
        return f"Enrollment(user={self.user!r}, uri=<hidden>)"

    def qr_terminal(self) -> str:
        """The QR code as text for a terminal (half-block characters)."""
        out = io.StringIO()
        segno.make(self.uri, error="m").terminal(out=out, compact=True)
        return out.getvalue()

    def qr_svg_data_uri(self) -> str:
        """The QR code as an SVG ``data:`` URI, for a browser."""
        return str(segno.make(self.uri, error="m").svg_data_uri(scale=4))


def check_username(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` may be a user name (it becomes part
    of Redis key names, so it is lowercase ASCII without ``:`` or braces)."""
    if not USERNAME_PATTERN.fullmatch(name):
        raise ValueError(f"user name must match {USERNAME_PATTERN.pattern}")


def check_password(password: str) -> None:
    """Raise ``ValueError`` for a password too short or too long to accept."""
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise ValueError(
            f"password must be {MIN_PASSWORD_CHARS}-{MAX_PASSWORD_CHARS} characters"
        )


class UserStore:
    """Admin users, password checks and TOTP checks with replay refusal.

    Parameters
    ----------
    redis
        An asyncio client with ``decode_responses=False``.
    settings
        ``redis.key_prefix``, ``redis.socket_timeout_s``, ``admin.totp_issuer``.
    server_key
        The Fernet key from :func:`gateway.keys.load_server_key`.
    clock
        Seconds since the epoch; tests pass a controllable one to step through
        TOTP intervals without sleeping.
    """

    def __init__(
        self,
        redis: RedisClient,
        settings: Settings,
        server_key: bytes,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._prefix = settings.redis.key_prefix
        self._timeout_s = settings.redis.socket_timeout_s
        self._issuer = settings.admin.totp_issuer
        self._fernet = Fernet(server_key)
        self._clock = clock
        # About 50 ms with the default cost on an idle core: run off the loop.
        self._hasher = PasswordHasher(
            time_cost=settings.admin.argon2_time_cost,
            memory_cost=settings.admin.argon2_memory_kib,
        )
        self._dummy_hash: str | None = None

    def user_key(self, name: str) -> str:
        return f"{self._prefix}:admin:user:{name}"

    @property
    def index_key(self) -> str:
        return f"{self._prefix}:admin:users"

    # Step: create, read, change ----------------------------------------------------

    async def create(self, name: str, role: Role, password: str) -> Enrollment:
        """Create a user and return its one-time enrollment.

        Raises
        ------
        ValueError
            Bad name, role or password.
        FileExistsError
            A user of that name exists.
        StoreError
            Redis could not be reached.
        """
        check_username(name)
        check_password(password)
        if role not in ROLE_RANK:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        pw_hash = await asyncio.to_thread(self._hasher.hash, password)
        secret = pyotp.random_base32()
        created_ms = protocol.now_ms()
        fields = [
            "role",
            role,
            "pw_hash",
            pw_hash,
            "totp_enc",
            self._encrypt(name, secret),
            "enrolled",
            "0",
            "totp_last",
            "-1",
            "created_ms",
            created_ms,
        ]
        async with redis_guard("admin.user.create", self._timeout_s, self._redis):
            written = await self._redis.eval(
                _CREATE_IF_ABSENT_LUA, 1, self.user_key(name), *fields
            )
            if written:
                await self._redis.sadd(self.index_key, name)
        if not written:
            raise FileExistsError(name)
        logger.info("admin user created", extra={"user": name, "role": role})
        user = User(name=name, role=role, enrolled=False, created_ms=created_ms)
        return Enrollment(user=user, uri=self._uri(name, secret))

    async def get(self, name: str) -> User | None:
        if not USERNAME_PATTERN.fullmatch(name):
            return None
        async with redis_guard("admin.user.get", self._timeout_s, self._redis):
            row = await self._hgetall(self.user_key(name))
        return _user(name, row) if row else None

    async def list(self) -> builtins.list[User]:
        """Every user, by name."""
        async with redis_guard("admin.user.list", self._timeout_s, self._redis):
            members = await self._redis.smembers(self.index_key)
            names = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
            pipe = self._redis.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(self.user_key(name))
            rows = await pipe.execute() if names else []
        return [_user(n, row) for n, row in zip(names, rows, strict=True) if row]

    async def set_role(self, name: str, role: Role) -> bool:
        """Change a user's role; returns whether the user exists. Sessions pick
        up the new role at their next call (the role is read per call)."""
        if role not in ROLE_RANK or not USERNAME_PATTERN.fullmatch(name):
            return False
        async with redis_guard("admin.user.set_role", self._timeout_s, self._redis):
            done = await self._redis.eval(
                _SET_IF_PRESENT_LUA, 1, self.user_key(name), "role", role
            )
        return bool(done)

    async def reset_totp(self, name: str) -> Enrollment | None:
        """Give a user a new TOTP secret (e.g. a lost phone); the old codes stop
        working at once and the user must confirm the new one at next login."""
        if not USERNAME_PATTERN.fullmatch(name):
            return None
        secret = pyotp.random_base32()
        async with redis_guard("admin.user.reset_totp", self._timeout_s, self._redis):
            done = await self._redis.eval(
                _SET_IF_PRESENT_LUA,
                1,
                self.user_key(name),
                "totp_enc",
                self._encrypt(name, secret),
                "enrolled",
                "0",
            )
        user = await self.get(name) if done else None
        if user is None:
            return None
        return Enrollment(user=user, uri=self._uri(name, secret))

    async def delete(self, name: str) -> bool:
        if not USERNAME_PATTERN.fullmatch(name):
            return False
        async with redis_guard("admin.user.delete", self._timeout_s, self._redis):
            removed = await self._redis.delete(self.user_key(name))
            await self._redis.srem(self.index_key, name)
        return bool(removed)

    # Step: login checks ----------------------------------------------------------

    async def verify_login(
        self, name: str, password: str, code: str
    ) -> tuple[User | None, LoginFailure | None]:
        """Check both factors; returns the user, or ``None`` and why not.

        The password is checked first and a wrong one never touches the TOTP
        state, so guessing passwords cannot burn a user's codes. Unknown users
        cost a hash verification too, so timing does not reveal which names
        exist. The reason is for the audit log only: callers answer every
        failure the same way, so a stolen password is not even confirmed
        without the second factor.
        """
        row: dict[bytes, bytes] = {}
        if USERNAME_PATTERN.fullmatch(name):
            async with redis_guard("admin.user.get", self._timeout_s, self._redis):
                row = await self._hgetall(self.user_key(name))
        if not row:
            await asyncio.to_thread(self._verify_dummy, password)
            return None, "unknown_user"

        pw_hash = row.get(b"pw_hash", b"").decode()
        if not await asyncio.to_thread(self._verify_password, pw_hash, password):
            return None, "bad_password"

        secret = self._decrypt(name, row.get(b"totp_enc", b""))
        step = self._matching_step(secret, code) if secret else None
        if step is None:
            return None, "bad_code"
        async with redis_guard("admin.user.totp", self._timeout_s, self._redis):
            accepted = await self._redis.eval(
                _ACCEPT_STEP_LUA, 1, self.user_key(name), step
            )
        if not accepted:
            return None, "replayed_code"

        if self._hasher.check_needs_rehash(pw_hash):
            await self._rehash(name, password)
        user = _user(name, row)
        if not user.enrolled:
            logger.info("admin user enrolled its second factor", extra={"user": name})
        return User(user.name, user.role, True, user.created_ms), None

    def current_code(self, uri: str) -> str:
        """The code an authenticator holding ``uri`` shows now (for tests and
        the bootstrap CLI's self-check)."""
        totp = pyotp.parse_uri(uri)
        assert isinstance(totp, pyotp.TOTP)
        return str(totp.at(self._clock()))

    async def _hgetall(self, key: str) -> dict[bytes, bytes]:
        return cast(dict[bytes, bytes], await self._redis.hgetall(key))

    def _matching_step(self, secret: str, code: str) -> int | None:
        if not _CODE_PATTERN.fullmatch(code):
            return None
        totp = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_INTERVAL_S)
        now_step = int(self._clock()) // TOTP_INTERVAL_S
        found = None
        # Compare against every step of the window, whatever matches first, so
        # the time taken does not say which step (if any) matched.
        for offset in _TOTP_STEPS:
            step = now_step + offset
            if hmac.compare_digest(totp.generate_otp(step), code) and found is None:
                found = step
        return found

    def _verify_password(self, pw_hash: str, password: str) -> bool:
        try:
            return bool(self._hasher.verify(pw_hash, password))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def _verify_dummy(self, password: str) -> None:
        if self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash("not a password of anyone here")
        self._verify_password(self._dummy_hash, password)

    async def _rehash(self, name: str, password: str) -> None:
        new_hash = await asyncio.to_thread(self._hasher.hash, password)
        async with redis_guard("admin.user.rehash", self._timeout_s, self._redis):
            await self._redis.eval(
                _SET_IF_PRESENT_LUA, 1, self.user_key(name), "pw_hash", new_hash
            )

    def _uri(self, name: str, secret: str) -> str:
        totp = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_INTERVAL_S)
        return str(totp.provisioning_uri(name=name, issuer_name=self._issuer))

    def _encrypt(self, name: str, secret: str) -> bytes:
        return encrypt_secret(self._fernet, f"admin:{name}", secret.encode("ascii"))

    def _decrypt(self, name: str, token: bytes) -> str | None:
        plain = decrypt_secret(self._fernet, f"admin:{name}", token)
        if plain is None:
            logger.error(
                "cannot decrypt a TOTP secret; is this the server key that created it?",
                extra={"user": name},
            )
            return None
        return plain.decode("ascii")


def _user(name: str, row: dict[bytes, bytes]) -> User:
    role = row.get(b"role", b"viewer").decode()
    return User(
        name=name,
        # A damaged role gives the least power, never more.
        role=role if role in ROLE_RANK else "viewer",  # type: ignore[arg-type]  # checked
        enrolled=row.get(b"enrolled", b"0") == b"1",
        created_ms=int(row.get(b"created_ms", b"0")),
    )
