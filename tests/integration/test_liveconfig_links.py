"""Live link parameters on the real broker, Redis and a running worker.

Key ``a`` sends digits, key ``b`` near copies of them (one pixel changed), so
every query of ``b`` is a fingerprint report against ``a``. The settings file
links a pair at 3 reports. Raised live to 1000 through the admin config
router before any traffic, six reports leave ``b`` alone; lowered to 5 with
``modelgate config set``, the worker (never restarted) links the pair at
``b``'s next query, because the six reports it counted meanwhile were kept.
A restart-only field is refused by both and publishes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from typer.testing import CliRunner

from evaluation.process import settings_env
from gateway.admin_config import make_config_router
from gateway.cli import app
from gateway.client import GatewayClient, KafkaTransport, error_of
from gateway.config import Settings
from gateway.liveconfig.service import ConfigService
from gateway.models import digits_split
from gateway.protocol import new_request_id
from tests.conftest import StackInfo
from tests.integration.helpers import (
    clients_of,
    create_key,
    delete_prefix,
    isolated_settings,
    read_topic,
    running_worker,
    wait_for_acks,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

X_TEST = digits_split()[1]


@pytest.fixture
def settings(stack: StackInfo, models_dir: Path) -> Settings:
    # Shadow policy and high limits: only links may change what is recorded.
    # Region links out of reach, so every link here is a fingerprint link;
    # every row goes to the shared store (a's rows have no near copy yet when
    # they come, so the default sample could leave them out).
    return isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        policy={"shadow": True},
        limits={"rate_per_s": 10_000, "burst": 10_000},
        cross_client={
            "link_min_shared": 3,
            "region_min_shared": 1_000_000,
            "store_sample_every": 1,
        },
    )


@pytest.fixture
async def admin(
    settings: Settings,
) -> AsyncIterator[tuple[ConfigService, httpx.AsyncClient]]:
    async with ConfigService(settings) as service:
        router = make_config_router(lambda: service, lambda: "test:olga")
        api = FastAPI()
        api.include_router(router)
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://admin.test"
        ) as client:
            yield service, client


async def _send(client: GatewayClient, row: np.ndarray) -> None:
    response = await client.infer(
        row[None, :], request_id=new_request_id(), timeout_s=30
    )
    assert error_of(response) is None, response


async def _ran(service: ConfigService, worker_id: str, version: int) -> None:
    await wait_for_acks(
        service,
        lambda acks: worker_id in acks and acks[worker_id].version == version,
        timeout_s=10,
        interval_s=0.02,
    )


async def _config_cli(settings: Settings, *args: str) -> tuple[int, str]:
    def run() -> tuple[int, str]:
        result = CliRunner().invoke(app, ["config", *args], env=settings_env(settings))
        return result.exit_code, result.stdout + result.stderr

    return await asyncio.to_thread(run)


async def test_link_threshold_changes_on_a_running_worker(
    settings: Settings, admin: tuple[ConfigService, httpx.AsyncClient]
) -> None:
    service, api = admin
    rows = X_TEST[:7].astype(np.float32)
    near = rows.copy()
    near[:, 10] = np.where(near[:, 10] < 8, near[:, 10] + 1, near[:, 10] - 1)
    # b's seventh query: another near copy of a's first row.
    near[6] = near[0]
    near[6, 20] = 1.0 if near[6, 20] > 8 else 15.0
    keys = {c: await create_key(settings, c) for c in ("a", "b")}
    worker_id = settings.worker.worker_id
    try:
        async with (
            running_worker(settings) as worker,
            KafkaTransport(settings) as transport,
        ):
            client = clients_of(transport, keys)

            # Raised through the admin API before any traffic.
            raised = await api.patch(
                "/config", json={"changes": {"links.link_min_shared": 1000}}
            )
            assert raised.status_code == 200, raised.text
            record = raised.json()["record"]
            assert record["changes"] == [
                {"field": "links.link_min_shared", "old": 3, "new": 1000}
            ]
            await _ran(service, worker_id, record["version"])
            refused = await api.patch(
                "/config", json={"changes": {"links.region_components": 2}}
            )
            assert refused.status_code == 422, refused.text
            assert "cannot change while running" in refused.json()["error"]

            for row in rows[:6]:
                await _send(client("a"), row)
            for row in near[:6]:
                await _send(client("b"), row)
            assert worker._cross is not None
            assert worker._cross.links.links() == [], worker._cross.links._counts

            # Lowered with the CLI: 5 reports link, b had 6 counted already,
            # so its next near copy links the pair.
            code, out = await _config_cli(settings, "set", "links.link_min_shared=5")
            assert code == 0, out
            version = record["version"] + 1
            assert f"published version {version}" in out, out
            await _ran(service, worker_id, version)
            code, out = await _config_cli(settings, "get", "links.link_min_shared")
            assert code == 0 and "5" in out, out
            code, out = await _config_cli(settings, "diff")
            assert code == 0 and "links.link_min_shared" in out, out
            assert "1000" in out and "5" in out, out
            await _send(client("b"), near[6])
            assert worker._cross.links._counts == {}
            assert worker._cross.links.links() == [("a", "b")]
            # One more query of a: its record carries the group too.
            await _send(client("a"), rows[6])

        decisions = await read_topic(
            settings,
            settings.kafka.topics.decisions,
            until=lambda records: len(records) >= 14,
            timeout_s=60,
        )
    finally:
        await delete_prefix(settings)

    by_client: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
    for entry in decisions:
        by_client[entry["client_id"]].append(entry)
    assert [len(by_client[c]) for c in "ab"] == [7, 7]
    # Unlinked while the threshold was raised, linked after it was lowered.
    assert [r.get("group_id") for r in by_client["b"]] == ["b"] * 6 + ["a"]
    # a's group id is a itself either way (a group's id is its smallest key).
    assert [r.get("group_id") for r in by_client["a"]] == ["a"] * 7


async def test_worker_started_without_region_links_refuses_turning_them_on(
    stack: StackInfo, models_dir: Path
) -> None:
    # No region map was fitted, so the version that turns region links on is
    # refused whole: its policy change is not applied either.
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        cross_client={"region_enabled": False},
    )
    worker_id = settings.worker.worker_id
    try:
        async with (
            ConfigService(settings) as service,
            running_worker(settings) as worker,
        ):
            ok = await service.set({"links.link_min_shared": 4}, "test")
            assert ok is not None
            await _ran(service, worker_id, ok.version)
            assert worker._cross is not None
            assert worker._cross.links.min_shared == 4

            bad = await service.set(
                {"links.region_enabled": True, "policy.flag_at": 1.4}, "test"
            )
            assert bad is not None
            acks = await wait_for_acks(
                service,
                lambda a: worker_id in a and a[worker_id].refused_version is not None,
                timeout_s=10,
                interval_s=0.02,
            )
            ack = acks[worker_id]
            assert ack.refused_version == bad.version and ack.version == ok.version
            assert "region_enabled" in (ack.refused_reason or ""), ack
            assert worker._scorer is not None
            assert worker._scorer.policy.config.flag_at != 1.4
            assert worker.settings.policy.flag_at != 1.4
            assert worker._cross.config.region_enabled is False
            assert worker._cross.links.min_shared == 4
    finally:
        await delete_prefix(settings)
