"""A blocked client's snapshot with one detector part corrupted in Redis,
handed to the next worker: real Kafka, real Redis, real workers.

Under hidden suspicion a block is served late and coarse instead of refused,
so no Redis block key stands in for it: the policy's part of its snapshot
holds it, and so does its hidden record in Redis (what happens when the
policy's part is lost is in tests/integration/test_hidden_record.py). Before
snapshots were restored part by part, the one corrupt detector part made the
next worker forget the whole client, and a blocked thief came back in good
standing.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import numpy as np
import pytest

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

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

X_TEST = digits_split()[1]


async def test_a_blocked_client_stays_blocked_when_one_detector_part_is_corrupt(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        requests_partitions=1,
        policy={
            "rules": [{"action": "block", "risk_at": 1.0}],
            "block_cooldown_s": 600,
            "hide_suspicion": True,
            "hide_degrade": "label",
        },
        detectors=DETECTORS,
        limits={"rate_per_s": 10_000, "burst": 10_000},
    )
    key = await create_key(settings, "eve")
    redis = redis_from_settings(settings)
    store = CounterStore(redis, settings)
    answers = Answers(settings)
    try:
        async with RawKafka(settings) as kafka:
            await answers.start()
            eve = Client(kafka, answers, "eve", key)

            # The first worker blocks eve (hidden) and saves her state when
            # it stops, as on any hand-over.
            async with running_worker(settings):
                first = await eve.ask(NOISE[:1])
            assert first["status"] == "ok", first
            assert not await store.is_blocked("eve")

            # One detector part of her snapshot is corrupted in Redis.
            (blob,) = (await store.load_states(["eve"])).values()
            parts = msgspec.msgpack.decode(blob, type=dict[str, dict[str, bytes]])
            assert "_policy" in parts and "ood" in parts["digits"], list(parts)
            parts["digits"]["ood"] = b"\x00corrupt"
            await store.save_states({"eve": msgspec.msgpack.encode(parts)}, 3600)

            # The next worker loads the rest: an honest digit is still
            # answered as a block's hidden cool-down, label only.
            async with running_worker(settings) as second:
                after = await eve.ask(X_TEST[:1])
                refused = second.metrics.registry.get_sample_value(
                    "modelgate_state_parts_refused_total", {"detector": "ood"}
                )
    finally:
        await answers.stop()
        await redis.aclose()

    assert refused == 1.0
    assert after["status"] == "ok", after
    (tensor,) = [t for t in after["outputs"] if t["name"] == "probabilities"]
    assert sorted(set(np.asarray(tensor["data"]).ravel().tolist())) == [0.0, 1.0]
    wanted = {first["request_id"], after["request_id"]}
    records = await read_topic(
        settings,
        settings.kafka.topics.decisions,
        until=lambda r: wanted <= {x["request_id"] for x in r},
        timeout_s=30.0,
    )
    decisions = {r["request_id"]: r for r in records}
    truth = decisions[after["request_id"]]
    assert truth["would_be_action"] == "block", json.dumps(truth)
    assert truth["enforced_action"] == "degrade" and truth["hidden"], truth
    assert any("cool-down" in r for r in truth["reasons"]), truth
    # ood started afresh (not warm on an honest digit); the block did not.
    assert truth["scores"].get("ood", 0.0) == 0.0, truth


async def test_a_blocked_client_with_a_policy_part_out_of_range_stays_blocked(
    stack: StackInfo, models_dir: Path
) -> None:
    """A visible block: the policy part holding its cool-down is corrupted to
    values no release writes (a NaN flag count, a block ending in 2065).
    The next worker refuses that part and starts the client's policy afresh,
    but the client stays blocked: admission refuses it on the Redis block
    key, which expires with the cool-down whatever the snapshot says."""
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        requests_partitions=1,
        policy={
            "rules": [{"action": "block", "risk_at": 1.0}],
            "block_cooldown_s": 600,
        },
        detectors=DETECTORS,
        limits={"rate_per_s": 10_000, "burst": 10_000},
    )
    key = await create_key(settings, "mallory")
    redis = redis_from_settings(settings)
    store = CounterStore(redis, settings)
    answers = Answers(settings)
    try:
        async with RawKafka(settings) as kafka:
            await answers.start()
            mallory = Client(kafka, answers, "mallory", key)

            async with running_worker(settings):
                first = await mallory.ask(NOISE[:1])
            assert first["status"] == "error", first
            assert first["error"]["code"] == "BLOCKED", first
            assert await store.is_blocked("mallory")

            (blob,) = (await store.load_states(["mallory"])).values()
            parts = msgspec.msgpack.decode(blob, type=dict[str, dict[str, bytes]])
            policy = msgspec.msgpack.decode(parts["_policy"]["state"])
            assert policy["live"]["blocked_until_s"] > 0, policy
            policy["live"]["flags"] = float("nan")
            policy["live"]["blocked_until_s"] = 3e9
            parts["_policy"]["state"] = msgspec.msgpack.encode(policy)
            await store.save_states({"mallory": msgspec.msgpack.encode(parts)}, 3600)

            async with running_worker(settings) as second:
                after = [await mallory.ask(X_TEST[i : i + 1]) for i in range(2)]
                refused = second.metrics.registry.get_sample_value(
                    "modelgate_state_parts_refused_total", {"detector": "policy"}
                )
            still_blocked = await store.is_blocked("mallory")
    finally:
        await answers.stop()
        await redis.aclose()

    assert refused == 1.0
    for answer in after:
        assert answer["status"] == "error", answer
        assert answer["error"]["code"] == "BLOCKED", answer
    assert still_blocked
