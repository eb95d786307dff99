"""The admin audit log's Kafka copy through the real broker: an admin action
appears on the audit topic with its fields, one actor's entries keep the
stream's order, the CLI reads them back, and Kafka being unreachable or
silent neither hangs nor fails the admin API (the miss is logged at WARNING
and counted; tests/integration/test_admin_audit_forward.py shows it re-sent).

Each test has its own topics and key prefix (``isolated_settings``); the
"Kafka down" tests point the admin API at a loopback port of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from cryptography.fernet import Fernet
from typer.testing import CliRunner

from gateway.admin import cli as admin_cli
from gateway.admin.audit import AuditLog
from gateway.admin.audit_topic import AuditTopic, TopicRecord, read_topic
from gateway.admin.metrics import AdminMetrics
from gateway.cli import app as cli_app
from gateway.config import Settings
from gateway.store import redis_from_settings
from tests.conftest import StackInfo
from tests.integration.adminkit import FAST_HASH, AdminHarness, admin_app
from tests.integration.helpers import delete_prefix, isolated_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

_MISSED = "modelgate_admin_audit_kafka_missed_total"
_PRODUCED = "modelgate_admin_audit_kafka_produced_total"


def _settings(
    stack: StackInfo, models_dir: Path, bootstrap: str | None = None, **kafka: Any
) -> Settings:
    return isolated_settings(
        bootstrap or stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        auth={"server_key": Fernet.generate_key().decode()},
        admin={**FAST_HASH, "audit_kafka_timeout_s": 0.5},
        kafka=kafka,
    )


def _metric(harness: AdminHarness, name: str, **labels: str) -> float:
    metrics: AdminMetrics = harness.app.state.metrics
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def _topic_started(harness: AdminHarness) -> None:
    topic: AuditTopic = harness.app.state.audit_topic
    async with asyncio.timeout(30):
        assert await topic.wait_started()


async def test_an_admin_action_appears_on_the_audit_topic(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = _settings(stack, models_dir)
    async with admin_app(settings) as admin:
        await _topic_started(admin)
        await admin.add_user("alice", "admin")
        async with admin.client("127.0.0.9") as client:
            headers = await admin.session(client, "alice")
            wrong = await admin.login(client, "alice", password="not the password")
            assert wrong.status_code == 401, wrong.text
            created = await client.post(
                "/v1/users",
                json={"name": "bob", "role": "viewer", "password": "p" * 16},
                headers=headers,
            )
            assert created.status_code < 300, created.text

        # record() returns once the broker acknowledged the entry, so the
        # topic already holds every entry the stream holds.
        stream = {e.entry_id: e for e in await admin.audit()}
        produced = _metric(admin, _PRODUCED)
    records = await read_topic(settings)

    assert len(stream) >= 3, stream
    assert produced == len(stream)
    by_id = {r.entry["entry_id"]: r for r in records}
    assert set(by_id) == set(stream)
    for entry_id, entry in stream.items():
        record = by_id[entry_id]
        assert record.key == entry.actor
        assert record.entry == {
            "v": 3,
            "seq": entry.seq,
            "prev": entry.prev,
            "hash": entry.hash,
            "mac": entry.mac,
            "kid": entry.kid,
            "entry_id": entry_id,
            "ts_ms": entry.ts_ms,
            "actor": entry.actor,
            "action": entry.action,
            "target": entry.target,
            "source": entry.source,
            "outcome": entry.outcome,
            "detail": entry.detail,
        }
    actions = {
        (r.entry["actor"], r.entry["action"], r.entry["outcome"]) for r in records
    }
    assert ("alice", "login", "ok") in actions
    assert ("alice", "POST /v1/users", "ok") in actions
    assert all(r.entry["source"] == "127.0.0.9" for r in records)
    assert any(
        r.entry["actor"] == "alice" and r.entry["outcome"] != "ok" for r in records
    ), records

    # The topic keeps its records far longer than the broker's default.
    kafka_admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await kafka_admin.start()
    try:
        described = await kafka_admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, settings.kafka.topics.audit)]
        )
    finally:
        await kafka_admin.close()
    configs = {c[0]: c[1] for c in described[0].resources[0][4]}
    assert configs["retention.ms"] == str(settings.kafka.topics.audit_retention_ms)


async def test_one_actors_entries_keep_the_streams_order(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = _settings(stack, models_dir)
    redis = redis_from_settings(settings)
    topic = AuditTopic(settings)
    try:
        # Started first: an entry waits at most audit_kafka_timeout_s (0.5 s
        # here) for the producer's start, which a loaded machine can exceed.
        topic.start_soon()
        assert await topic.wait_started()
        log = AuditLog(redis, settings, topic)
        # Concurrent, as requests of one admin can be: each append and hand-
        # over runs under the log's lock, so the topic gets the stream's order.
        await asyncio.gather(
            *(
                log.record(
                    actor=f"actor{i % 3}",
                    action="test",
                    target=str(i),
                    source="127.0.0.1",
                    outcome="ok",
                )
                for i in range(60)
            )
        )
        stream_order = [e.entry_id for e in reversed(await log.read(100))]
    finally:
        await topic.close()
        await redis.aclose()
        await delete_prefix(settings)
    records = await read_topic(settings)

    assert len(records) == 60
    for actor in ("actor0", "actor1", "actor2"):
        mine = [r for r in records if r.key == actor]
        assert len(mine) == 20
        assert len({r.partition for r in mine}) == 1
        on_topic = [str(r.entry["entry_id"]) for r in sorted(mine, key=_offset)]
        assert on_topic == [i for i in stream_order if i in set(on_topic)]


def _offset(record: TopicRecord) -> int:
    return record.offset


async def test_the_cli_reads_the_audit_topic(
    stack: StackInfo, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(stack, models_dir)
    redis = redis_from_settings(settings)
    topic = AuditTopic(settings)
    try:
        # Started first: an entry waits at most audit_kafka_timeout_s (0.5 s
        # here) for the producer's start, which a loaded machine can exceed.
        topic.start_soon()
        assert await topic.wait_started()
        log = AuditLog(redis, settings, topic)
        for i in range(5):
            await log.record(
                actor="carol",
                action="cli-test",
                target=str(i),
                source="127.0.0.1",
                outcome="ok",
                detail={"n": str(i)},
            )
    finally:
        await topic.close()
        await redis.aclose()
        await delete_prefix(settings)
    monkeypatch.setattr(admin_cli, "_settings", lambda config: settings)

    result = await asyncio.to_thread(
        CliRunner().invoke, cli_app, ["admin", "audit", "--from-kafka", "--limit", "3"]
    )

    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [line["target"] for line in lines] == ["2", "3", "4"]
    assert all(line["key"] == "carol" and line["actor"] == "carol" for line in lines)
    assert lines[0]["detail"] == {"n": "2"}


@contextlib.asynccontextmanager
async def _silent_broker() -> AsyncIterator[str]:
    """A loopback listener that accepts connections and never answers: a
    hung broker."""
    held: list[asyncio.StreamWriter] = []

    async def accept(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def _refusing_broker() -> AsyncIterator[str]:
    """A loopback port nothing listens on (taken, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield f"127.0.0.1:{port}"


@pytest.mark.parametrize("broker", [_silent_broker, _refusing_broker])
async def test_kafka_down_does_not_hang_or_fail_the_admin_api(
    stack: StackInfo,
    models_dir: Path,
    caplog: pytest.LogCaptureFixture,
    broker: Any,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.admin.audit_topic")
    async with broker() as bootstrap:
        settings = _settings(stack, models_dir, bootstrap, request_timeout_s=5.0)
        async with admin_app(settings) as admin:
            await admin.add_user("dave", "admin")
            async with admin.client() as client:
                timings = []
                for _ in range(3):
                    began = time.monotonic()
                    response = await admin.login(client, "dave")
                    timings.append(time.monotonic() - began)
                    assert response.status_code == 201, response.text
            entries = [e for e in await admin.audit() if e.action == "login"]
            missed = sum(
                _metric(admin, _MISSED, reason=reason)
                for reason in ("unavailable", "timeout")
            )

    # Each action waits at most admin.audit_kafka_timeout_s (0.5 s) for Kafka,
    # not kafka.request_timeout_s (5 s); the rest is Argon2 (cheapest) and Redis.
    assert max(timings) < 0.5 + 1.0, timings
    assert len(entries) == 3
    assert missed == 3
    errors = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING
        and r.name == "gateway.admin.audit_topic"
        and "not written to Kafka" in r.getMessage()
    ]
    assert sorted(getattr(r, "entry_id", None) for r in errors) == sorted(
        e.entry_id for e in entries
    )
    assert all(getattr(r, "actor", None) == "dave" for r in errors)


async def test_concurrent_actions_wait_one_timeout_not_one_each(
    stack: StackInfo, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Entries are handed to the producer one at a time (the stream's order);
    # while a connection attempt hangs, each must still wait only its own
    # admin.audit_kafka_timeout_s from the start of its action, not a whole
    # timeout more per entry queued ahead of it.
    caplog.set_level(logging.WARNING, logger="gateway.admin.audit_topic")
    async with _silent_broker() as bootstrap:
        settings = _settings(stack, models_dir, bootstrap, request_timeout_s=10.0)
        redis = redis_from_settings(settings)
        topic = AuditTopic(settings)
        try:
            log = AuditLog(redis, settings, topic)
            topic.start_soon()
            began = time.monotonic()
            await asyncio.gather(
                *(
                    log.record(
                        actor="erin",
                        action="test",
                        target=str(i),
                        source="127.0.0.1",
                        outcome="ok",
                    )
                    for i in range(10)
                )
            )
            elapsed = time.monotonic() - began
            entries = await log.read(100)
        finally:
            await topic.close()
            await redis.aclose()
            await delete_prefix(settings)

    assert len(entries) == 10
    assert elapsed < 0.5 + 1.0, elapsed
    missed = [
        r
        for r in caplog.records
        if r.name == "gateway.admin.audit_topic"
        and "not written to Kafka" in r.getMessage()
    ]
    assert len(missed) == 10
