"""``traffic``'s cohort test through the real broker, Redis and a worker.

Arrival times are the broker's append times, whole milliseconds, of the
batches the client's producer sends, so a metronome's gaps reach the worker
blurred: this checks that ten paced keys started together are still flagged
through their cohort before any of them has sent the 16 requests the
single-key test needs, and that honest clients started beside them are not.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evaluation.oracle import Pacer
from gateway.client import GatewayClient, KafkaTransport
from gateway.config import Settings
from gateway.models import digits_split
from gateway.protocol import new_request_id
from tests.integration.helpers import (
    clients_of,
    create_key,
    delete_prefix,
    honest_clients,
    read_topic,
    running_worker,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

X_TEST = digits_split()[1]
N_KEYS = 10
PER_KEY = 12  # under traffic's min_queries (16): only the cohort can flag
RATE_PER_KEY_S = 4.0


async def _paced(client: GatewayClient, rows: np.ndarray[Any, Any]) -> None:
    """One key of the thief: a metronome, each request waiting for no answer
    before the next is due (the eval's ``GatewayOracle`` paces the same way)."""
    pacer = Pacer(RATE_PER_KEY_S)

    async def one(row: np.ndarray[Any, Any]) -> None:
        await client.infer(row[None, :], request_id=new_request_id(), timeout_s=30)

    sent = []
    for row in rows:
        await pacer.wait()
        sent.append(asyncio.create_task(one(row)))
    await asyncio.gather(*sent)


async def test_ten_paced_keys_are_flagged_through_their_cohort(
    settings: Settings, models_dir: Path
) -> None:
    """``settings`` are in shadow mode: every decision is recorded, nobody is
    refused, so each key's whole stream is seen."""
    thieves = [f"paced-{i}" for i in range(N_KEYS)]
    honest = [f"honest-{i}" for i in range(4)]
    keys = {c: await create_key(settings, c) for c in [*thieves, *honest, "warm"]}
    try:
        async with running_worker(settings), KafkaTransport(settings) as transport:
            client = clients_of(transport, keys)
            # One answered request first, so the producer's metadata and the
            # worker's first batch are not what spaces the thieves' first
            # requests.
            await client("warm").infer(X_TEST[:1], timeout_s=60)
            rows = X_TEST[: N_KEYS * PER_KEY].reshape(N_KEYS, PER_KEY, -1)
            await asyncio.gather(
                *(_paced(client(c), rows[i]) for i, c in enumerate(thieves)),
                *honest_clients(client, honest, X_TEST[200:], 30),
            )
            total = 1 + N_KEYS * PER_KEY + 30 * len(honest)
            decisions = await read_topic(
                settings,
                settings.kafka.topics.decisions,
                until=lambda records: len(records) >= total,
                timeout_s=60,
            )
    finally:
        await delete_prefix(settings)

    by_client: dict[str, list[dict[str, Any]]] = {}
    for record in decisions:
        by_client.setdefault(record["client_id"], []).append(record)

    def cohort_flags(c: str) -> list[str]:
        return [
            reason
            for record in by_client[c]
            for reason in record.get("reasons", [])
            if reason.startswith("traffic:") and "successive gap pairs" in reason
        ]

    flagged = [c for c in thieves if cohort_flags(c)]
    # Most keys, not all: a key whose own pairs the broker's batching blurred
    # below member_z is left to its own test, which 12 requests never reach.
    assert len(flagged) >= N_KEYS // 2, {c: cohort_flags(c)[:1] for c in thieves}
    # Every request answered once at least (a rebalance may redeliver one).
    assert all(len({r["request_id"] for r in by_client[c]}) == PER_KEY for c in thieves)
    for c in honest:
        assert all(r["action"] == "allow" for r in by_client[c]), by_client[c]
        assert not cohort_flags(c)
