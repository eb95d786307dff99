"""Client state between hand-overs, on the real broker and Redis: a running
worker checkpoints the clients it served, and saves then drops clients that
fell silent, loading them again when they return."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.config import Settings
from gateway.models import digits_split
from gateway.store import CounterStore, redis_from_settings
from tests.conftest import StackInfo
from tests.integration.helpers import (
    RawKafka,
    create_key,
    request_path_settings,
    responses_for,
    running_worker,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

X_TEST = digits_split()[1]
DEADLINE_S = 20.0


def _settings(stack: StackInfo, models_dir: Path) -> Settings:
    return request_path_settings(
        stack,
        models_dir,
        worker={"checkpoint_interval_s": 0.2, "client_idle_s": 1.5},
    )


async def _ask(
    kafka: RawKafka, settings: Settings, who: str, key: tuple[str, bytes], row: int
) -> None:
    rid = await kafka.send_request(key[0], key[1], X_TEST[row : row + 1], client_id=who)
    await kafka.flush()
    answer = (await responses_for(settings, [rid]))[rid]
    assert answer["status"] == "ok", answer


async def test_running_worker_checkpoints_then_drops_idle_clients(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = _settings(stack, models_dir)
    dora = await create_key(settings, "dora")
    eve = await create_key(settings, "eve")
    redis = redis_from_settings(settings)
    store = CounterStore(redis, settings)
    try:
        async with RawKafka(settings) as kafka, running_worker(settings) as worker:
            assert worker._clients is not None
            # Checkpoint: dora's state reaches Redis while the worker runs and
            # still holds her.
            deadline = time.monotonic() + DEADLINE_S
            row = 0
            while not await store.load_states(["dora"]):
                assert time.monotonic() < deadline, "no checkpoint of dora"
                await _ask(kafka, settings, "dora", dora, row)
                row += 1
            assert "dora" in worker._clients.held()
            saved = (await store.load_states(["dora"]))["dora"]
            assert len(saved) > 0

            # Idle: eve keeps the worker busy; dora, silent, is dropped.
            deadline = time.monotonic() + DEADLINE_S
            while "dora" in worker._clients.held():
                assert time.monotonic() < deadline, "dora never dropped"
                await _ask(kafka, settings, "eve", eve, row)
                row += 1
                await asyncio.sleep(0.1)
            assert "eve" in worker._clients.held()
            assert "dora" in await store.load_states(["dora"])

            # Back: dora is served and held again, from her saved state.
            await _ask(kafka, settings, "dora", dora, row)
            assert "dora" in worker._clients.held()
    finally:
        await redis.aclose()
