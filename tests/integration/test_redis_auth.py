"""``redis.password`` against real password-protected Redis servers.

Each test starts its own ``redis-server`` with ``requirepass`` on a free
loopback port (the cluster: three of them, once for the module), never the
shared stack's Redis, and stops it afterwards.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gateway.admin.audit import AuditLog
from gateway.config import Settings, load_settings
from gateway.errors import ConfigError, StoreError
from gateway.store import redis_from_settings, redis_guard
from tests.integration.redis_cluster import RedisClusterInfo, private_cluster

pytestmark = pytest.mark.timeout(90)

_START_TIMEOUT_S = 20.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def password() -> str:
    return f"pw-{secrets.token_hex(12)}"


@pytest.fixture
def auth_redis(tmp_path: Path, password: str) -> Iterator[str]:
    """A one-node ``redis-server`` with ``requirepass``; yields its URL
    (without the password)."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is needed (make services)")
    port = _free_port()
    # The password goes through the config on stdin, not the command line,
    # so a process listing does not show it either.
    config = (
        f"port {port}\nbind 127.0.0.1\nsave ''\nappendonly no\n"
        f"dir {tmp_path}\nrequirepass {password}\n"
    )
    with (tmp_path / "redis.log").open("ab") as log:
        proc = subprocess.Popen(
            ["redis-server", "-"],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    assert proc.stdin is not None
    proc.stdin.write(config.encode())
    proc.stdin.close()
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            probe = redis.Redis(
                host="127.0.0.1", port=port, password=password, socket_timeout=1.0
            )
            try:
                if probe.ping():
                    break
            except (redis.RedisError, OSError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)  # polling interval of the start
            finally:
                probe.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def auth_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RedisClusterInfo, str]]:
    password = f"pw-{secrets.token_hex(12)}"
    root = tmp_path_factory.mktemp("redis-auth-cluster")
    try:
        with private_cluster(root, password) as info:
            yield info, password
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _settings(url: str, password: str | None, **redis_fields: object) -> Settings:
    fields: dict[str, object] = {
        "url": url,
        "key_prefix": f"auth{secrets.token_hex(4)}",
        **redis_fields,
    }
    if password is not None:
        fields["password"] = password
    return load_settings(redis=fields)


def _assert_hidden(secret: str, settings: Settings, text: str) -> None:
    for shown in (
        repr(settings),
        str(settings),
        repr(settings.redis),
        settings.model_dump_json(),
        str(settings.model_dump()),
        text,
    ):
        assert secret not in shown


async def test_one_node_with_password(
    auth_redis: str, password: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = _settings(auth_redis, password)
    client = redis_from_settings(settings)
    try:
        log = AuditLog(client, settings)
        await log.record(
            actor="alice", action="login", target="", source="127.0.0.1", outcome="ok"
        )
        entries = await log.read(10)
        assert [(e.actor, e.action) for e in entries] == [("alice", "login")]
    finally:
        await client.aclose()
    _assert_hidden(password, settings, caplog.text)


async def test_one_node_refuses_a_missing_or_wrong_password(
    auth_redis: str, password: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The server really requires the password: without it, or with a wrong
    # one, every call fails as the store being unavailable.
    caplog.set_level(logging.DEBUG)
    wrong = f"wrong-{secrets.token_hex(8)}"
    for given in (None, wrong):
        settings = _settings(auth_redis, given, breaker_failures=100)
        client = redis_from_settings(settings)
        try:
            with pytest.raises(StoreError) as caught:
                async with redis_guard("test.ping", 5.0, client):
                    await client.ping()
            assert caught.value.code == "STORE_UNAVAILABLE"
        finally:
            await client.aclose()
    assert wrong not in caplog.text
    assert password not in caplog.text


async def test_cluster_with_password(
    auth_cluster: tuple[RedisClusterInfo, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    info, password = auth_cluster
    settings = _settings(info.url, password, cluster=True)
    client = redis_from_settings(settings)
    try:
        # Keys spread over all three primaries: each node's connection
        # authenticates, not only the startup node's.
        keys = [f"{settings.redis.key_prefix}:k{i}" for i in range(30)]
        for key in keys:
            async with redis_guard("test.set", 5.0, client):
                await client.set(key, key)
        nodes = {client.get_node_from_key(key).name for key in keys}
        assert len(nodes) == 3
        for key in keys:
            async with redis_guard("test.get", 5.0, client):
                assert await client.get(key) == key.encode()
        log = AuditLog(client, settings)
        await log.record(
            actor="bob", action="logout", target="", source="127.0.0.1", outcome="ok"
        )
        assert [e.actor for e in await log.read(10)] == ["bob"]
    finally:
        await client.aclose()
    _assert_hidden(password, settings, caplog.text)

    without = _settings(info.url, None, cluster=True, breaker_failures=100)
    client = redis_from_settings(without)
    try:
        with pytest.raises(StoreError):
            async with redis_guard("test.get", 5.0, client):
                await client.get(keys[0])
    finally:
        await client.aclose()


def test_a_password_in_the_url_is_refused() -> None:
    secret = f"pw-{secrets.token_hex(12)}"
    for url in (
        f"redis://:{secret}@127.0.0.1:16379/0",
        f"redis://user:{secret}@127.0.0.1:16379/0",
        f"rediss://default:{secret}@127.0.0.1:16379/0",
    ):
        with pytest.raises(ConfigError) as caught:
            load_settings(redis={"url": url})
        assert caught.value.code == "CONFIG_INVALID"
        assert "redis.password" in caught.value.message
        # Neither the message nor the chained pydantic error repeats it.
        assert secret not in str(caught.value)
        assert secret not in str(caught.value.__cause__)
    # A user name alone is not a secret.
    assert load_settings(redis={"url": "redis://user@127.0.0.1:16379/0"})


def test_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"pw-{secrets.token_hex(12)}"
    monkeypatch.setenv("MODELGATE_REDIS__PASSWORD", secret)
    settings = load_settings()
    assert settings.redis.password_value() == secret
    _assert_hidden(secret, settings, "")


def test_password_from_the_settings_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = f"pw-{secrets.token_hex(12)}"
    path = tmp_path / "modelgate.toml"
    path.write_text(f'[redis]\npassword = "{secret}"\n')
    monkeypatch.setenv("MODELGATE_CONFIG", str(path))
    monkeypatch.delenv("MODELGATE_REDIS__PASSWORD", raising=False)
    settings = load_settings()
    assert settings.redis.password_value() == secret
    _assert_hidden(secret, settings, "")
