"""Unit tests for gateway.keys: authentication codes, tokens, the server key and
encryption at rest. No Redis."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from gateway import protocol
from gateway.config import Settings, load_settings
from gateway.errors import ERROR_CODES, AuthError, ConfigError
from gateway.keys import (
    ApiKey,
    KeyStore,
    authenticate,
    decrypt_secret,
    encrypt_secret,
    format_token,
    load_server_key,
)

NOW_MS = 1_764_000_000_000
SKEW_MS = 300_000
SECRET = bytes(range(32))
VALUE = b'{"v":1,"request_id":"r-1","model":"digits"}'


def make_key(**changes: object) -> ApiKey:
    fields: dict[str, object] = {
        "key_id": "mgk_0123456789ab",
        "client_id": "alice",
        "secret": SECRET,
        "models": (),
        "status": "active",
        "created_ms": NOW_MS - 1000,
        "expires_ms": None,
    }
    fields.update(changes)
    return ApiKey(**fields)  # type: ignore[arg-type]


def check(
    key: ApiKey | None,
    *,
    signature: str | None = None,
    value: bytes = VALUE,
    ts_ms: int = NOW_MS,
    model: str = "digits",
) -> ApiKey:
    sig = protocol.sign(SECRET, value) if signature is None else signature
    return authenticate(key, value, sig or None, ts_ms, model, NOW_MS, SKEW_MS)


def code_of(excinfo: pytest.ExceptionInfo[AuthError]) -> str:
    return excinfo.value.code


# authenticate ------------------------------------------------------------------


def test_authenticate_accepts_a_good_request() -> None:
    key = make_key()
    assert check(key) is key


def test_missing_signature() -> None:
    with pytest.raises(AuthError) as excinfo:
        check(make_key(), signature="")
    assert code_of(excinfo) == "AUTH_MISSING"


def test_missing_signature_wins_over_unknown_key() -> None:
    with pytest.raises(AuthError) as excinfo:
        check(None, signature="")
    assert code_of(excinfo) == "AUTH_MISSING"


def test_unknown_key() -> None:
    with pytest.raises(AuthError) as excinfo:
        check(None)
    assert code_of(excinfo) == "AUTH_UNKNOWN_KEY"


@pytest.mark.parametrize(
    "signature",
    [
        protocol.sign(b"another secret", VALUE),
        "0" * 64,
        "abc",
        "é" * 64,  # compare_digest would raise TypeError on non-ASCII str
        protocol.sign(SECRET, VALUE).upper(),
    ],
)
def test_bad_signature(signature: str) -> None:
    with pytest.raises(AuthError) as excinfo:
        check(make_key(), signature=signature)
    assert code_of(excinfo) == "AUTH_BAD_SIGNATURE"


def test_signature_covers_the_value() -> None:
    sig = protocol.sign(SECRET, VALUE)
    with pytest.raises(AuthError) as excinfo:
        check(make_key(), signature=sig, value=VALUE + b" ")
    assert code_of(excinfo) == "AUTH_BAD_SIGNATURE"


def test_revoked() -> None:
    with pytest.raises(AuthError) as excinfo:
        check(make_key(status="revoked"))
    assert code_of(excinfo) == "AUTH_REVOKED"


def test_expired_at_and_after_expiry() -> None:
    for expires_ms in (NOW_MS, NOW_MS - 1):
        with pytest.raises(AuthError) as excinfo:
            check(make_key(expires_ms=expires_ms))
        assert code_of(excinfo) == "AUTH_EXPIRED"
    assert check(make_key(expires_ms=NOW_MS + 1)).key_id == "mgk_0123456789ab"


@pytest.mark.parametrize("offset_ms", [SKEW_MS + 1, -(SKEW_MS + 1)])
def test_stale(offset_ms: int) -> None:
    with pytest.raises(AuthError) as excinfo:
        check(make_key(), ts_ms=NOW_MS + offset_ms)
    assert code_of(excinfo) == "AUTH_STALE"


@pytest.mark.parametrize("offset_ms", [SKEW_MS, -SKEW_MS, 0])
def test_within_skew(offset_ms: int) -> None:
    check(make_key(), ts_ms=NOW_MS + offset_ms)


def test_model_forbidden() -> None:
    key = make_key(models=("iris",))
    with pytest.raises(AuthError) as excinfo:
        check(key, model="digits")
    assert code_of(excinfo) == "AUTH_MODEL_FORBIDDEN"
    assert check(key, model="iris") is key


def test_key_status_is_told_only_to_the_secret_holder() -> None:
    # A stranger with a wrong signature learns nothing about revocation,
    # expiry or scope: the signature is checked first.
    key = make_key(status="revoked", expires_ms=NOW_MS - 1, models=("iris",))
    with pytest.raises(AuthError) as excinfo:
        check(key, signature="0" * 64, ts_ms=0)
    assert code_of(excinfo) == "AUTH_BAD_SIGNATURE"


def test_every_auth_code_is_a_known_error_code() -> None:
    for code in (
        "AUTH_MISSING",
        "AUTH_UNKNOWN_KEY",
        "AUTH_BAD_SIGNATURE",
        "AUTH_REVOKED",
        "AUTH_EXPIRED",
        "AUTH_STALE",
        "AUTH_MODEL_FORBIDDEN",
    ):
        assert code in ERROR_CODES


# ApiKey --------------------------------------------------------------------------


def test_repr_hides_the_secret() -> None:
    key = make_key()
    for text in (repr(key), str(key), repr([key])):
        assert "secret" not in text
        assert repr(SECRET) not in text
        assert "alice" in text


def test_allows_model() -> None:
    assert make_key().allows_model("anything")
    assert not make_key(models=("a",)).allows_model("b")


# tokens ---------------------------------------------------------------------------


def test_token_round_trip() -> None:
    token = format_token("mgk_0123456789ab", SECRET)
    assert "=" not in token
    assert KeyStore.parse_token(token) == ("mgk_0123456789ab", SECRET)
    # Padding restored or given, surrounding whitespace ignored.
    assert KeyStore.parse_token(f" {token}= \n") == ("mgk_0123456789ab", SECRET)


@pytest.mark.parametrize(
    ("token", "code"),
    [
        # No key id: no key can be meant.
        ("", "AUTH_UNKNOWN_KEY"),
        ("mgk_0123456789AB." + format_token("x", SECRET).split(".")[1],
         "AUTH_UNKNOWN_KEY"),
        ("key_0123456789ab." + format_token("x", SECRET).split(".")[1],
         "AUTH_UNKNOWN_KEY"),
        ("not-a-token", "AUTH_UNKNOWN_KEY"),
        # A key id with a missing or malformed secret: a secret that cannot
        # sign, as a wrong one does.
        ("mgk_0123456789ab", "AUTH_BAD_SIGNATURE"),
        ("mgk_0123456789ab.", "AUTH_BAD_SIGNATURE"),
        ("mgk_0123456789ab.!!!!", "AUTH_BAD_SIGNATURE"),
        ("mgk_0123456789ab.c2hvcnQ", "AUTH_BAD_SIGNATURE"),  # 5 bytes, not 32
        ("mgk_0123456789ab." + "A" * 42 + "+", "AUTH_BAD_SIGNATURE"),  # not urlsafe
    ],
)  # fmt: skip
def test_malformed_tokens(token: str, code: str) -> None:
    with pytest.raises(AuthError) as excinfo:
        KeyStore.parse_token(token)
    assert excinfo.value.code == code
    message = excinfo.value.message
    assert message.startswith("malformed API key token"), message
    if code == "AUTH_BAD_SIGNATURE":
        # True of a known key: it does not call the key unknown.
        assert "key id is well formed" in message and "secret" in message, message
    assert token.strip() == "" or token not in message


# encryption at rest ---------------------------------------------------------------


def test_secret_encryption_is_bound_to_the_key_id() -> None:
    fernet = Fernet(Fernet.generate_key())
    token = encrypt_secret(fernet, "mgk_000000000001", SECRET)
    assert SECRET not in token
    assert decrypt_secret(fernet, "mgk_000000000001", token) == SECRET
    assert decrypt_secret(fernet, "mgk_000000000002", token) is None
    other = Fernet(Fernet.generate_key())
    assert decrypt_secret(other, "mgk_000000000001", token) is None
    assert decrypt_secret(fernet, "mgk_000000000001", b"garbage") is None


# server key -------------------------------------------------------------------------


def settings_with(**auth: object) -> Settings:
    return load_settings(auth=auth)


def test_server_key_from_settings() -> None:
    key = Fernet.generate_key()
    assert load_server_key(settings_with(server_key=key.decode())) == key


def test_invalid_server_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_server_key(settings_with(server_key="not a key"))
    assert excinfo.value.code == "CONFIG_INVALID"
    assert "not a key" not in excinfo.value.message


def test_server_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "server.key"
    settings = settings_with(server_key_file=path)
    first = load_server_key(settings)
    Fernet(first)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_server_key(settings) == first
    assert sorted(p.name for p in path.parent.iterdir()) == ["server.key"]


def test_corrupt_server_key_file(tmp_path: Path) -> None:
    path = tmp_path / "server.key"
    path.write_bytes(b"nonsense\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError):
        load_server_key(settings_with(server_key_file=path))
