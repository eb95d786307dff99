"""Audit entries that missed the Kafka topic are sent again, in order, by
the admin API itself (gateway/admin/audit_forward.py).

The lease, cursor and order are checked with a stand-in producer on the real
Redis (one replica works, the other waits, then takes over); the real path
with a Kafka broker of the test's own, on its own loopback ports, which the
test stops and starts again (never the shared one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from typer.testing import CliRunner

from gateway.admin import cli as admin_cli
from gateway.admin.audit import AuditEntry, AuditLog, acked_key
from gateway.admin.audit_forward import AuditForwarder
from gateway.admin.audit_topic import AuditTopic, TopicRecord, encode, read_topic
from gateway.admin.metrics import AdminMetrics
from gateway.cli import app as cli_app
from gateway.config import Settings
from gateway.errors import BrokerError
from gateway.store import redis_from_settings
from tests.conftest import StackInfo
from tests.integration.adminkit import FAST_HASH, AdminHarness, admin_app
from tests.integration.helpers import REPO, delete_prefix, isolated_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

KEY = "a test audit key of 32 characters"
KAFKA_SH = REPO / "infra" / "kafka" / "kafka.sh"


class _StandIn(AuditTopic):
    """A producer that acknowledges the first ``accept`` entries of each
    re-send and keeps what it acknowledged, in order; the topic it reads
    back holds ``on_topic`` (or cannot be read, ``readable`` False)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.accept = 1_000_000
        self.sent: list[str] = []
        self.on_topic: list[AuditEntry] = []
        self.readable = True

    async def resend(self, entries: Sequence[AuditEntry]) -> int:
        taken = list(entries)[: self.accept]
        self.sent += [e.entry_id for e in taken]
        return len(taken)

    async def scan(
        self, on_record: Callable[[TopicRecord], None], *, since_ms: int
    ) -> bool:
        if not self.readable:
            raise BrokerError("no broker here")
        for offset, entry in enumerate(self.on_topic):
            on_record(TopicRecord(0, offset, entry.actor, json.loads(encode(entry))))
        return True


async def _until(
    check: Callable[[], Any], timeout_s: float, what: str, step_s: float = 0.1
) -> Any:
    """Poll the awaitable factory ``check`` until it returns something true."""
    async with asyncio.timeout(timeout_s):
        while True:
            value = await check()
            if value:
                return value
            await asyncio.sleep(step_s)
    raise AssertionError(what)  # pragma: no cover - the timeout raises first


async def test_one_replica_resends_in_order_and_another_takes_over(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        admin={"audit_kafka_timeout_s": 0.05, "audit_forward_interval_s": 0.1},
        # The lease lasts three intervals plus this: long enough that a
        # loaded machine does not let it lapse between the steps below that
        # assume it held (0.8 s did, once in a full run).
        kafka={"request_timeout_s": 3.0},
    )
    redis = redis_from_settings(settings)
    topics = [_StandIn(settings), _StandIn(settings)]
    metrics = [AdminMetrics(), AdminMetrics()]
    first, second = (
        AuditForwarder(redis, settings, topic, m)
        for topic, m in zip(topics, metrics, strict=True)
    )
    try:
        # The first pass ever, on an empty stream, puts the cursor before
        # its start: every entry below is the forwarder's to send.
        assert await first.run_once() == 0
        assert await second.run_once() is None
        log = AuditLog(redis, settings)  # no producer: nothing reaches Kafka
        for i in range(10):
            await log.record(
                actor="ann", action="test", target=str(i), source="-", outcome="ok"
            )
        stream = [e.entry_id for e in reversed(await log.read(100))]
        # Entries 3 and 4 reached the topic when their actions ran.
        await redis.zadd(
            acked_key(settings), {i: int(i.split("-")[0]) for i in stream[2:4]}
        )

        # The holder sends five of the eight others; the cursor moves over
        # them and over the two already there, and no further.
        topics[0].accept = 5
        # All ten due at once (older than the grace, by Redis's clock): a
        # pass while only some are due would send those and leave no
        # backlog, as a loaded full run showed.
        grace_ms = int(settings.admin.audit_kafka_timeout_s * 1000) + 1000
        newest_ms = int(stream[-1].split("-")[0])

        async def all_due() -> bool:
            seconds, micros = await redis.time()
            return int(seconds) * 1000 + int(micros) // 1000 > newest_ms + grace_ms

        await _until(all_due, 10, "entries never came due")
        backlog = await first.run_once()
        assert backlog == 3
        assert topics[0].sent == stream[:2] + stream[4:7]
        cursor = await redis.get(first.cursor_key)
        assert cursor is not None and cursor.decode() == stream[6]
        assert await redis.zcard(acked_key(settings)) == 0
        assert (
            metrics[0].registry.get_sample_value("modelgate_admin_audit_kafka_backlog")
            == 3
        )

        # The other replica does nothing while the lease is held.
        assert await second.run_once() is None
        topics[0].accept = 1_000_000
        assert await first.run_once() == 0
        assert topics[0].sent == stream[:2] + stream[4:]
        assert topics[1].sent == []

        # The holder stops renewing; the other takes over within the lease.
        await log.record(
            actor="ann", action="test", target="late", source="-", outcome="ok"
        )
        newest = (await log.read(1))[0].entry_id

        async def resent_by_second() -> bool:
            await second.run_once()
            return topics[1].sent == [newest]

        await _until(resent_by_second, 20, "the other replica never took over")
        assert (
            metrics[1].registry.get_sample_value(
                "modelgate_admin_audit_forwarder_lease"
            )
            == 1
        )
        assert await first.run_once() is None
    finally:
        await redis.aclose()
        await delete_prefix(settings)


def _forward_settings(
    stack: StackInfo, models_dir: Path, request_timeout_s: float = 3.0, **admin: Any
) -> Settings:
    return isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        admin={"audit_kafka_timeout_s": 0.05, "audit_forward_interval_s": 0.1, **admin},
        kafka={"request_timeout_s": request_timeout_s},
    )


async def _log(log: AuditLog, n: int, tag: str = "") -> None:
    for i in range(n):
        await log.record(
            actor="ann", action="test", target=f"{tag}{i}", source="-", outcome="ok"
        )


async def test_the_first_pass_starts_at_the_oldest_entry_not_on_the_topic(
    stack: StackInfo, models_dir: Path
) -> None:
    """Entries that missed the topic before the forwarder ran are sent: its
    first pass starts at the oldest entry neither on the topic nor marked
    acknowledged (it started at the newest, and sent none of them)."""
    settings = _forward_settings(stack, models_dir)
    redis = redis_from_settings(settings)
    topic = _StandIn(settings)
    forwarder = AuditForwarder(redis, settings, topic)
    try:
        log = AuditLog(redis, settings)
        await _log(log, 10)
        entries = list(reversed(await log.read(100)))
        # Entries 1-4 and 6 are on the topic, 5 was acknowledged, and 8 came
        # late (after 7 missed it).
        topic.on_topic = [*entries[:4], entries[5], entries[7]]
        five = entries[4].entry_id
        await redis.zadd(acked_key(settings), {five: int(five.split("-")[0])})

        # Kafka unreadable: no cursor is placed and nothing is sent.
        topic.readable = False
        assert await forwarder.run_once() is None
        assert await redis.get(forwarder.cursor_key) is None
        topic.readable = True

        async def all_sent() -> bool:
            await forwarder.run_once()
            return len(topic.sent) >= 3

        await _until(all_sent, 10, "the missed entries were never sent")
        assert topic.sent == [e.entry_id for e in entries[6:]]
        assert await redis.get(forwarder.cursor_key) == entries[-1].entry_id.encode()
        assert await redis.get(forwarder.cursor_seq_key) == b"10"
    finally:
        await redis.aclose()
        await delete_prefix(settings)


async def test_the_first_pass_reads_the_real_topic_and_sends_only_what_it_lacks(
    stack: StackInfo, models_dir: Path
) -> None:
    # A loaded machine needs the time to start a producer.
    settings = _forward_settings(stack, models_dir, request_timeout_s=20.0)
    redis = redis_from_settings(settings)
    topic = AuditTopic(settings)
    try:
        # Five entries, the first three already on the topic (put there
        # without marks, so only the topic itself can tell).
        log = AuditLog(redis, settings)
        await _log(log, 5)
        entries = list(reversed(await log.read()))
        assert await topic.resend(entries[:3]) == 3
        stream = [e.entry_id for e in entries]
        forwarder = AuditForwarder(redis, settings, topic)

        async def caught_up() -> bool:
            await forwarder.run_once()
            cursor = await redis.get(forwarder.cursor_key)
            return cursor == stream[-1].encode()

        await _until(caught_up, 30, "the forwarder never caught up", step_s=0.3)
        records = await read_topic(settings)
    finally:
        await topic.close()
        await redis.aclose()
        await delete_prefix(settings)

    # Each entry once: the three already there were not sent again.
    assert sorted(str(r.entry["entry_id"]) for r in records) == sorted(stream)


async def test_entries_trimmed_before_the_topic_had_them_are_counted_lost(
    stack: StackInfo, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _forward_settings(stack, models_dir, audit_max_entries=100)
    redis = redis_from_settings(settings)
    topic = _StandIn(settings)
    metrics = AdminMetrics()
    forwarder = AuditForwarder(redis, settings, topic, metrics)
    try:
        log = AuditLog(redis, settings)
        assert await forwarder.run_once() == 0  # cursor 0-0: all is due
        await _log(log, 3, "before")

        async def passed_three() -> bool:
            await forwarder.run_once()
            return await redis.get(forwarder.cursor_seq_key) == b"3"

        await _until(passed_three, 10, "the first entries were never passed")

        # Kafka refuses everything while far more than the cap is written:
        # the stream trims the oldest whole nodes (MAXLEN ~).
        topic.accept = 0
        await _log(log, 2, "early")
        # These two, trimmed below, reached Kafka on their own.
        early = [e.entry_id for e in await log.read(2)]
        await redis.zadd(acked_key(settings), {i: int(i.split("-")[0]) for i in early})
        await _log(log, 400, "down")
        oldest = (await redis.xrange(log.key, "-", "+", count=1))[0]
        first_left = int(oldest[1][b"seq"])
        assert first_left > 6, "nothing was trimmed"

        caplog.set_level(logging.ERROR, logger="gateway.admin.audit_forward")
        topic.accept = 1_000_000
        newest = str((await log.read(1))[0].seq).encode()

        async def caught_up() -> bool:
            await forwarder.run_once()
            return await redis.get(forwarder.cursor_seq_key) == newest

        await _until(caught_up, 20, "the forwarder never caught up")
        await forwarder.run_once()
    finally:
        await redis.aclose()
        await delete_prefix(settings)

    lost = first_left - 3 - 1 - 2
    counted = metrics.registry.get_sample_value(
        "modelgate_admin_audit_kafka_lost_total"
    )
    assert counted == lost, (counted, lost)
    errors = [
        r for r in caplog.records if getattr(r, "code", "") == "AUDIT_ENTRIES_LOST"
    ]
    assert len(errors) == 1, caplog.text  # counted once, not on every pass
    assert (errors[0].first_seq, errors[0].last_seq) == (4, first_left - 1)


async def _returns(value: Any) -> Any:
    return value


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _OwnKafka:
    """A broker of this test's own (infra/kafka/kafka.sh with a private
    MODELGATE_VAR and ports), to stop and start without touching the
    shared stack."""

    def __init__(self, var: Path) -> None:
        self.port = _free_port()
        # The checkout's fetched jars, shared read-only (fetched if missing).
        self._run("install", env={})
        (var / "kafka").mkdir(parents=True)
        (var / "kafka" / "libs").symlink_to(REPO / "var" / "kafka" / "libs")
        self._env = {
            "MODELGATE_VAR": str(var),
            "MODELGATE_KAFKA_PORT": str(self.port),
            "MODELGATE_KAFKA_CONTROLLER_PORT": str(_free_port()),
            "MODELGATE_KAFKA_HEAP": "-Xms128m -Xmx256m",
        }

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, command: str, env: dict[str, str]) -> None:
        subprocess.run(
            ["bash", str(KAFKA_SH), command],
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=150,
            check=True,
        )

    def start(self) -> None:
        self._run("start", self._env)

    def stop(self) -> None:
        self._run("stop", self._env)


@pytest.fixture
async def own_kafka(tmp_path: Path) -> AsyncIterator[_OwnKafka]:
    kafka = await asyncio.to_thread(_OwnKafka, tmp_path / "var")
    await asyncio.to_thread(kafka.start)
    try:
        yield kafka
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            await asyncio.to_thread(kafka.stop)


def _gauge(harness: AdminHarness, name: str) -> float:
    metrics: AdminMetrics = harness.app.state.metrics
    return metrics.registry.get_sample_value(name) or 0.0


async def test_entries_made_while_kafka_is_down_reach_the_topic_in_order(
    stack: StackInfo,
    models_dir: Path,
    own_kafka: _OwnKafka,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = isolated_settings(
        own_kafka.bootstrap,
        stack.redis_url,
        models_dir,
        auth={"server_key": Fernet.generate_key().decode()},
        admin={
            **FAST_HASH,
            "audit_kafka_timeout_s": 0.5,
            "audit_forward_interval_s": 0.2,
            "audit_key": KEY,
        },
        kafka={"request_timeout_s": 3.0},
    )
    async with admin_app(settings) as admin, admin.client() as client:
        topic: AuditTopic = admin.app.state.audit_topic
        async with asyncio.timeout(60):
            assert await topic.wait_started()
        await admin.add_user("root", "admin")
        root = await admin.session(client, "root")

        # Step: actions while the broker is down go ahead; their entries
        # wait in the stream.
        await asyncio.to_thread(own_kafka.stop)
        for i in range(4):
            made = await client.post(
                "/v1/users",
                json={"name": f"user{i}", "role": "viewer", "password": "p" * 16},
                headers=root,
            )
            assert made.status_code == 201, made.text
        await _until(
            lambda: _returns(_gauge(admin, "modelgate_admin_audit_kafka_backlog") >= 4),
            20,
            "the backlog never showed the missed entries",
        )

        # Step: the broker returns; the forwarder catches up by itself.
        await asyncio.to_thread(own_kafka.start)
        forwarder: AuditForwarder = admin.app.state.audit_forwarder
        newest = (await admin.audit())[0].entry_id

        async def caught_up() -> bool:
            cursor = await admin.context.redis.get(forwarder.cursor_key)
            return cursor is not None and cursor.decode() == newest

        await _until(caught_up, 90, "the forwarder never caught up", step_s=0.5)
        assert _gauge(admin, "modelgate_admin_audit_kafka_backlog") == 0
        assert _gauge(admin, "modelgate_admin_audit_kafka_resent_total") >= 4
        late = await admin.login(client, "root")
        assert late.status_code == 201, late.text
        stream = [e.entry_id for e in reversed(await admin.audit())]

    records = await read_topic(settings)
    first_copies: list[str] = []
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        entry_id = str(record.entry["entry_id"])
        if entry_id not in first_copies:
            first_copies.append(entry_id)
    # One actor, so one partition: the topic holds the stream's order.
    assert len({r.partition for r in records}) == 1
    assert first_copies == stream, (first_copies, stream)

    monkeypatch.setattr(admin_cli, "_settings", lambda config: settings)
    verified = await asyncio.to_thread(
        CliRunner().invoke, cli_app, ["admin", "audit", "--verify", "--from-kafka"]
    )
    assert verified.exit_code == 0, verified.output
    assert f"{len(stream)} chained entries verified, signed" in verified.output
