"""Live configuration on the real broker and Redis: the CLI publishes, worker
processes apply within a second and acknowledge, refusals leave the running
version alone, rollback and late starters work, and the admin router."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from fastapi import FastAPI
from typer.testing import CliRunner

from gateway.admin_config import make_config_router
from gateway.cli import app
from gateway.config import Settings
from gateway.liveconfig.document import ConfigConflict, ConfigRecord, record_key
from gateway.liveconfig.service import ConfigService, WorkerAck
from gateway.models import digits_split
from tests.integration.helpers import (
    REPO,
    RawKafka,
    answer_codes,
    create_key,
    running_worker,
    settings_env,
    start_worker_process,
    wait_for_acks,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

X_TEST = digits_split()[1]
APPLY_BUDGET_MS = 1000


class _Done:
    """What a CLI run left: exit code and both streams."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    def __repr__(self) -> str:
        return f"exit {self.returncode}\n{self.stdout}\n{self.stderr}"


async def _cli_here(settings: Settings, *args: str) -> _Done:
    """``modelgate config ARGS`` through typer's runner, in a thread of this
    process (a subprocess per call would cost seconds of imports each)."""

    def run() -> _Done:
        result = CliRunner().invoke(app, ["config", *args], env=settings_env(settings))
        return _Done(result.exit_code, result.stdout, result.stderr)

    return await asyncio.to_thread(run)


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``modelgate config ARGS`` as an operator runs it: its own process."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "config", *args],
        env=settings_env(settings),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def _acks(
    service: ConfigService,
    done: Callable[[dict[str, WorkerAck]], bool],
    timeout_s: float,
) -> dict[str, WorkerAck]:
    """Poll the acknowledgements until ``done`` or the deadline."""
    return await wait_for_acks(service, done, timeout_s, interval_s=0.02)


async def _rate_limited(
    kafka: RawKafka, settings: Settings, client_id: str, n: int = 4
) -> list[str]:
    key = await create_key(settings, client_id)
    return await answer_codes(kafka, settings, key, client_id, X_TEST[:n])


async def test_cli_change_reaches_two_workers_within_a_second(
    settings: Settings, kafka: RawKafka, tmp_path: Path
) -> None:
    procs = [start_worker_process(settings, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        async with ConfigService(settings) as service:
            acks = await _acks(service, lambda a: len(a) == 2, timeout_s=120)
            workers = set(acks)
            assert {a.version for a in acks.values()} == {0}, acks
            # The settings fixture's limits never throttle.
            assert await _rate_limited(kafka, settings, "before") == ["ok"] * 4

            # A change through the CLI: both workers run it within a second.
            done = await asyncio.to_thread(
                _cli, settings, "set", "limits.burst=1", "limits.rate_per_s=0.01"
            )
            assert done.returncode == 0, done.stderr
            assert "published version 2" in done.stdout, done.stdout
            acks = await _acks(
                service,
                lambda a: all(a[w].version == 2 for w in workers),
                timeout_s=5,
            )
            published = await service.record(2)
            latency_ms = max(a.applied_at_ms for a in acks.values()) - published.at_ms
            print(f"publish to both acks: {latency_ms} ms")
            assert latency_ms <= APPLY_BUDGET_MS, acks
            assert published.author.startswith("cli:")
            assert [c.field for c in published.changes] == [
                "limits.burst",
                "limits.rate_per_s",
            ]
            codes = await _rate_limited(kafka, settings, "after")
            assert codes[0] == "ok" and "RATE_LIMITED" in codes[1:], codes

            # A refused value names the field; nothing is published and the
            # workers stay on version 2.
            refused = await _cli_here(settings, "set", "limits.burst=0")
            assert refused.returncode == 2, refused
            assert "limits.burst" in refused.stderr, refused.stderr
            assert "CONFIG_INVALID" in refused.stderr, refused.stderr
            assert (await service.current())[0] == 2
            acks = {a.worker_id: a for a in await service.status()}
            assert all(acks[w].version == 2 for w in workers), acks

            # A change based on a stale version is refused, not lost.
            stale = await _cli_here(settings, "set", "--parent", "1", "limits.burst=7")
            assert stale.returncode == 2 and "CONFIG_CONFLICT" in stale.stderr, stale
            assert (await service.get("limits.burst")) == 1

            # Rollback publishes version 1's document as version 3.
            back = await _cli_here(settings, "rollback", "1")
            assert back.returncode == 0, back.stderr
            v1, v3 = await service.record(1), await service.record(3)
            assert v3.document == v1.document and v3.kind == "rollback"
            await _acks(service, lambda a: all(a[w].version == 3 for w in workers), 5)
            assert await _rate_limited(kafka, settings, "rolled-back") == ["ok"] * 4

            status = await _cli_here(settings, "status")
            assert status.returncode == 0, status.stderr
            assert "current version 3" in status.stdout, status.stdout
            for worker_id in workers:
                assert f"{worker_id}  v3" in status.stdout, status.stdout
            history = await _cli_here(settings, "history")
            assert [
                line.split()[0]
                for line in history.stdout.splitlines()
                if line.startswith("v")
            ] == ["v1", "v2", "v3"], history.stdout
            as_json = await _cli_here(settings, "history", "--json")
            assert [r["version"] for r in json.loads(as_json.stdout)] == [1, 2, 3]
            # Version 1 is summed up, not listed field by field from null.
            assert "null ->" not in history.stdout, history.stdout
            assert "  the whole document, " in history.stdout, history.stdout
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)


async def test_history_before_the_first_change_says_there_is_none(
    settings: Settings,
) -> None:
    history = await _cli_here(settings, "history")
    assert history.returncode == 0, history
    assert "no change published yet" in history.stdout, history.stdout
    assert "version 0" in history.stdout, history.stdout
    # Under --json, stdout stays JSON: an empty list (it was empty).
    as_json = await _cli_here(settings, "history", "--json")
    assert as_json.returncode == 0, as_json
    assert json.loads(as_json.stdout) == [], as_json.stdout
    assert "no change published yet" in as_json.stderr, as_json.stderr


async def test_late_worker_starts_on_latest_and_refuses_a_bad_record(
    settings: Settings,
) -> None:
    async with ConfigService(settings) as service:
        await service.set({"policy.flag_at": 1.2, "policy.block_at": 2.5}, "test")
        await service.set({"limits.burst": 42}, "test")
        await service.set({"detectors.similarity.eps": 0.04}, "test")
        await service.set({"detector_shadow.ood": True}, "test")
        latest, document = await service.current()
        assert latest == 5

        async with running_worker(settings) as worker:
            assert worker.config_version == latest
            assert worker.settings.limits.burst == 42
            assert worker._scorer is not None
            assert worker._scorer.policy.config.flag_at == 1.2
            assert worker._scorer.policy.config.shadow_detectors == ["ood"]
            similarity = worker._scorer._detectors["digits"]["similarity"]
            assert similarity.params.eps == 0.04
            worker_id = settings.worker.worker_id
            await _acks(service, lambda a: a[worker_id].version == latest, 5)

            # A record that is not a valid document reaches the worker anyway.
            bad = json.loads(
                ConfigRecord(
                    version=latest + 1,
                    parent=latest,
                    author="intruder",
                    at_ms=int(time.time() * 1000),
                    kind="set",
                    document=document,
                ).encode()
            )
            bad["document"]["policy"]["flag_at"] = -1
            producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap)
            await producer.start()
            try:
                await producer.send_and_wait(
                    settings.live.topic,
                    json.dumps(bad).encode(),
                    key=record_key(latest + 1),
                    partition=0,
                )
            finally:
                await producer.stop()
            acks = await _acks(
                service,
                lambda a: a[worker_id].refused_version == latest + 1,
                timeout_s=5,
            )
            assert acks[worker_id].version == latest
            assert "policy.flag_at" in (acks[worker_id].refused_reason or "")
            assert worker.config_version == latest
            assert worker._scorer.policy.config.flag_at == 1.2

            # The publisher skips the unreadable record; the next valid
            # version is applied as usual.
            record = await service.set({"limits.burst": 43}, "test")
            assert record is not None and record.version == latest + 1
            await _acks(service, lambda a: a[worker_id].version == latest + 1, 5)
            assert worker.settings.limits.burst == 43


async def test_concurrent_changes_on_one_parent_one_wins(settings: Settings) -> None:
    async with ConfigService(settings) as a, ConfigService(settings) as b:
        await a.set({"limits.burst": 10}, "test:a")
        results = await asyncio.gather(
            a.set({"limits.burst": 11}, "test:a", parent=2),
            b.set({"policy.flag_at": 1.3}, "test:b", parent=2),
            return_exceptions=True,
        )
        published = [r for r in results if isinstance(r, ConfigRecord)]
        refused = [r for r in results if isinstance(r, ConfigConflict)]
        assert len(published) == 1 and len(refused) == 1, results
        assert published[0].version == 3 and published[0].parent == 2
        assert [r.version for r in await b.history()] == [1, 2, 3]


@pytest.fixture
async def admin(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with ConfigService(settings) as service:

        def the_service() -> ConfigService:
            return service

        def the_actor() -> str:
            return "test:alice"

        app = FastAPI()
        app.include_router(make_config_router(the_service, the_actor))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://admin.test"
        ) as client:
            yield client


async def test_admin_router(admin: httpx.AsyncClient) -> None:
    current = await admin.get("/config")
    assert current.status_code == 200, current.text
    assert current.json()["version"] == 0

    bad = await admin.patch("/config", json={"changes": {"policy.flag_at": 0}})
    assert bad.status_code == 422, bad.text
    assert bad.json()["code"] == "CONFIG_INVALID"
    assert "policy.flag_at" in bad.json()["error"], bad.text

    ok = await admin.patch(
        "/config", json={"changes": {"policy.flag_at": 1.1}, "parent_version": 0}
    )
    assert ok.status_code == 200, ok.text
    record = ok.json()["record"]
    assert record["version"] == 2 and record["author"] == "test:alice", record
    assert record["changes"] == [{"field": "policy.flag_at", "old": 1.0, "new": 1.1}]

    stale = await admin.patch(
        "/config", json={"changes": {"policy.flag_at": 1.2}, "parent_version": 1}
    )
    assert stale.status_code == 409, stale.text
    assert stale.json()["code"] == "CONFIG_CONFLICT"

    field = await admin.get("/config/fields/policy.flag_at")
    assert field.json() == {"version": 2, "key": "policy.flag_at", "value": 1.1}
    missing = await admin.get("/config/fields/policy.nope")
    assert missing.status_code == 404, missing.text

    preview = await admin.post("/config/diff", json={"version": 1})
    assert preview.json() == [{"field": "policy.flag_at", "old": 1.1, "new": 1.0}]

    back = await admin.post("/config/rollback", json={"version": 1})
    assert back.status_code == 200 and back.json()["record"]["version"] == 3
    unknown = await admin.post("/config/rollback", json={"version": 99})
    assert unknown.status_code == 404, unknown.text

    history = await admin.get("/config/history")
    assert [r["version"] for r in history.json()] == [1, 2, 3]
    assert [r["kind"] for r in history.json()] == ["initial", "set", "rollback"]

    whole = (await admin.get("/config")).json()["document"]
    whole["limits"]["burst"] = 9
    applied = await admin.put("/config", json={"document": whole})
    assert applied.status_code == 200 and applied.json()["record"]["version"] == 4
    same = await admin.put("/config", json={"document": whole})
    assert same.json() == {"published": False, "record": None}

    status = await admin.get("/config/status")
    assert status.json() == {"version": 4, "workers": []}

    schema = (await admin.get("/openapi.json")).json()
    assert {"/config", "/config/history", "/config/rollback", "/config/status"} <= set(
        schema["paths"]
    )
