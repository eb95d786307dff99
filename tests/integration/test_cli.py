"""The ``modelgate`` command line against the real broker and Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gateway.config import Settings
from gateway.keys import KeyStore
from gateway.topics import ensure_topics
from tests.conftest import StackInfo
from tests.integration.helpers import (
    REPO,
    RawKafka,
    isolated_settings,
    read_topic,
    running_worker,
    settings_env,
    start_worker_process,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _cli(
    settings: Settings, *args: str, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env=settings_env(settings),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def _spawn(settings: Settings, *args: str) -> subprocess.Popen[str]:
    """A long-running CLI command with its output piped back to the test."""
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", *args],
        env=settings_env(settings),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def settings(stack: StackInfo, models_dir: Path) -> Settings:
    return isolated_settings(
        stack.kafka_bootstrap, stack.redis_url, models_dir, policy={"shadow": True}
    )


def test_keys_send_and_revoke(settings: Settings, tmp_path: Path) -> None:
    created = _cli(settings, "keys", "create", "zoe", "--model", "digits")
    assert created.returncode == 0, created.stderr
    token = created.stdout.split("token=")[1].strip()
    key_id = token.split(".")[0]
    assert "cannot be shown again" in created.stderr

    listed = _cli(settings, "keys", "list")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["key_id"] for r in rows] == [key_id], listed.stdout
    assert token.split(".")[1] not in listed.stdout

    worker = start_worker_process(settings, tmp_path / "worker.log")
    try:
        sent = _cli(settings, "send", "--token", token, "--sample", "3")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        answer = json.loads(sent.stdout)
        assert answer["status"] == "ok"
        assert answer["outputs"][1]["name"] == "label"

        revoked = _cli(settings, "keys", "revoke", key_id)
        assert revoked.returncode == 0, revoked.stderr
        ghost = _cli(settings, "keys", "revoke", "mgk_000000000000")
        assert ghost.returncode == 1
        assert ghost.stderr.strip() == "error [NOT_FOUND]: no key mgk_000000000000"
        # Workers cache keys for auth.key_cache_ttl_s (1 s): within a few
        # seconds of the revoke, a send must be refused.
        deadline = time.monotonic() + 5
        while True:
            refused = _cli(settings, "send", "--token", token, "--sample", "3")
            answer = json.loads(refused.stdout)
            if answer["status"] == "error" or time.monotonic() > deadline:
                break
        assert refused.returncode == 1
        assert answer["error"]["code"] == "AUTH_REVOKED"
    finally:
        worker.terminate()
        worker.wait(timeout=30)


async def test_alerts_are_printed_and_followed(settings: Settings) -> None:
    created = _cli(settings, "keys", "create", "noisy")
    token = created.stdout.split("token=")[1].strip()
    key_id, secret = KeyStore.parse_token(token)
    await ensure_topics(settings)
    follower = _spawn(settings, "alerts", "--follow")
    try:
        # The follower says when it is positioned; alerts before that could be
        # missed by design (it follows from the end).
        assert follower.stderr is not None
        ready = await asyncio.get_running_loop().run_in_executor(
            None, follower.stderr.readline
        )
        assert ready.startswith("following"), ready
        # Uniform noise is far from every digit: the OOD detector flags it.
        rng = np.random.default_rng(0)
        async with RawKafka(settings) as kafka, running_worker(settings):
            for _ in range(40):
                await kafka.send_request(
                    key_id, secret, rng.uniform(0, 16, (1, 64)), client_id="noisy"
                )
            await kafka.flush()
            alerts = await read_topic(
                settings, settings.kafka.topics.alerts, until=lambda r: len(r) >= 3
            )
        assert alerts, "no alert for 40 uniform-noise queries"
        assert alerts[0]["type"] == "dev.modelgate.alert.v1"
        assert alerts[0]["data"]["client_id"] == "noisy"

        printed = _cli(settings, "alerts")
        assert printed.returncode == 0, printed.stderr
        lines = printed.stdout.splitlines()
        assert len(lines) >= len(alerts), printed.stdout
        assert "client=noisy" in lines[0] and "detector=" in lines[0]
    finally:
        follower.terminate()
        out, _ = follower.communicate(timeout=30)
    assert "client=noisy" in out, out


def test_bad_configuration_names_the_field(settings: Settings) -> None:
    env = settings_env(settings)
    env["MODELGATE_POLICY__FLAG_AT"] = "-1"
    env.pop("MODELGATE_POLICY", None)
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "worker"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "policy.flag_at" in result.stderr, result.stderr


def test_every_command_has_help() -> None:
    for command in (
        [],
        ["worker"],
        ["demo"],
        ["send"],
        ["alerts"],
        ["keys", "create"],
        ["keys", "list"],
        ["keys", "revoke"],
        ["up"],
        ["down"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "gateway", *command, "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (command, result.stderr)
        assert "Usage" in result.stdout


async def test_stored_alerts_print_in_time_order_across_partitions(
    stack: StackInfo, models_dir: Path
) -> None:
    """Alerts of clients on different partitions are read partition by
    partition; the command prints them by record time."""
    printed = await _store_and_print_alerts(stack, models_dir)
    assert _clients(printed) == ["c0", "c1", "c2", "c3"], printed


async def test_two_runs_on_one_broker_print_only_their_own_stored_alerts(
    stack: StackInfo, models_dir: Path
) -> None:
    """Two test sessions sharing a broker, one after the other: the second
    prints its own 4 alerts, not the first one's too. Its topic override once
    put both on the shared default alert topic (each alert printed twice)."""
    first = await _store_and_print_alerts(stack, models_dir)
    second = await _store_and_print_alerts(stack, models_dir)
    assert _clients(first) == _clients(second) == ["c0", "c1", "c2", "c3"], (
        first + "\n---\n" + second
    )


async def _store_and_print_alerts(stack: StackInfo, models_dir: Path) -> str:
    """Store 4 alerts alternating over 2 partitions of a run's own alert
    topic, 1 s of record time apart; return what ``modelgate alerts`` prints."""
    from aiokafka import AIOKafkaProducer

    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        kafka={"topics": {"other_partitions": 2}},
    )
    await ensure_topics(settings)
    base_ms = int(time.time() * 1000) - 60_000
    # Partition 0 holds the 1st and 3rd alert, partition 1 the 2nd and 4th.
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap)
    await producer.start()
    try:
        for i in range(4):
            event = {"time": f"t{i}", "data": {"client_id": f"c{i}", "score": 1.0}}
            await producer.send_and_wait(
                settings.kafka.topics.alerts,
                json.dumps(event).encode(),
                partition=i % 2,
                timestamp_ms=base_ms + i * 1000,
            )
    finally:
        await producer.stop()
    printed = _cli(settings, "alerts")
    assert printed.returncode == 0, printed.stderr
    return printed.stdout


def _clients(printed: str) -> list[str]:
    return [line.split("client=")[1].split()[0] for line in printed.splitlines()]


async def test_a_copy_of_a_stored_alert_is_printed_once(
    stack: StackInfo, models_dir: Path
) -> None:
    """A worker produces at least once: a copy of an alert (same id, later
    record time, maybe another partition) is not printed again; another
    alert with the same text but its own id is."""
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        kafka={"topics": {"other_partitions": 2}},
    )
    await ensure_topics(settings)
    base_ms = int(time.time() * 1000) - 60_000
    # (id, client, partition): the copy of "a1" lands after "b1", elsewhere.
    stored = [("a1", "c0", 0), ("b1", "c1", 1), ("a1", "c0", 1), ("a2", "c0", 0)]
    await _produce_alerts(settings, stored, base_ms)

    printed = _cli(settings, "alerts")
    assert printed.returncode == 0, printed.stderr
    assert _clients(printed.stdout) == ["c0", "c1", "c0"], printed.stdout
    assert "1 duplicate alert(s) not shown" in printed.stderr, printed.stderr

    raw = _cli(settings, "alerts", "--json")
    ids = [json.loads(line)["id"] for line in raw.stdout.splitlines()]
    assert ids == ["a1", "b1", "a2"], raw.stdout


async def test_a_copy_of_a_followed_alert_is_printed_once(settings: Settings) -> None:
    await ensure_topics(settings)
    follower = _spawn(settings, "alerts", "--follow")
    try:
        assert follower.stdout is not None and follower.stderr is not None
        loop = asyncio.get_running_loop()
        ready = await loop.run_in_executor(None, follower.stderr.readline)
        assert ready.startswith("following"), ready
        # One partition: the follower reads them in this order.
        stored = [("a1", "c0", 0), ("a1", "c0", 0), ("b1", "c1", 0)]
        await _produce_alerts(settings, stored, int(time.time() * 1000))
        first = await loop.run_in_executor(None, follower.stdout.readline)
        second = await loop.run_in_executor(None, follower.stdout.readline)
    finally:
        follower.terminate()
        follower.communicate(timeout=30)
    assert "client=c0" in first, first
    assert "client=c1" in second, second


async def _produce_alerts(
    settings: Settings, alerts: list[tuple[str, str, int]], base_ms: int
) -> None:
    """Produce minimal alert events ``(id, client, partition)`` in this order,
    1 s of record time apart from ``base_ms`` on."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap)
    await producer.start()
    try:
        for i, (event_id, client, partition) in enumerate(alerts):
            event = {
                "id": event_id,
                "time": f"t{i}",
                "data": {"client_id": client, "score": 1.0},
            }
            await producer.send_and_wait(
                settings.kafka.topics.alerts,
                json.dumps(event).encode(),
                partition=partition,
                timestamp_ms=base_ms + i * 1000,
            )
    finally:
        await producer.stop()


async def test_no_stored_alert_says_so_on_stderr(
    stack: StackInfo, models_dir: Path
) -> None:
    """It printed nothing at all, which reads as a hang or a fault."""
    settings = isolated_settings(stack.kafka_bootstrap, stack.redis_url, models_dir)
    await ensure_topics(settings)
    for argv in (["alerts"], ["alerts", "--json"]):
        printed = _cli(settings, *argv)
        assert printed.returncode == 0, printed.stderr
        assert printed.stdout == "", printed.stdout
        assert printed.stderr.strip() == (
            f"no alerts in {settings.kafka.topics.alerts}"
        ), printed.stderr
