"""A client's history crosses a hand-over with the real scorer: restored in
a thread by ``ClientStates.load_new``, then scored in the order the worker
uses (``load_new``, then ``score_and_predict`` in the executor). A client's
first query with no history scores 0 on every detector (they are warming
up), which is what a history restored too late would look like. The same
through Kafka, Redis and a killed worker is in
tests/integration/test_faults.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest
from aiokafka import TopicPartition

from gateway.batch import BatchItem
from gateway.config import load_settings
from gateway.handover import ClientStates
from gateway.keys import ApiKey
from gateway.metrics import WorkerMetrics
from gateway.models import ServedModel, digits_split, ensure_digits_model, load_model
from gateway.scoring import Scorer
from gateway.store import Admission, CounterStore
from tests.gateway.test_handover import _Store

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ServedModel]:
    directory: Path = tmp_path_factory.mktemp("models")
    ensure_digits_model(directory)
    return {"digits": load_model(directory, "digits")}


def _item(model: ServedModel, client: str, row: np.ndarray, t_s: float) -> BatchItem:
    it = BatchItem("requests", 0, 0, b"", "", None)
    it.key = ApiKey("k-" + client, client, b"s", (), "active", 0)  # type: ignore[arg-type]
    it.model = model
    it.rows = row[None, :].astype(np.float32)
    it.arrived_s = t_s
    it.admission = Admission("ok", 0, 1)  # type: ignore[arg-type]
    return it


def _states(scorer: Scorer, store: _Store) -> ClientStates:
    metrics = cast(
        WorkerMetrics, SimpleNamespace(clients=SimpleNamespace(set=lambda n: None))
    )
    return ClientStates(cast(CounterStore, store), scorer, metrics)


async def test_a_handed_over_client_is_scored_on_its_history(
    served: dict[str, ServedModel],
) -> None:
    model = served["digits"]
    rows = digits_split()[1]
    loop = asyncio.get_running_loop()
    store = _Store()

    # The old owner serves kay, then hands kay over.
    old = Scorer(load_settings(), served, WorkerMetrics())
    old_states = _states(old, store)
    for i in range(25):
        batch = [_item(model, "kay", rows[i], 1.7e9 + i)]
        await old_states.load_new(batch)
        await loop.run_in_executor(None, old.score_and_predict, batch)
    assert await old_states.hand_over({TopicPartition("requests", 0)}) == ["kay"]
    assert "kay" in store.blobs

    # The new owner's first batch holds kay and lee, who has no history.
    new = Scorer(load_settings(), served, WorkerMetrics())
    new_states = _states(new, store)
    batch = [
        _item(model, "kay", rows[40], 1.7e9 + 40),
        _item(model, "lee", rows[40], 1.7e9 + 40),
    ]
    await new_states.load_new(batch)
    await loop.run_in_executor(None, new.score_and_predict, batch)
    kay, lee = batch
    assert all(v == 0 for v in lee.scores.values()), lee.scores
    assert any(v > 0 for v in kay.scores.values()), kay.scores
