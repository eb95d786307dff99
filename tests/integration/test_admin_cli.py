"""The admin commands as a user runs them: bootstrap a user, serve the admin
API (its own process), log in, then clients top/show/release through the API
with the saved session."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from cryptography.fernet import Fernet
from typer.testing import CliRunner

from evaluation.process import settings_env
from gateway import cli
from gateway.batch import BatchItem
from gateway.clientview import ClientView
from gateway.config import Settings
from gateway.keys import ApiKey
from gateway.policy import Verdict
from gateway.store import CounterStore, redis_from_settings
from tests.conftest import StackInfo
from tests.integration.adminkit import FAST_HASH, PASSWORD
from tests.integration.helpers import REPO, delete_prefix, isolated_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def cli_settings(stack: StackInfo, models_dir: Path) -> Iterator[Settings]:
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        auth={"server_key": Fernet.generate_key().decode()},
        admin={**FAST_HASH, "port": _free_port()},
    )
    yield settings
    asyncio.run(delete_prefix(settings))


def _modelgate(settings: Settings, *args: str, stdin: str = "") -> Any:
    """Run a command in-process, as the console script would (only the
    server runs as its own process: starting Python costs seconds here)."""
    env = {
        k: v for k, v in settings_env(settings).items() if k.startswith("MODELGATE_")
    }
    return CliRunner().invoke(cli.app, list(args), input=stdin, env=env)


async def _seed_blocked_client(settings: Settings, client_id: str) -> None:
    """What a worker leaves behind after blocking a client: its view entry
    (written by the real ClientView) and the Redis block."""
    redis = redis_from_settings(settings)
    try:
        key = ApiKey("mgk_000000000001", client_id, b"s" * 32, (), "active", 0)
        item = BatchItem("t", 0, 0, b"", client_id, None, key=key, action="block")
        item.verdict = Verdict("block", "block", 2.5, (), ("similarity: 45/50 near",))
        item.scores = {"similarity": 0.9}
        await ClientView(redis, settings).observe([item])
        await CounterStore(redis, settings).block(client_id, 600, "similarity")
    finally:
        await redis.aclose()


def test_bootstrap_serve_login_and_clients_commands(
    cli_settings: Settings, tmp_path: Path
) -> None:
    # Bootstrap: the password comes from stdin, the URI and QR go to stdout.
    added = _modelgate(
        cli_settings,
        "admin",
        "user",
        "add",
        "ops",
        "--role",
        "operator",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert added.exit_code == 0, added.stderr
    assert PASSWORD not in added.stdout + added.stderr
    uri = re.search(r"otpauth://\S+", added.stdout)
    assert uri, added.stdout
    assert "▀" in added.stdout or "█" in added.stdout, "no terminal QR code"
    again = _modelgate(
        cli_settings,
        "admin",
        "user",
        "add",
        "ops",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert again.exit_code == 1 and "CONFLICT" in again.stderr, again.stderr

    asyncio.run(_seed_blocked_client(cli_settings, "probe-9"))
    server = subprocess.Popen(
        [sys.executable, "-m", "gateway", "admin", "serve", "--log-level", "WARNING"],
        env=settings_env(cli_settings),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{cli_settings.admin.port}"
        _wait_until_serving(url, server)
        session_file = tmp_path / "session.json"
        common = ["--session-file", str(session_file)]
        totp = pyotp.parse_uri(uri.group(0))

        bad = _modelgate(
            cli_settings,
            "login",
            "--user",
            "ops",
            "--password-stdin",
            "--code",
            "000000",
            *common,
            stdin=PASSWORD + "\n",
        )
        assert bad.exit_code == 1 and "ADMIN_UNAUTHENTICATED" in bad.stderr
        assert not session_file.exists()

        login = _modelgate(
            cli_settings,
            "login",
            "--user",
            "ops",
            "--password-stdin",
            "--code",
            totp.now(),
            *common,
            stdin=PASSWORD + "\n",
        )
        assert login.exit_code == 0, login.stderr
        assert "logged in as ops (operator)" in login.stdout
        assert stat.S_IMODE(session_file.stat().st_mode) == 0o600

        top = _modelgate(cli_settings, "clients", "top", *common)
        assert top.exit_code == 0, top.stderr
        assert re.search(r"probe-9\s+2\.50\s+block", top.stdout), top.stdout

        show = _modelgate(cli_settings, "clients", "show", "probe-9", *common)
        assert show.exit_code == 0, show.stderr
        assert "BLOCKED" in show.stdout and "45/50 near" in show.stdout, show.stdout

        release = _modelgate(cli_settings, "clients", "release", "probe-9", *common)
        assert release.exit_code == 0, release.stderr
        assert "was blocked, now released" in release.stdout
        after = _modelgate(cli_settings, "clients", "show", "probe-9", *common)
        assert "BLOCKED" not in after.stdout and "release" in after.stdout, after.stdout

        unknown = _modelgate(cli_settings, "clients", "show", "nobody", *common)
        assert unknown.exit_code == 1 and "NOT_FOUND" in unknown.stderr

        # The audit log: through the API it needs the admin role; from the
        # audit topic (which the served API produces to), Kafka access.
        denied = _modelgate(cli_settings, "admin", "audit", *common)
        assert denied.exit_code == 1 and "ADMIN_FORBIDDEN" in denied.stderr
        topic = _modelgate(cli_settings, "admin", "audit", "--from-kafka")
        assert topic.exit_code == 0, topic.stderr
        entries = [json.loads(line) for line in topic.stdout.splitlines()]
        released = [e for e in entries if e["target"] == "probe-9"]
        assert [(e["key"], e["actor"], e["outcome"]) for e in released] == [
            ("ops", "ops", "ok")
        ], entries
        assert "release" in released[0]["action"], released
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert PASSWORD.encode() not in err


def _wait_until_serving(url: str, server: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stderr.read() if server.stderr else ""
        try:
            httpx.get(url + "/openapi.json", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("admin API did not start")
