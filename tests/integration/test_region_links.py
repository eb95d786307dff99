"""Region links through the real broker, Redis and a worker.

Four keys each send honest-looking held-out digits with three unusual rows
(inverted digits, on the pixel lattice, each a different input) that fall in
one rare region: none of them is flagged for its own few outliers, but the
worker links them into one group through the Redis region store. When one of
them is then blocked for its own queries, the others are refused through the
group. Honest keys replaying held-out digits at the same time stay unlinked.
Fingerprint links are turned off (``link_min_shared`` out of reach), so every
link here is a region link. Also: the Redis region store answers as the
in-memory one, two workers sharing Redis link keys each serves, and a key
alone gets no group risk.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detectors.region import InMemoryRegionStore, RegionMap
from gateway.batch import BatchItem
from gateway.client import GatewayClient, KafkaTransport, error_of
from gateway.config import CrossClientConfig, Settings
from gateway.groups import CrossClient, RegionBatch
from gateway.keys import ApiKey
from gateway.models import digits_split, load_model
from gateway.policy import Verdict
from gateway.protocol import new_request_id
from gateway.regions import RedisRegionStore
from gateway.store import redis_from_settings
from gateway.validation import feature_scale
from tests.conftest import StackInfo
from tests.integration.helpers import (
    clients_of,
    create_key,
    delete_prefix,
    honest_clients,
    isolated_settings,
    read_topic,
    running_worker,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

X_TEST = digits_split()[1]
THIEVES = [f"thief-{i}" for i in range(4)]
HONEST = [f"honest-{i}" for i in range(4)]
ODD_AT, ODD_EVERY = 6, 7  # unusual rows at 6, 13 and 20 of 23 per key
STREAM = 23


def _odd_rows(models_dir: Path, n: int) -> np.ndarray:
    """``n`` different inverted digits in one region the reference never
    visits, found with the region map the worker fits."""
    model = load_model(models_dir, "digits")
    scale = feature_scale(model.signature, model.reference)
    defaults = CrossClientConfig()
    regions = RegionMap(
        n_components=defaults.region_components,
        cell_sd=defaults.region_cell_sd,
        rare_share=defaults.region_rare_share,
    ).fit(scale.apply(model.reference))
    rng = np.random.default_rng(3)
    base = 16.0 - X_TEST[0]
    candidates = np.repeat(base[None, :], 400, axis=0)
    for row in candidates:
        pixels = rng.choice(64, 3, replace=False)
        row[pixels] = 16.0 - row[pixels]  # three pixels flipped: a new input
    ids = regions.region_ids(scale.apply(candidates))
    values, counts = np.unique(ids, return_counts=True)
    region = values[np.argmax(counts)]
    chosen = np.unique(candidates[ids == region], axis=0)
    assert len(chosen) >= n and regions.reference_share(region[None])[0] == 0.0
    return np.asarray(chosen[:n], dtype=np.float32)


async def _send(client: GatewayClient, row: np.ndarray) -> str | None:
    """One query; the error code of its answer, ``None`` when served."""
    response = await client.infer(
        row[None, :], request_id=new_request_id(), timeout_s=30
    )
    error = error_of(response)
    return None if error is None else error.code


async def test_redis_region_store_agrees_with_the_in_memory_store(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = isolated_settings(stack.kafka_bootstrap, stack.redis_url, models_dir)
    rng = np.random.default_rng(0)
    regions = rng.integers(0, 12, 300).astype(np.uint64)
    clients = [f"c{int(c)}" for c in rng.integers(0, 8, 300)]
    memory = InMemoryRegionStore(ttl_s=60.0, entries_per_region=5)
    expected = memory.observe(clients, regions, now_s=0.0)
    redis = redis_from_settings(settings)
    try:
        store = RedisRegionStore(
            redis, settings.redis.key_prefix, ttl_s=60.0, entries_per_region=5
        )
        got: list[list[str]] = []
        for start in range(0, len(clients), 64):  # batches see earlier ones
            got += await store.observe(
                "digits", clients[start : start + 64], regions[start : start + 64]
            )
        key = store.region_key("digits", int(regions[0]))
        ttl_ms = await redis.pttl(key)
        length = await redis.llen(key)
    finally:
        await redis.aclose()
        await delete_prefix(settings)
    assert [sorted(g) for g in got] == [sorted(e) for e in expected]
    assert any(got) and 0 < ttl_ms <= 60_000 and length == 5


async def test_a_client_alone_has_no_group_risk(
    stack: StackInfo, models_dir: Path
) -> None:
    # A flagged key with no link: its own risk must not come back to it as a
    # group score (that would count its flags twice).
    settings = isolated_settings(stack.kafka_bootstrap, stack.redis_url, models_dir)
    item = BatchItem(
        topic="t", partition=0, offset=0, value=b"", record_key="a", signature=None
    )
    item.key = ApiKey(
        key_id="k-a",
        client_id="a",
        secret=b"s",
        models=(),
        status="active",
        created_ms=0,
    )
    item.verdict = Verdict("flag", "flag", 1.2, enforced_risk=1.2)
    redis = redis_from_settings(settings)
    try:
        await CrossClient(redis, settings).after_scoring([item], [])
    finally:
        await redis.aclose()
        await delete_prefix(settings)
    assert item.group_id == "a" and item.group_risk == 0.0


def _flagged(client: str, risk: float) -> BatchItem:
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
    item.verdict = Verdict("allow", "allow", risk, enforced_risk=risk)
    return item


async def test_two_workers_link_keys_through_the_region_store(
    stack: StackInfo, models_dir: Path
) -> None:
    # Key a on worker 1 and key b on worker 2 send counted rows into region
    # 7: worker 2 sees a's rows in Redis, links the pair at 3 reports and
    # gives b the group's risk (a's); worker 1 adopts the link from Redis with
    # a's next batch.
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        cross_client={"link_min_shared": 1_000_000, "region_min_shared": 3},
    )
    region = np.array([7], dtype=np.uint64)
    redis = redis_from_settings(settings)
    try:
        first, second = CrossClient(redis, settings), CrossClient(redis, settings)
        for _ in range(3):
            await first.after_scoring(
                [_flagged("a", 2.0)], [], [RegionBatch("digits", ["a"], region)]
            )
        items_b = []
        for _ in range(3):
            items_b = [_flagged("b", 0.1)]
            await second.after_scoring(
                items_b, [], [RegionBatch("digits", ["b"], region)]
            )
        assert second.links.members("b") == ["a", "b"]
        assert items_b[0].group_id == "a" and items_b[0].group_risk == 2.0
        # Another model's region 7 is another region: c's rows there would
        # otherwise report a and b three times each, enough to link.
        await second.after_scoring(
            [_flagged("c", 0.0)],
            [],
            [RegionBatch("other", ["c"] * 3, np.repeat(region, 3))],
        )
        assert second.links.members("c") == ["c"]

        more = [_flagged("a", 0.5)]
        await first.after_scoring(more, [], [])
        assert first.links.members("a") == ["a", "b"]
    finally:
        await redis.aclose()
        await delete_prefix(settings)


async def test_keys_in_one_rare_region_are_one_group_and_share_a_block(
    stack: StackInfo, models_dir: Path
) -> None:
    settings: Settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        cross_client={"link_min_shared": 1_000_000, "region_min_shared": 3},
        limits={"rate_per_s": 10_000, "burst": 10_000},
    )
    odd = _odd_rows(models_dir, 3 * len(THIEVES))
    # Thieves replay rows the honest keys do not (honest_clients takes the
    # first 4 x 40 of its permutation).
    plain = X_TEST[np.random.default_rng(1).permutation(len(X_TEST))[200:]]
    keys = {c: await create_key(settings, c) for c in [*THIEVES, *HONEST]}
    sent = 0
    try:
        async with running_worker(settings), KafkaTransport(settings) as transport:
            client = clients_of(transport, keys)

            async def thieves() -> list[str | None]:
                codes: list[str | None] = []
                # One after another, so ood's cohort of young keys (first
                # queries within 0.25 s of each other) cannot judge them.
                for k, name in enumerate(THIEVES):
                    stream = list(plain[20 * k : 20 * k + 20])
                    for j, row in enumerate(odd[3 * k : 3 * k + 3]):
                        stream.insert(ODD_AT + ODD_EVERY * j, row)
                    for row in stream:
                        codes.append(await _send(client(name), row))
                # One more plain query each, once every link is made: its
                # decision record carries the group.
                for k, name in enumerate(THIEVES):
                    codes.append(await _send(client(name), plain[100 + k]))
                return codes

            benign = honest_clients(client, HONEST, X_TEST, 40)
            codes, *_ = await asyncio.gather(thieves(), *benign)
            sent += len(codes) + 40 * len(HONEST)
            assert codes == [None] * len(codes), codes

            # Thief 0 turns to random, off-lattice queries: blocked by its own
            # detectors. Thief 1, still sending plain digits, is then refused
            # through the group.
            rng = np.random.default_rng(5)
            blocked_at = None
            for i in range(40):
                row = rng.uniform(0.0, 16.0, 64).astype(np.float32)
                sent += 1
                if await _send(client(THIEVES[0]), row) == "BLOCKED":
                    blocked_at = i
                    break
            assert blocked_at is not None, "thief-0 was never blocked"
            refused_at = None
            for i in range(8):
                sent += 1
                if await _send(client(THIEVES[1]), plain[110 + i]) == "BLOCKED":
                    refused_at = i
                    break
            assert refused_at is not None, "thief-1 was not refused through its group"

            decisions = await read_topic(
                settings,
                settings.kafka.topics.decisions,
                until=lambda records: len(records) >= sent,
                timeout_s=60,
            )
    finally:
        await delete_prefix(settings)

    by_client: dict[str, list[dict[str, Any]]] = {}
    for record in decisions:
        by_client.setdefault(record["client_id"], []).append(record)

    # Before thief 0's random queries: every thief served and unflagged, and
    # each one's extra plain query (its 24th) carries the one group.
    for c in THIEVES:
        records = by_client[c][: STREAM + 1]
        assert all(r["action"] == "allow" for r in records), (c, records)
        assert records[-1].get("group_id") == "thief-0", (c, records[-1])

    # Thief 1's refusal comes from the group, not from its own queries.
    refusal = next(r for r in by_client[THIEVES[1]] if r["action"] == "block")
    assert any(reason.startswith("group") for reason in refusal["reasons"]), refusal

    # Honest keys: never flagged, never linked.
    for c in HONEST:
        assert all(r["action"] == "allow" for r in by_client[c]), by_client[c]
        assert {r.get("group_id") for r in by_client[c]} == {c}
