"""Enforcement that survives the loss of the policy's memory, and release
applied before scoring: real Kafka, real Redis, real workers.

Under hidden suspicion a block is served late and coarse and sets no Redis
block key. Its own record (``{c:<id>}:hidden``) comes back with every
admission decision, so a client whose policy part is refused or whose
snapshot is deleted is still served degraded until the cool-down ends; a
release lifts it, and the release reaches the owning worker with the
admission reply, before the batch is scored, so the very next request is
answered from a clean slate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from gateway.clientview import ClientView
from gateway.config import Settings
from gateway.models import digits_split
from gateway.store import CounterStore, redis_from_settings
from tests.conftest import StackInfo
from tests.integration.helpers import (
    RawKafka,
    create_key,
    isolated_settings,
    read_topic,
    running_worker,
)
from tests.integration.test_ladder import DETECTORS, NOISE, Answers, Client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

X_TEST = digits_split()[1]
BLOCK = [{"action": "block", "risk_at": 1.0}]


def _settings(stack: StackInfo, models_dir: Path, **policy: Any) -> Settings:
    return isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        requests_partitions=1,
        policy={"rules": BLOCK, "block_cooldown_s": 600, **policy},
        detectors=DETECTORS,
        limits={"rate_per_s": 10_000, "burst": 10_000},
    )


def _label_only(answer: dict[str, Any]) -> bool:
    """Whether the answer's probabilities are one-hot (``hide_degrade``
    ``label``); an honest digit's full answer never is."""
    assert answer["status"] == "ok", answer
    (tensor,) = [t for t in answer["outputs"] if t["name"] == "probabilities"]
    return set(np.asarray(tensor["data"]).ravel().tolist()) <= {0.0, 1.0}


async def _decisions(settings: Settings, *answers: dict[str, Any]) -> list[Any]:
    wanted = [a["request_id"] for a in answers]
    records = await read_topic(
        settings,
        settings.kafka.topics.decisions,
        until=lambda r: set(wanted) <= {x["request_id"] for x in r},
        timeout_s=30.0,
    )
    by_id = {r["request_id"]: r for r in records}
    return [by_id[rid] for rid in wanted]


async def test_a_hidden_block_outlives_the_policy_part_and_release_lifts_it(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = _settings(
        stack,
        models_dir,
        hide_suspicion=True,
        hide_delay_s=0.2,
        hide_degrade="label",
    )
    key = await create_key(settings, "eve")
    redis = redis_from_settings(settings)
    store = CounterStore(redis, settings)
    hidden_key = store.client_key("eve", "hidden")
    answers = Answers(settings)
    try:
        async with RawKafka(settings) as kafka:
            await answers.start()
            eve = Client(kafka, answers, "eve", key)

            # 1. Blocked, hidden: answered label only, no block key, a record
            # for the whole cool-down.
            async with running_worker(settings):
                first = await eve.ask(NOISE[:1])
            assert _label_only(first)
            assert not await store.is_blocked("eve")
            assert await redis.get(hidden_key) == b"block"
            assert 590_000 < await redis.pttl(hidden_key) <= 600_000

            # 2. Her policy part is corrupted to values no release writes
            # (refused), and ood's part too, so that nothing she sent is
            # remembered: without the record she would be a new client.
            (blob,) = (await store.load_states(["eve"])).values()
            parts = msgspec.msgpack.decode(blob, type=dict[str, dict[str, bytes]])
            policy = msgspec.msgpack.decode(parts["_policy"]["state"])
            policy["live"]["blocked_until_s"] = 3e9
            parts["_policy"]["state"] = msgspec.msgpack.encode(policy)
            parts["digits"]["ood"] = b"\x00corrupt"
            await store.save_states({"eve": msgspec.msgpack.encode(parts)}, 3600)
            async with running_worker(settings) as second:
                refused_part = await eve.ask(X_TEST[:1])
                refused = second.metrics.registry.get_sample_value(
                    "modelgate_state_parts_refused_total", {"detector": "policy"}
                )
            assert refused == 1.0
            assert _label_only(refused_part), refused_part

            # 3. Her snapshot is deleted (as after a hand-over before any
            # save): still served label only, never refused.
            await redis.delete(store.client_key("eve", "state"))
            async with running_worker(settings):
                deleted = await eve.ask(X_TEST[1:2])
                assert _label_only(deleted), deleted

                # 4. Released: the record goes, and her very next request is
                # answered in full.
                assert await ClientView(redis, settings).release("eve", "tester")
                assert not await redis.exists(hidden_key)
                released = await eve.ask(X_TEST[2:3])
                again = await eve.ask(X_TEST[3:4])
            assert not _label_only(released), released
            assert not _label_only(again), again
            assert not await redis.exists(hidden_key)
    finally:
        await answers.stop()
        await redis.aclose()

    truths = await _decisions(settings, refused_part, deleted, released)
    for truth in truths[:2]:
        assert truth["would_be_action"] == "block", json.dumps(truth)
        assert truth["enforced_action"] == "degrade" and truth["hidden"], truth
        assert any("cool-down" in r for r in truth["reasons"]), truth
    assert truths[2]["enforced_action"] == "allow", truths[2]
    assert not truths[2].get("hidden"), truths[2]


async def test_the_first_request_after_a_release_is_answered(
    stack: StackInfo, models_dir: Path
) -> None:
    """A visible block: the owning worker applies the release before it
    scores the next batch, so that batch is not judged (and refused) with
    the state the operator vouched away."""
    settings = _settings(stack, models_dir)
    key = await create_key(settings, "mallory")
    redis = redis_from_settings(settings)
    store = CounterStore(redis, settings)
    answers = Answers(settings)
    try:
        async with RawKafka(settings) as kafka:
            await answers.start()
            mallory = Client(kafka, answers, "mallory", key)
            async with running_worker(settings) as worker:
                blocked = await mallory.ask(NOISE[:1])
                assert blocked["status"] == "error", blocked
                assert blocked["error"]["code"] == "BLOCKED", blocked
                assert await ClientView(redis, settings).release("mallory", "tester")
                after = [await mallory.ask(X_TEST[i : i + 1]) for i in range(3)]
                assert worker._scorer is not None
                assert worker._scorer.policy.good_standing("mallory")
            marker = await redis.exists(store.client_key("mallory", "released"))
    finally:
        await answers.stop()
        await redis.aclose()
    assert [a["status"] for a in after] == ["ok"] * 3, after
    assert not marker, "the worker left the release marker behind"


async def test_shadow_records_no_hidden_block(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = _settings(
        stack, models_dir, hide_suspicion=True, hide_degrade="label", shadow=True
    )
    key = await create_key(settings, "sam")
    redis = redis_from_settings(settings)
    store = CounterStore(redis, settings)
    answers = Answers(settings)
    try:
        async with RawKafka(settings) as kafka:
            await answers.start()
            sam = Client(kafka, answers, "sam", key)
            async with running_worker(settings):
                first = await sam.ask(NOISE[:1])
                second = await sam.ask(NOISE[1:2])
            hidden = await redis.exists(store.client_key("sam", "hidden"))
            blocked = await store.is_blocked("sam")
    finally:
        await answers.stop()
        await redis.aclose()
    assert first["status"] == second["status"] == "ok"
    (truth, _) = await _decisions(settings, first, second)
    assert truth["would_be_action"] == "block" and truth["shadow"], truth
    assert not hidden and not blocked
