"""The audit log's chain on the real Redis: two admin replicas appending at
once keep one unbroken chain, and ``modelgate admin audit --verify`` finds an
edited, deleted, reordered or inserted entry in the stream with its code.
The chain's logic itself is tests/gateway/test_admin_audit_chain.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis
from typer.testing import CliRunner

from gateway.admin import cli as admin_cli
from gateway.admin.audit import AuditLog
from gateway.admin.audit_chain import canonical, key_id, link_hash, verify
from gateway.cli import app as cli_app
from gateway.config import Settings
from gateway.store import RedisClient, redis_from_settings
from tests.conftest import StackInfo
from tests.integration.helpers import delete_prefix, isolated_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

KEY = "a test audit key of 32 characters"
Rows = list[tuple[bytes, dict[bytes, bytes]]]


def _settings(stack: StackInfo, models_dir: Path, key: str | None = KEY) -> Settings:
    return isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        admin={"audit_key": key} if key else {},
    )


@pytest.fixture
async def settings(stack: StackInfo, models_dir: Path) -> AsyncIterator[Settings]:
    settings = _settings(stack, models_dir)
    yield settings
    await delete_prefix(settings)


async def _record(log: AuditLog, actor: str, n: int) -> None:
    for i in range(n):
        await log.record(
            actor=actor,
            action="POST /v1/keys",
            target=f"{actor}-{i}",
            source="127.0.0.1",
            outcome="ok",
            detail={"n": str(i)},
        )


async def test_two_replicas_appending_at_once_keep_one_chain(
    settings: Settings,
) -> None:
    # Two processes' logs, each with its own client and its own guess of the
    # chain head: the append script refuses the one that guessed an old head.
    first, second = redis_from_settings(settings), redis_from_settings(settings)
    try:
        logs = [AuditLog(first, settings), AuditLog(second, settings)]
        calls = 0
        for log in logs:
            script = log._append

            async def counted(*args: Any, _script: Any = script, **kwargs: Any) -> Any:
                nonlocal calls
                calls += 1
                return await _script(*args, **kwargs)

            log._append = counted  # type: ignore[method-assign]
        await asyncio.gather(_record(logs[0], "ann", 25), _record(logs[1], "bob", 25))
        entries = [e async for page in logs[0].pages() for e in page]
    finally:
        await first.aclose()
        await second.aclose()

    assert [e.seq for e in entries] == list(range(1, 51))
    # The appends really raced: both first appends guessed the empty head,
    # so the one that lost was refused and signed again (whether the two
    # then interleave is up to the event loop; under load one tends to run
    # ahead, and the other waits at most _MAX_APPEND_ATTEMPTS refusals).
    assert calls > 50, "no append was refused: the head check was not exercised"
    verdict = verify([e.chained() for e in entries], KEY.encode())
    assert verdict.code is None, verdict.message


async def _rows(redis: RedisClient, key: str) -> Rows:
    rows: Rows = await redis.xrange(key)
    return rows


async def _rewrite(redis: RedisClient, key: str, rows: Rows) -> None:
    """Replace the stream with ``rows`` in this order, under fresh ids (the
    stream id is Redis's and not signed, so a rewriter may pick any)."""
    await redis.delete(key)
    for i, (_, fields) in enumerate(rows):
        await redis.xadd(key, fields, id=f"{i + 1}-0")


def _edit(rows: Rows) -> Rows:
    rows[3][1][b"outcome"] = b"denied"
    return rows


def _delete(rows: Rows) -> Rows:
    del rows[3]
    return rows


def _reorder(rows: Rows) -> Rows:
    rows[2], rows[3] = rows[3], rows[2]
    return rows


def _insert(rows: Rows) -> Rows:
    # A copy of entry 3 retargeted, linked and hashed correctly, but signed
    # without the key: what someone with Redis access alone can forge.
    fields = dict(rows[3][1])
    fields[b"target"] = b"forged"
    fields[b"seq"] = str(int(fields[b"seq"]) + 1).encode()
    fields[b"prev"] = rows[3][1][b"hash"]
    text = {k.decode(): v.decode() for k, v in fields.items()}
    fields[b"hash"] = link_hash(
        canonical(
            seq=int(text["seq"]),
            prev=text["prev"],
            ts_ms=int(text["ts_ms"]),
            actor=text["actor"],
            action=text["action"],
            target=text["target"],
            source=text["source"],
            outcome=text["outcome"],
            detail={k[2:]: v for k, v in text.items() if k.startswith("d.")},
        )
    ).encode()
    fields[b"mac"] = b"0" * 64
    rows.insert(4, (b"", fields))
    return rows


def _verify_cli(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(admin_cli, "_settings", lambda config: settings)
    return CliRunner().invoke(cli_app, ["admin", "audit", "--verify"])


@pytest.mark.parametrize(
    ("tamper", "code", "broken"),
    [
        (_edit, "AUDIT_ENTRY_ALTERED", 4),
        (_delete, "AUDIT_CHAIN_BROKEN", 4),
        (_reorder, "AUDIT_CHAIN_BROKEN", 3),
        (_insert, "AUDIT_BAD_MAC", 5),
    ],
)
async def test_verify_finds_the_first_tampered_entry(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tamper: Callable[[Rows], Rows],
    code: str,
    broken: int,
) -> None:
    redis = redis_from_settings(settings)
    try:
        log = AuditLog(redis, settings)
        await _record(log, "carol", 8)
        intact = await asyncio.to_thread(_verify_cli, settings, monkeypatch)
        await _rewrite(redis, log.key, tamper(await _rows(redis, log.key)))
        found = await asyncio.to_thread(_verify_cli, settings, monkeypatch)
    finally:
        await redis.aclose()

    assert intact.exit_code == 0, intact.output
    assert "8 chained entries verified, signed" in intact.output, intact.output
    assert found.exit_code == 1, found.output
    assert f"error [{code}]: entry {broken}-0 " in found.output, found.output


async def test_verify_without_the_key_says_it_checked_the_links_only(
    stack: StackInfo, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(stack, models_dir, key=None)
    redis = redis_from_settings(settings)
    try:
        await _record(AuditLog(redis, settings), "dan", 3)
        result = await asyncio.to_thread(_verify_cli, settings, monkeypatch)
    finally:
        await redis.aclose()
        await delete_prefix(settings)

    assert result.exit_code == 0, result.output
    assert "admin.audit_key is unset" in result.output, result.output
    assert "NOT signed" in result.output, result.output


async def test_verify_passes_across_a_key_rotation_and_still_finds_tampering(
    stack: StackInfo, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries name the id of the key that signed them, so after
    ``admin.audit_key`` changes, the old key given as retired verifies the
    entries it signed (they failed AUDIT_BAD_MAC before key ids)."""
    old = _settings(stack, models_dir)
    new_key = "the next audit key, also 32 chars"
    rotated = old.model_copy(
        update={"admin": old.admin.model_copy(update={"audit_key": SecretStr(new_key)})}
    )
    retired = rotated.model_copy(
        update={
            "admin": rotated.admin.model_copy(
                update={"audit_retired_keys": (SecretStr(KEY),)}
            )
        }
    )
    redis = redis_from_settings(old)
    try:
        await _record(AuditLog(redis, old), "erin", 4)
        await _record(AuditLog(redis, rotated), "erin", 4)
        entries = [e async for page in AuditLog(redis, old).pages() for e in page]
        new_only = await asyncio.to_thread(_verify_cli, rotated, monkeypatch)
        both = await asyncio.to_thread(_verify_cli, retired, monkeypatch)
        # An old entry edited and signed again under a key the verifier does
        # not hold, its key id left as it was.
        key = AuditLog(redis, old).key
        rows = _edit(await _rows(redis, key))
        rows[3][1][b"mac"] = b"0" * 64
        await _rewrite(redis, key, rows)
        tampered = await asyncio.to_thread(_verify_cli, retired, monkeypatch)
    finally:
        await redis.aclose()
        await delete_prefix(old)

    assert [e.kid for e in entries] == [key_id(KEY.encode())] * 4 + [
        key_id(new_key.encode())
    ] * 4
    assert new_only.exit_code == 1, new_only.output
    assert f"error [AUDIT_UNKNOWN_KEY]: entry {entries[0].entry_id} " in (
        new_only.output
    ), new_only.output
    assert both.exit_code == 0, both.output
    assert "8 chained entries verified, signed" in both.output, both.output
    assert tampered.exit_code == 1, tampered.output
    assert "error [AUDIT_ENTRY_ALTERED]: entry 4-0 " in tampered.output


async def test_verify_reads_the_stream_a_page_at_a_time(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--verify`` holds one page of the stream, not the whole of it."""
    redis = redis_from_settings(settings)
    try:
        await _record(AuditLog(redis, settings), "fay", 23)
    finally:
        await redis.aclose()
    read: list[int] = []
    original = Redis.xrange

    async def counted(self: Redis, *args: Any, **kwargs: Any) -> Any:
        rows = await original(self, *args, **kwargs)
        read.append(len(rows))
        return rows

    # verify_stream opens its own client: count what any client reads.
    monkeypatch.setattr(Redis, "xrange", counted)
    verdict = await admin_cli.verify_stream(settings, [KEY.encode()], page=5)

    assert verdict.code is None and verdict.checked == 23, verdict.message
    assert read == [5, 5, 5, 5, 3]
