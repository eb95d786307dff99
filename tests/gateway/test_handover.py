"""ClientStates' bookkeeping (pure logic, with an in-memory store and scorer):
which clients a checkpoint saves, in what chunks, and which idle ones are
dropped. The real Redis path is tests/integration/test_checkpoint.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Mapping
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiokafka import TopicPartition

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


# -- restores and dumps run off the event loop, in order ---------------------------


class _LoopCheckingScorer(_Scorer):
    """Each restore or dump waits until the event loop runs a callback: it
    returns only if the loop is free while the call runs (on the loop, the
    callback could not run and the wait would time out). Records overlaps."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop
        self._inside = 0
        self.overlapped = False
        self.loop_free: list[bool] = []

    def _off_loop_call(self) -> None:
        self._inside += 1
        self.overlapped |= self._inside > 1
        ran = threading.Event()
        self._loop.call_soon_threadsafe(ran.set)
        self.loop_free.append(ran.wait(5))
        self._inside -= 1

    def restore(self, client_id: str, blob: bytes) -> None:
        self._off_loop_call()
        super().restore(client_id, blob)

    def dump(self, client_id: str) -> bytes:
        self._off_loop_call()
        return super().dump(client_id)


def _checking_states() -> tuple[ClientStates, _Store, _LoopCheckingScorer]:
    store, scorer = _Store(), _LoopCheckingScorer(asyncio.get_running_loop())
    metrics = cast(
        WorkerMetrics, SimpleNamespace(clients=SimpleNamespace(set=lambda n: None))
    )
    states = ClientStates(cast(CounterStore, store), cast(Scorer, scorer), metrics)
    return states, store, scorer


async def test_restores_run_off_the_loop_and_end_before_load_new_returns() -> None:
    """The worker scores a batch right after ``load_new``: every snapshot of
    the batch's new clients must be in place by then."""
    states, store, scorer = _checking_states()
    store.blobs = {c: c.encode() for c in ("a", "b", "c")}
    await states.load_new(_items("a", "b", "c", "never-saved"))
    assert scorer.restored == ["a", "b", "c"]
    assert scorer.loop_free == [True] * 3
    assert not scorer.overlapped


async def test_snapshots_dump_off_the_loop_before_the_save() -> None:
    states, store, scorer = _checking_states()
    await states.load_new(_items("a", "b"))
    assert await states.snapshot(["a", "b"])
    assert store.blobs == {"a": b"a", "b": b"b"}
    assert scorer.loop_free == [True] * 2
    leaving = await states.hand_over({TopicPartition("t", 0)})
    assert leaving == ["a", "b"] and scorer.forgotten == ["a", "b"]
    assert scorer.loop_free == [True] * 4 and not scorer.overlapped


class _HeldScorer(_Scorer):
    """A restore that holds the scorer until the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.finished = False

    def restore(self, client_id: str, blob: bytes) -> None:
        self.entered.set()
        assert self.release.wait(10)
        super().restore(client_id, blob)
        self.finished = True


async def test_a_cancelled_load_ends_only_after_its_restores() -> None:
    """A cancelled batch (the worker stopping) must not let the stop's
    snapshot dump the scorer while a thread still restores into it."""
    store, scorer = _Store(), _HeldScorer()
    store.blobs = {"a": b"a"}
    metrics = cast(
        WorkerMetrics, SimpleNamespace(clients=SimpleNamespace(set=lambda n: None))
    )
    states = ClientStates(cast(CounterStore, store), cast(Scorer, scorer), metrics)
    task = asyncio.create_task(states.load_new(_items("a")))
    assert await asyncio.to_thread(scorer.entered.wait, 10)
    task.cancel()
    for _ in range(20):
        await asyncio.sleep(0)
    # However long the loop runs, the task cannot end while the thread holds
    # the scorer.
    assert not task.done()
    task.cancel()  # asked twice: still waits
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done()
    scorer.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert scorer.finished and scorer.restored == ["a"]
