"""Probing detection through the real broker, Redis and a worker.

A HopSkipJump attack (ART, driven as in ``evaluation.attacks.probing``) spread
over ten API keys must end up as one group of linked keys with a group risk
at the flag level; a one-pixel search is flagged by the structure detector;
honest clients replaying held-out digits (``evaluation.benign``) are neither
flagged nor linked. The Redis fingerprint store must agree with the in-memory
one on the same stream.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detectors.fingerprint import InMemoryFingerprintStore
from evaluation.attacks.probing import HopSkipJumpParams, run_hopskipjump
from gateway.client import GatewayClient, KafkaTransport, probabilities
from gateway.config import Settings
from gateway.fingerprints import RedisFingerprintStore
from gateway.models import digits_split, load_model
from gateway.protocol import new_request_id
from gateway.store import redis_from_settings
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

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

X_TEST = digits_split()[1]
N_ATTACK_KEYS = 10


async def test_redis_store_agrees_with_the_in_memory_store(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = isolated_settings(stack.kafka_bootstrap, stack.redis_url, models_dir)
    rng = np.random.default_rng(0)
    # Clients sending random fingerprints, some of them near copies (3 of 4
    # hashes kept) or exact copies of an earlier row of another client.
    rows = rng.integers(1, 2**63, (120, 4), dtype=np.uint64)
    keys = rng.integers(1, 2**63, 120, dtype=np.uint64)
    for i in range(20, 120, 3):
        source = i - int(rng.integers(1, 20))
        rows[i] = rows[source]
        if i % 2:
            rows[i, 0] = rng.integers(1, 2**63, dtype=np.uint64)
        elif i % 4 == 0:
            keys[i] = keys[source]  # an exact copy of an input
    clients = [f"c{int(c)}" for c in rng.integers(0, 6, len(rows))]
    remember = (rng.random(len(rows)) < 0.9).tolist()

    memory = InMemoryFingerprintStore(match_threshold=3)
    expected = memory.observe(clients, rows, remember, keys)
    redis = redis_from_settings(settings)
    try:
        store = RedisFingerprintStore(
            redis, settings.redis.key_prefix, match_threshold=3, ttl_s=60
        )
        got = []
        for start in range(0, len(rows), 50):  # batches see earlier batches
            got += await store.observe(
                clients[start : start + 50],
                rows[start : start + 50],
                remember[start : start + 50],
                keys[start : start + 50],
            )
        key = store.hash_key(int(rows[0, 0]))
        ttl_ms = await redis.pttl(key)
    finally:
        await redis.aclose()
        await delete_prefix(settings)
    assert got == expected
    assert any(m.others for m in got) and any(m.identical for m in got)
    assert 0 < ttl_ms <= 60_000


class _SpreadOracle:
    """HopSkipJump's query function, sending row i through key i mod 10."""

    def __init__(
        self, clients: list[GatewayClient], loop: asyncio.AbstractEventLoop
    ) -> None:
        self._clients = clients
        self._loop = loop
        self._next = itertools.count()

    def __call__(self, rows: Any) -> Any:
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float32))
        future = asyncio.run_coroutine_threadsafe(self._query(rows), self._loop)
        return future.result(timeout=60)

    async def _query(self, rows: Any) -> Any:
        async def one(row: Any) -> Any:
            client = self._clients[next(self._next) % len(self._clients)]
            response = await client.infer(row[None, :], timeout_s=30)
            return probabilities(response)[0]

        return np.stack(await asyncio.gather(*(one(r) for r in rows)))


@pytest.mark.timeout(150)
async def test_spread_attack_is_grouped_sparse_probe_flagged_benign_left_alone(
    settings: Settings, models_dir: Path
) -> None:
    """``settings`` are in shadow mode (tests/integration/conftest.py): the
    rules' action is recorded but nobody is refused, so the attack runs to its
    end and every key is seen."""
    attackers = [f"hsj-{i}" for i in range(N_ATTACK_KEYS)]
    honest = [f"honest-{i}" for i in range(4)]
    keys = {c: await create_key(settings, c) for c in [*attackers, "pixel", *honest]}
    loop = asyncio.get_running_loop()
    rng = np.random.default_rng(0)
    try:
        async with running_worker(settings), KafkaTransport(settings) as transport:
            client = clients_of(transport, keys)

            oracle = _SpreadOracle([client(c) for c in attackers], loop)
            labels = load_model(models_dir, "digits").predict_proba(X_TEST).argmax(1)
            params = HopSkipJumpParams(n_targets=3, max_iter=4, seed=0)
            attack = loop.run_in_executor(
                None,
                run_hopskipjump,
                oracle,
                X_TEST,
                np.array([0, 1, 2]),
                labels,
                params,
            )

            async def pixel_probe() -> None:
                probe = client("pixel")
                base = X_TEST[5]
                for _ in range(40):
                    row = base.copy()
                    row[rng.integers(0, 64)] = float(rng.uniform(0, 16))
                    await probe.infer(row[None, :], request_id=new_request_id())

            benign = honest_clients(client, honest, X_TEST, 40)
            result, *_ = await asyncio.gather(attack, pixel_probe(), *benign)
            total = result.queries + 40 + 40 * len(honest)
            decisions = await read_topic(
                settings,
                settings.kafka.topics.decisions,
                until=lambda records: len(records) >= total,
                timeout_s=60,
            )
    finally:
        await delete_prefix(settings)

    assert result.queries >= 200, result.to_dict()
    by_client: dict[str, list[dict[str, Any]]] = {}
    for record in decisions:
        by_client.setdefault(record["client_id"], []).append(record)

    # The attack's keys: one group, at or above the flag level, each flagged.
    last = {c: by_client[c][-1] for c in attackers}
    groups = {record.get("group_id") for record in last.values()}
    assert len(groups) == 1 and None not in groups, groups
    assert all(r.get("group_risk", 0.0) >= 1.0 for r in last.values()), last
    for c in attackers:
        assert any(r["action"] in ("flag", "block") for r in by_client[c]), c

    # The one-pixel search: flagged by the structure detector.
    reasons = [reason for r in by_client["pixel"] for reason in r.get("reasons", [])]
    assert any(reason.startswith("structure:") for reason in reasons), reasons

    # Honest clients: never flagged, never linked to anyone.
    for c in honest:
        assert all(r["action"] == "allow" for r in by_client[c]), by_client[c]
        assert {r.get("group_id") for r in by_client[c]} == {c}
