"""Extraction detection through the real broker, Redis and a worker.

A random-query extractor (equation solving, Tramèr et al. 2016: uniform
points over the model's declared input range) and honest clients replaying
held-out digits (``evaluation.benign``) go through one worker in shadow mode
(everything answered, every verdict recorded). The extractor must be flagged
by the answer-reading detectors (``coverage`` or ``margin``), which learn
from the model's answers after each batch, and named among the top
contributors of its decision records; the honest clients must not be flagged.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from gateway.client import KafkaTransport
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

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

X_TEST = digits_split()[1]
N_THIEF = 120
N_HONEST = 60
HONEST = [f"honest-{i}" for i in range(4)]
NEW = ("coverage", "margin")


async def test_random_query_extractor_is_flagged_by_the_answer_detectors(
    settings: Settings,
) -> None:
    """``settings``: shadow mode (everything answered, every verdict recorded)
    and limits that never throttle (tests/integration/conftest.py)."""
    keys = {c: await create_key(settings, c) for c in ["thief", *HONEST]}
    rng = np.random.default_rng(0)
    try:
        async with running_worker(settings), KafkaTransport(settings) as transport:
            client = clients_of(transport, keys)

            async def thief() -> None:
                solver = client("thief")
                for _ in range(N_THIEF // 4):
                    rows = rng.uniform(0.0, 16.0, (4, 64)).astype(np.float32)
                    await asyncio.gather(
                        *(
                            solver.infer(r[None, :], request_id=new_request_id())
                            for r in rows
                        )
                    )

            honest = honest_clients(client, HONEST, X_TEST, N_HONEST)
            await asyncio.gather(thief(), *honest)
            total = N_THIEF + N_HONEST * len(HONEST)
            decisions = await read_topic(
                settings,
                settings.kafka.topics.decisions,
                until=lambda records: len(records) >= total,
                timeout_s=45,
            )
    finally:
        await delete_prefix(settings)

    by_client: dict[str, list[dict[str, Any]]] = {}
    for record in decisions:
        by_client.setdefault(record["client_id"], []).append(record)
    assert len(by_client["thief"]) == N_THIEF

    # The thief: flagged by a detector that reads the model's answers, and
    # that detector named among the top contributors.
    reasons = [x for r in by_client["thief"] for x in r.get("reasons", [])]
    assert any(x.split(":")[0] in NEW for x in reasons), reasons[-10:]
    tops = [
        t.split(":")[0] for r in by_client["thief"] for t in r.get("top_detectors", [])
    ]
    assert set(NEW) & set(tops), tops[-10:]
    late = by_client["thief"][-20:]
    assert all(r["action"] != "allow" for r in late), late[-1]
    assert all(max(r["scores"].get(n, 0.0) for n in NEW) > 0 for r in late)

    # Honest clients: every decision allow, and none of the new detectors
    # anywhere in their reasons.
    for name in HONEST:
        records = by_client[name]
        assert len(records) == N_HONEST
        assert all(r["action"] == "allow" for r in records), [
            (r["action"], r.get("reasons")) for r in records if r["action"] != "allow"
        ]
