"""Faults on the real broker and Redis: a worker killed with SIGKILL after a
checkpoint, a Redis outage while checkpoints are due, and a batch rewound
while Redis is away (a private redis-server the tests stop and start)."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Settings
from gateway.models import digits_split
from gateway.store import CounterStore, redis_from_settings
from tests.conftest import StackInfo
from tests.integration.helpers import (
    RawKafka,
    create_key,
    fail_open_settings,
    isolated_settings,
    read_topic,
    responses_for,
    running_worker,
    start_worker_process,
)
from tests.integration.test_adversarial import OwnRedis, _free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

X_TEST = digits_split()[1]
DEADLINE_S = 30.0


async def _decisions(settings: Settings, ids: list[str]) -> dict[str, dict[str, Any]]:
    wanted = set(ids)
    records = await read_topic(
        settings,
        settings.kafka.topics.decisions,
        until=lambda r: wanted <= {x["request_id"] for x in r},
        timeout_s=DEADLINE_S,
    )
    return {r["request_id"]: r for r in records if r["request_id"] in wanted}


async def test_detector_history_survives_a_sigkill_after_a_checkpoint(
    stack: StackInfo, models_dir: Path, tmp_path: Path
) -> None:
    """A worker killed without a hand-over: its successor loads the client's
    last checkpoint, so the client's next query is judged on its history.
    A client's first query with no history scores 0 on every detector (they
    are warming up), which is what a lost history would look like."""
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        policy={"shadow": True},
        limits={"rate_per_s": 10_000, "burst": 10_000},
        worker={"checkpoint_interval_s": 0.2, "client_idle_s": 600},
    )
    kay = await create_key(settings, "kay")
    lee = await create_key(settings, "lee")
    redis = redis_from_settings(settings)
    store = CounterStore(redis, settings)
    first = start_worker_process(settings, tmp_path / "first.log")
    try:
        async with RawKafka(settings) as kafka:
            ids = [
                await kafka.send_request(*kay, X_TEST[i : i + 1], client_id="kay")
                for i in range(25)
            ]
            await kafka.flush()
            await responses_for(settings, ids, timeout_s=60)
            # The checkpoint runs after a batch once the interval is up: ask
            # again (as kay) until kay's state is in Redis.
            deadline = time.monotonic() + DEADLINE_S
            row = 25
            while not await store.load_states(["kay"]):
                assert time.monotonic() < deadline, "kay never checkpointed"
                rid = await kafka.send_request(
                    *kay, X_TEST[row : row + 1], client_id="kay"
                )
                await kafka.flush()
                await responses_for(settings, [rid])
                row += 1
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)

            async with running_worker(settings):
                after = await kafka.send_request(*kay, X_TEST[40:41], client_id="kay")
                fresh = await kafka.send_request(*lee, X_TEST[40:41], client_id="lee")
                await kafka.flush()
                decisions = await _decisions(settings, [after, fresh])
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=10)
        await redis.aclose()
    assert all(v == 0 for v in decisions[fresh]["scores"].values()), decisions[fresh]
    assert any(v > 0 for v in decisions[after]["scores"].values()), decisions[after]


@pytest.mark.timeout(150)
async def test_redis_outage_while_checkpoints_are_due(
    stack: StackInfo,
    models_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Fail mode ``open``: while Redis is down the worker answers without it
    and its checkpoints fail (logged, not raised); once Redis is back the
    clients of the failed checkpoint are saved at the next interval, although
    they sent nothing since (they used to be dropped from the to-save list,
    leaving only their pre-outage state for a successor)."""
    own = OwnRedis(tmp_path, _free_port(16498))
    own.start()
    settings = fail_open_settings(
        stack,
        own.url,
        models_dir,
        worker={"checkpoint_interval_s": 0.5, "client_idle_s": 600},
        redis={"socket_timeout_s": 0.5},
    )
    interval_s = settings.worker.checkpoint_interval_s
    ann = await create_key(settings, "ann")
    bob = await create_key(settings, "bob")
    caplog.set_level(logging.WARNING, logger="gateway.handover")

    async def ask(kafka: RawKafka, key: tuple[str, bytes], who: str, row: int) -> None:
        rid = await kafka.send_request(*key, X_TEST[row : row + 1], client_id=who)
        await kafka.flush()
        answer = (await responses_for(settings, [rid], timeout_s=DEADLINE_S))[rid]
        assert answer["status"] == "ok", answer.get("error")

    async def saved_state(who: str) -> bytes | None:
        redis = redis_from_settings(settings)
        try:
            return (await CounterStore(redis, settings).load_states([who])).get(who)
        finally:
            await redis.aclose()

    try:
        async with RawKafka(settings) as kafka, running_worker(settings) as worker:
            assert worker._clients is not None
            # Ann is held, with a checkpoint in Redis; persisted for the restart.
            deadline = time.monotonic() + DEADLINE_S
            row = 0
            while await saved_state("ann") is None:
                assert time.monotonic() < deadline, "ann never checkpointed"
                await ask(kafka, ann, "ann", row)
                row += 1
            before = await saved_state("ann")
            # Bob's key is cached too: an uncached key is refused while Redis
            # is away, whatever the fail mode.
            await ask(kafka, bob, "bob", row)
            redis = redis_from_settings(settings)
            try:
                await redis.save()
            finally:
                await redis.aclose()
            own.kill()

            # Outage: ann keeps being served; then, once a checkpoint is due,
            # a batch of bob's runs it, and it fails.
            for _ in range(3):
                await ask(kafka, ann, "ann", row)
                row += 1
            quiet_from = time.monotonic()
            while time.monotonic() - quiet_from < interval_s * 2:
                await ask(kafka, bob, "bob", row)
                row += 1
            assert any("not saved" in r.getMessage() for r in caplog.records)
            assert "ann" in worker._clients.held()

            # Back: ann stays silent; bob's batches carry the retry.
            own.start()
            deadline = time.monotonic() + DEADLINE_S
            while await saved_state("ann") == before:
                assert time.monotonic() < deadline, "ann's checkpoint never retried"
                await ask(kafka, bob, "bob", row)
                row += 1
    finally:
        own.kill()


async def test_a_batch_failed_on_redis_is_rewound_and_answered_once_it_returns(
    stack: StackInfo,
    models_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Fail mode ``retry`` (the default): while Redis is down a batch fails
    before anything is produced, is rewound to its first offset and retried
    with back-off; once Redis is back its request is answered, once. Without
    the rewind the consumer has already moved past the record, which is then
    never answered."""
    own = OwnRedis(tmp_path, _free_port(16497))
    own.start()
    settings = isolated_settings(
        stack.kafka_bootstrap,
        own.url,
        models_dir,
        policy={"shadow": True},
        limits={"rate_per_s": 10_000, "burst": 10_000},
        redis={"socket_timeout_s": 0.5},
    )
    ann = await create_key(settings, "ann")
    caplog.set_level(logging.WARNING, logger="gateway.group_service")
    try:
        async with RawKafka(settings) as kafka, running_worker(settings):
            first = await kafka.send_request(*ann, X_TEST[0:1], client_id="ann")
            await kafka.flush()
            answers = await responses_for(settings, [first], timeout_s=DEADLINE_S)
            assert answers[first]["status"] == "ok", answers[first].get("error")
            redis = redis_from_settings(settings)
            try:
                await redis.save()  # the key survives the restart below
            finally:
                await redis.aclose()
            own.kill()

            during = await kafka.send_request(*ann, X_TEST[1:2], client_id="ann")
            await kafka.flush()
            deadline = time.monotonic() + DEADLINE_S
            while not any(
                "batch not committed" in r.getMessage() for r in caplog.records
            ):
                assert time.monotonic() < deadline, "the batch never failed"
                await asyncio.sleep(0.05)

            own.start()
            answers = await responses_for(settings, [during], timeout_s=DEADLINE_S)
            assert answers[during]["status"] == "ok", answers[during].get("error")
            every = await read_topic(
                settings, settings.kafka.topics.responses, timeout_s=1.0
            )
            assert [r.get("request_id") for r in every].count(during) == 1
    finally:
        own.kill()
