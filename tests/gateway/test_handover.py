"""ClientStates' bookkeeping (pure logic, with an in-memory store and scorer):
which clients a checkpoint saves, in what chunks, and which idle ones are
dropped. The real Redis path is tests/integration/test_checkpoint.py."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import SimpleNamespace
from typing import Any, cast

from gateway.batch import BatchItem
from gateway.config import WorkerConfig
from gateway.errors import StoreError
from gateway.handover import ClientStates
from gateway.metrics import WorkerMetrics
from gateway.scoring import Scorer
from gateway.store import CounterStore


class _Store:
    def __init__(self) -> None:
        self.saved: list[list[str]] = []
        self.blobs: dict[str, bytes] = {}

    async def save_states(self, states: Mapping[str, bytes], ttl_s: float) -> None:
        self.saved.append(list(states))
        self.blobs.update(states)

    async def load_states(self, client_ids: Iterable[str]) -> dict[str, bytes]:
        return {c: self.blobs[c] for c in client_ids if c in self.blobs}


class _Scorer:
    def __init__(self) -> None:
        self.forgotten: list[str] = []
        self.restored: list[str] = []

    def dump(self, client_id: str) -> bytes:
        return client_id.encode()

    def restore(self, client_id: str, blob: bytes) -> None:
        self.restored.append(client_id)

    def forget(self, client_id: str) -> None:
        self.forgotten.append(client_id)


def _items(*clients: str) -> list[BatchItem]:
    return [
        cast(
            BatchItem,
            SimpleNamespace(key=SimpleNamespace(client_id=c), topic="t", partition=0),
        )
        for c in clients
    ]


def _states(**config: Any) -> tuple[ClientStates, _Store, _Scorer]:
    store, scorer = _Store(), _Scorer()
    metrics = cast(
        WorkerMetrics, SimpleNamespace(clients=SimpleNamespace(set=lambda n: None))
    )
    states = ClientStates(
        cast(CounterStore, store), cast(Scorer, scorer), metrics, WorkerConfig(**config)
    )
    return states, store, scorer


async def test_checkpoint_saves_only_clients_seen_since_the_last_one() -> None:
    states, store, _ = _states(checkpoint_interval_s=10, client_idle_s=1000)
    await states.load_new(_items("a", "b"))
    start = states._last_checkpoint
    await states.maintain(start + 5)  # not due
    assert store.saved == []
    await states.maintain(start + 10)
    assert store.saved == [["a", "b"]]
    await states.load_new(_items("b"))
    await states.maintain(start + 15)  # due again only at +20
    await states.maintain(start + 20)
    assert store.saved == [["a", "b"], ["b"]]
    await states.maintain(start + 30)  # nobody seen since
    assert store.saved == [["a", "b"], ["b"]]


async def test_a_large_checkpoint_is_spread_over_calls() -> None:
    states, store, _ = _states(
        checkpoint_interval_s=10, client_idle_s=1000, checkpoint_max_clients=2
    )
    await states.load_new(_items("a", "b", "c", "d", "e"))
    start = states._last_checkpoint
    for step in range(4):
        await states.maintain(start + 10 + step)
    assert store.saved == [["a", "b"], ["c", "d"], ["e"]]


async def test_idle_clients_are_saved_dropped_and_loaded_again() -> None:
    states, store, scorer = _states(checkpoint_interval_s=0, client_idle_s=60)
    await states.load_new(_items("old"))
    seen_old = states._last_seen["old"]
    await states.load_new(_items("new"))
    states._last_seen["new"] = seen_old + 30
    await states.maintain(seen_old + 61)
    assert store.saved == [["old"]] and scorer.forgotten == ["old"]
    assert states.held() == ["new"]
    await states.load_new(_items("old"))
    assert "old" in states.held() and scorer.restored == ["old"]


async def test_a_client_whose_snapshot_did_not_load_is_never_saved() -> None:
    states, store, _ = _states(checkpoint_interval_s=1, client_idle_s=1000)
    # Seen, but never held (as when admission ran without Redis).
    states._note_seen(_items("ghost"))
    await states.maintain(states._last_checkpoint + 2)
    assert store.saved == [] and states.held() == []


class _FlakyStore(_Store):
    """Refuses saves while ``down`` (as Redis does when it is away)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.attempts = 0

    async def save_states(self, states: Mapping[str, bytes], ttl_s: float) -> None:
        self.attempts += 1
        if self.down:
            raise StoreError("redis save_states: ConnectionError")
        await super().save_states(states, ttl_s)


def _flaky(**config: Any) -> tuple[ClientStates, _FlakyStore, _Scorer]:
    store, scorer = _FlakyStore(), _Scorer()
    metrics = cast(
        WorkerMetrics, SimpleNamespace(clients=SimpleNamespace(set=lambda n: None))
    )
    states = ClientStates(
        cast(CounterStore, store), cast(Scorer, scorer), metrics, WorkerConfig(**config)
    )
    return states, store, scorer


async def test_a_failed_checkpoint_is_retried_at_the_next_interval() -> None:
    """Regression test: a checkpoint that Redis refused dropped its clients
    from the to-save list, so a client silent after that was never saved
    until it went idle, and a kill in between lost its whole history."""
    states, store, _ = _flaky(checkpoint_interval_s=10, client_idle_s=1000)
    await states.load_new(_items("a", "b"))
    start = states._last_checkpoint
    store.down = True
    await states.maintain(start + 10)
    assert store.attempts == 1 and store.saved == []
    # Not before the next interval: every batch of an outage would otherwise
    # wait out a Redis timeout.
    await states.maintain(start + 12)
    assert store.attempts == 1
    store.down = False
    await states.maintain(start + 20)
    assert store.saved == [["a", "b"]]


async def test_an_idle_client_whose_save_failed_is_kept_not_dropped() -> None:
    """Regression test: idle clients were forgotten even when their save
    failed, so a Redis outage longer than ``client_idle_s`` erased the
    detector history of every client that paused during it."""
    states, store, scorer = _flaky(checkpoint_interval_s=10, client_idle_s=60)
    await states.load_new(_items("quiet"))
    seen = states._last_seen["quiet"]
    store.down = True
    await states.maintain(seen + 61)
    assert states.held() == ["quiet"] and scorer.forgotten == []
    await states.maintain(seen + 62)  # no new attempt within the interval
    assert store.attempts == 1
    store.down = False
    await states.maintain(seen + 71)
    assert store.saved == [["quiet"]] and scorer.forgotten == ["quiet"]
    assert states.held() == []


async def test_many_idle_clients_are_dropped_a_bounded_chunk_per_batch() -> None:
    """Thousands of clients falling silent together must not make one batch
    save them all: each call saves and drops at most
    ``checkpoint_max_clients``, oldest first."""
    states, store, scorer = _states(
        checkpoint_interval_s=0, client_idle_s=60, checkpoint_max_clients=2
    )
    await states.load_new(_items("a", "b", "c", "d", "e"))
    later = states._last_seen["e"] + 61
    for _ in range(3):
        await states.maintain(later)
    assert store.saved == [["a", "b"], ["c", "d"], ["e"]]
    assert scorer.forgotten == ["a", "b", "c", "d", "e"] and states.held() == []
