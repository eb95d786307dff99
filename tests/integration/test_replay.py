"""Retries of served requests on the real broker, Redis and an in-process
worker: the same signed request id with the same body gets the first answer
again, uncounted and unscored; another body under that id is refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gateway.config import Settings
from gateway.models import digits_split
from gateway.store import CounterStore, redis_from_settings
from tests.integration.helpers import (
    RawKafka,
    create_key,
    read_topic,
    responses_for,
    running_worker,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

X_TEST = digits_split()[1]


async def _answers(settings: Settings, request_id: str, n: int) -> list[dict[str, Any]]:
    records = await read_topic(
        settings,
        settings.kafka.topics.responses,
        until=lambda r: sum(x["request_id"] == request_id for x in r) >= n,
    )
    mine = [r for r in records if r["request_id"] == request_id]
    assert len(mine) >= n, mine
    return mine


async def _decisions(settings: Settings, request_id: str, n: int) -> list[Any]:
    records = await read_topic(
        settings,
        settings.kafka.topics.decisions,
        until=lambda r: sum(x["request_id"] == request_id for x in r) >= n,
    )
    return [r for r in records if r["request_id"] == request_id]


async def _counters(settings: Settings, client_id: str) -> tuple[dict[str, int], Any]:
    redis = redis_from_settings(settings)
    try:
        store = CounterStore(redis, settings)
        tat = await redis.get(store.client_key(client_id, "tat"))
        return await store.client_counters(client_id), tat
    finally:
        await redis.aclose()


async def test_a_retry_of_a_served_request_gets_the_kept_answer(
    settings: Settings, kafka: RawKafka
) -> None:
    key_id, secret = await create_key(settings, "retrier")
    rows = X_TEST[:2]
    async with running_worker(settings) as worker:
        # First attempt, served and counted.
        request_id = await kafka.send_request(key_id, secret, rows, client_id="retrier")
        await kafka.flush()
        first = (await responses_for(settings, [request_id]))[request_id]
        assert first["status"] == "ok", first
        counters, tat = await _counters(settings, "retrier")
        assert counters["requests"] == 1 and counters["refused"] == 0, counters

        # The retry is a new record with its own timestamp and signature.
        await kafka.send_request(
            key_id, secret, rows, client_id="retrier", request_id=request_id
        )
        await kafka.flush()
        answers = await _answers(settings, request_id, 2)
        assert worker.metrics.replays._value.get() == 1

        # Counters and the rate limiter's state did not move.
        assert await _counters(settings, "retrier") == (counters, tat)

        # Another body under the same id is still a duplicate.
        await kafka.send_request(
            key_id, secret, X_TEST[5:6], client_id="retrier", request_id=request_id
        )
        await kafka.flush()
        answers = await _answers(settings, request_id, 3)
        decisions = await _decisions(settings, request_id, 3)

    second, third = answers[1], answers[2]
    assert second["status"] == "ok" and second["replayed"] is True, second
    assert second["outputs"] == first["outputs"]
    assert second["action"] == first["action"]
    assert "replayed" not in first
    proba = np.asarray(second["outputs"][0]["data"]).reshape(
        second["outputs"][0]["shape"]
    )
    assert proba.shape == (2, 10)

    assert third["status"] == "error", third
    assert third["error"]["code"] == "DUPLICATE_REQUEST", third

    # The first answer was scored by the detectors; the replay was not.
    assert decisions[0]["scores"], decisions[0]
    assert not decisions[1].get("scores"), decisions[1]
    assert decisions[1]["reasons"] == ["replayed"], decisions[1]


async def test_a_retry_of_a_refused_request_is_served_afresh(
    settings: Settings, kafka: RawKafka
) -> None:
    # A request that was refused (here: unknown model) kept no answer, so its
    # retry is handled like any new request and gets the same refusal.
    key_id, secret = await create_key(settings, "refused")
    async with running_worker(settings) as worker:
        request_id = await kafka.send_request(
            key_id, secret, X_TEST[:1], client_id="refused", model="nosuch"
        )
        await kafka.flush()
        await _answers(settings, request_id, 1)
        await kafka.send_request(
            key_id,
            secret,
            X_TEST[:1],
            client_id="refused",
            model="nosuch",
            request_id=request_id,
        )
        await kafka.flush()
        answers = await _answers(settings, request_id, 2)
        assert worker.metrics.replays._value.get() == 0
    assert [a["error"]["code"] for a in answers] == ["UNKNOWN_MODEL"] * 2, answers
