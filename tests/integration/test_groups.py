"""Cross-client groups across two workers sharing Redis, and the fail-open
path when Redis is unreachable."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from detectors.fingerprint import input_keys
from gateway.batch import BatchItem
from gateway.groups import CrossClient, FingerprintBatch
from gateway.keys import ApiKey
from gateway.policy import Verdict
from gateway.store import redis_from_settings
from tests.conftest import StackInfo
from tests.integration.helpers import delete_prefix, isolated_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _item(client: str, risk: float, enforced: float | None = None) -> BatchItem:
    item = BatchItem(
        topic="t", partition=0, offset=0, value=b"", record_key=client, signature=None
    )
    item.key = ApiKey(
        key_id=f"k-{client}",
        client_id=client,
        secret=b"s",
        models=(),
        status="active",
        created_ms=0,
    )
    item.verdict = Verdict(
        "allow", "allow", risk, enforced_risk=risk if enforced is None else enforced
    )
    return item


def _batch(clients: list[str], rows: np.ndarray) -> FingerprintBatch:
    return FingerprintBatch(
        model="digits",
        client_ids=clients,
        hashes=rows,
        remember=[True] * len(clients),
        match_threshold=3,
        input_keys=input_keys(
            np.random.default_rng(len(clients)).random((len(clients), 8))
        ),
    )


async def test_two_workers_share_fingerprints_links_and_risk(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        cross_client={"link_min_shared": 3},
    )
    redis = redis_from_settings(settings)
    try:
        first, second = CrossClient(redis, settings), CrossClient(redis, settings)
        fingerprint = np.array([[11, 12, 13, 14]], dtype=np.uint64)
        # Worker 1 serves key a: four near-identical queries.
        rows_a = np.repeat(fingerprint, 4, axis=0)
        rows_a[:, 3] = np.arange(100, 104, dtype=np.uint64)
        items_a = [_item("a", 2.0) for _ in range(4)]
        await first.after_scoring(items_a, [_batch(["a"] * 4, rows_a)])
        assert {i.group_id for i in items_a} == {"a"}

        # Worker 2 serves key b, whose queries are near a's: linked there, and
        # the group's risk is a's (read from Redis), not b's own.
        rows_b = np.repeat(fingerprint, 3, axis=0)
        rows_b[:, 3] = np.arange(200, 203, dtype=np.uint64)
        items_b = [_item("b", 0.1) for _ in range(3)]
        await second.after_scoring(items_b, [_batch(["b"] * 3, rows_b)])
        assert items_b[-1].group_id == "a"
        assert items_b[-1].group_risk == 2.0

        # Worker 1 learns the link from Redis with a's next batch.
        more = [_item("a", 0.5)]
        await first.after_scoring(more, [_batch(["a"], rows_a[:1] + 1000)])
        assert first.links.members("a") == ["a", "b"]
        assert more[0].group_id == "a"
    finally:
        await redis.aclose()
        await delete_prefix(settings)


async def test_group_risk_leaves_out_detectors_in_shadow(
    stack: StackInfo, models_dir: Path
) -> None:
    # Key a's would-be risk is 2.0, all of it from a detector in shadow (its
    # enforced risk is 0.1): linked key b must not inherit the 2.0.
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        cross_client={"link_min_shared": 3},
    )
    redis = redis_from_settings(settings)
    try:
        cross = CrossClient(redis, settings)
        fingerprint = np.array([[21, 22, 23, 24]], dtype=np.uint64)
        rows_a = np.repeat(fingerprint, 4, axis=0)
        rows_a[:, 3] = np.arange(300, 304, dtype=np.uint64)
        items_a = [_item("a", 2.0, enforced=0.1) for _ in range(4)]
        await cross.after_scoring(items_a, [_batch(["a"] * 4, rows_a)])
        rows_b = np.repeat(fingerprint, 3, axis=0)
        rows_b[:, 3] = np.arange(400, 403, dtype=np.uint64)
        items_b = [_item("b", 0.05) for _ in range(3)]
        await cross.after_scoring(items_b, [_batch(["b"] * 3, rows_b)])
        assert items_b[-1].group_id == "a"
        assert items_b[-1].group_risk == pytest.approx(0.1)
    finally:
        await redis.aclose()
        await delete_prefix(settings)


async def test_an_unreachable_redis_leaves_the_batch_alone(
    stack: StackInfo, models_dir: Path
) -> None:
    # A loopback port nobody listens on: bound, then closed.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = isolated_settings(
        stack.kafka_bootstrap,
        f"redis://127.0.0.1:{port}/0",
        models_dir,
    )
    redis = redis_from_settings(settings)
    try:
        items = [_item("a", 1.0)]
        rows = np.array([[1, 2, 3, 4]], dtype=np.uint64)
        await CrossClient(redis, settings).after_scoring(items, [_batch(["a"], rows)])
        assert items[0].group_id is None and items[0].group_risk == 0.0
    finally:
        await redis.aclose()


async def test_a_shortened_link_ttl_caps_link_sets_already_in_redis(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        cross_client={"link_min_shared": 3, "link_ttl_s": 3600.0},
    )
    redis = redis_from_settings(settings)
    try:
        cross = CrossClient(redis, settings)
        fingerprint = np.array([[31, 32, 33, 34]], dtype=np.uint64)
        rows_a = np.repeat(fingerprint, 4, axis=0)
        rows_a[:, 3] = np.arange(500, 504, dtype=np.uint64)
        await cross.after_scoring(
            [_item("a", 2.0) for _ in range(4)], [_batch(["a"] * 4, rows_a)]
        )
        rows_b = np.repeat(fingerprint, 3, axis=0)
        rows_b[:, 3] = np.arange(600, 603, dtype=np.uint64)
        await cross.after_scoring(
            [_item("b", 0.1) for _ in range(3)], [_batch(["b"] * 3, rows_b)]
        )
        key_a = cross._client_key("a", "links")
        key_b = cross._client_key("b", "links")
        assert await redis.smembers(key_a) == {b"b"}
        assert await redis.pttl(key_a) > 3_000_000

        cross.reconfigure(cross.config.model_copy(update={"link_ttl_s": 60.0}))
        # a's next batch caps its set; b's, not yet served, keeps the old TTL.
        await cross.after_scoring([_item("a", 0.5)], [_batch(["a"], rows_a[:1] + 9)])
        assert 0 < await redis.pttl(key_a) <= 60_000
        assert await redis.pttl(key_b) > 3_000_000
        # A longer TTL again does not lengthen a capped set (LT).
        cross.reconfigure(cross.config.model_copy(update={"link_ttl_s": 7200.0}))
        await cross.after_scoring([_item("a", 0.5)], [_batch(["a"], rows_a[:1] + 7)])
        assert 0 < await redis.pttl(key_a) <= 60_000
    finally:
        await redis.aclose()
        await delete_prefix(settings)
