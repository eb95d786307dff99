"""Limits end to end, through Kafka and a worker: plans answered with
RATE_LIMITED and QUOTA_EXCEEDED, and the fail modes ``open`` and ``closed``
while the worker's (private) Redis is down and after it is back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.models import digits_split
from gateway.store import redis_from_settings
from tests.conftest import StackInfo
from tests.integration.helpers import (
    RawKafka,
    create_key,
    isolated_settings,
    responses_for,
    running_worker,
)
from tests.integration.test_limits import PrivateRedis

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

X_TEST = digits_split()[1]


async def test_plans_answer_rate_limited_and_quota_exceeded(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        policy={"shadow": True},
        limits={
            "plans": {
                "tight": {"rules": [{"limit": 1, "window_s": 60, "burst": 3}]},
                "metered": {
                    "rules": [{"limit": 1000, "window_s": 1}],
                    "quota": {"daily": 2},
                    "in_flight": {"limit": 10},
                },
            }
        },
    )
    tight_id, tight_secret = await create_key(settings, "lim-tight", plan="tight")
    metered_id, metered_secret = await create_key(
        settings, "lim-metered", plan="metered"
    )
    async with RawKafka(settings) as kafka, running_worker(settings):
        tight = [
            await kafka.send_request(
                tight_id, tight_secret, X_TEST[i : i + 1], client_id="lim-tight"
            )
            for i in range(5)
        ]
        metered = [
            await kafka.send_request(
                metered_id, metered_secret, X_TEST[i : i + 1], client_id="lim-metered"
            )
            for i in range(5)
        ]
        await kafka.flush()
        answers = await responses_for(settings, [*tight, *metered])
        # Answered requests give their in-flight slots back (just after the
        # answers are produced, hence the poll).
        redis = redis_from_settings(settings)
        try:
            inflight = f"{settings.redis.key_prefix}:{{c:lim-metered}}:inflight"
            deadline = asyncio.get_running_loop().time() + 10
            while await redis.zcard(inflight):
                assert asyncio.get_running_loop().time() < deadline, "slots held"
                await asyncio.sleep(0.05)
        finally:
            await redis.aclose()

    def codes(ids: list[str]) -> list[str]:
        return [
            answers[i]["error"]["code"] if answers[i]["status"] == "error" else "ok"
            for i in ids
        ]

    assert codes(tight) == ["ok"] * 3 + ["RATE_LIMITED"] * 2, answers
    assert codes(metered) == ["ok"] * 2 + ["QUOTA_EXCEEDED"] * 3, answers
    for rid in tight[3:]:
        # One request per minute after the burst: the wait is up to 60 s.
        assert 0 < answers[rid]["retry_after_ms"] <= 60_000, answers[rid]
        assert answers[rid]["action"] == "throttle"
    for rid in metered[2:]:
        # Until midnight UTC.
        assert 0 < answers[rid]["retry_after_ms"] <= 86_400_000, answers[rid]
        assert answers[rid]["error"]["retriable"] is True


@pytest.mark.parametrize(("mode", "during"), [("open", "ok"), ("closed", "error")])
async def test_fail_modes_through_the_worker(
    stack: StackInfo, models_dir: Path, tmp_path: Path, mode: str, during: str
) -> None:
    redis = PrivateRedis(tmp_path)
    await redis.start()
    try:
        settings = isolated_settings(
            stack.kafka_bootstrap,
            redis.url,
            models_dir,
            policy={"shadow": True},
            limits={
                "fail_mode": mode,
                "plans": {"default": {"rules": [{"limit": 100, "window_s": 1}]}},
            },
        )
        # Short, so recovery below waits little for the Redis breaker.
        settings = settings.model_copy(
            update={
                "redis": settings.redis.model_copy(update={"breaker_cooldown_s": 0.2})
            }
        )
        key_id, secret = await create_key(settings, "lim-fail")
        async with RawKafka(settings) as kafka, running_worker(settings) as worker:

            async def ask(i: int) -> dict[str, object]:
                rid = await kafka.send_request(
                    key_id, secret, X_TEST[i : i + 1], client_id="lim-fail"
                )
                await kafka.flush()
                return (await responses_for(settings, [rid]))[rid]

            before = await ask(0)  # also puts the key in the worker's cache
            assert before["status"] == "ok", before

            redis.stop()
            answer = await ask(1)
            assert answer["status"] == during, answer
            if during == "error":
                error = answer["error"]
                assert isinstance(error, dict)
                assert error["code"] == "STORE_UNAVAILABLE" and error["retriable"]
            counted = worker.metrics.registry.get_sample_value(
                "modelgate_decisions_without_store_total", {"mode": mode}
            )
            assert counted == 1

            await redis.start()
            # This private Redis keeps nothing on disk, so it comes back empty:
            # the key must exist again, or a key-cache miss (after its 1 s TTL
            # on a loaded machine) would answer AUTH_UNKNOWN_KEY.
            key_id, secret = await create_key(settings, "lim-fail")
            # The outage opened the worker's Redis breaker: requests are
            # answered as during the outage until, after its cool-down, one
            # probes and closes it.
            deadline = asyncio.get_running_loop().time() + 20
            after = await ask(2)
            while after["status"] != "ok":
                assert asyncio.get_running_loop().time() < deadline, after
                after = await ask(2)
    finally:
        redis.stop()


async def test_requests_queued_while_no_worker_ran_are_judged_as_sent(
    stack: StackInfo, models_dir: Path
) -> None:
    """A worker that starts on a backlog judges each request's rate when
    the broker took it: a key that kept within its plan while no worker ran
    is answered in full, and a key that sent a burst is still refused past
    its burst. Judged when the worker got to them, both were one burst."""
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        policy={"shadow": True},
        limits={
            "plans": {"paced": {"rules": [{"limit": 5, "window_s": 1, "burst": 2}]}}
        },
    )
    paced_id, paced_secret = await create_key(settings, "lim-paced", plan="paced")
    burst_id, burst_secret = await create_key(settings, "lim-burst", plan="paced")
    async with RawKafka(settings) as kafka:
        bursting = [
            await kafka.send_request(
                burst_id, burst_secret, X_TEST[i : i + 1], client_id="lim-burst"
            )
            for i in range(12)
        ]
        paced = []
        for i in range(12):
            # 4 a second, within the plan's 5: what an honest client sends.
            paced.append(
                await kafka.send_request(
                    paced_id, paced_secret, X_TEST[i : i + 1], client_id="lim-paced"
                )
            )
            await kafka.flush()
            await asyncio.sleep(0.25)
        async with running_worker(settings):
            answers = await responses_for(settings, [*bursting, *paced])

    def codes(ids: list[str]) -> list[str]:
        return [
            answers[i]["error"]["code"] if answers[i]["status"] == "error" else "ok"
            for i in ids
        ]

    assert codes(paced) == ["ok"] * 12, answers
    assert codes(bursting) == ["ok"] * 2 + ["RATE_LIMITED"] * 10, answers
