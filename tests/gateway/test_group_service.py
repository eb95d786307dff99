"""The consume loop the worker and the guard share (gateway/group_service.py)
against a consumer double: commit after the batch, rewind and back off on a
failure, partitions revoked between the fetch and the lock left alone, a
revoke that waits for the batch in hand (bounded or not), and a taken metrics
port. The real services through Kafka: tests/integration/test_faults.py,
test_feedback_guard.py, test_feedback_metrics.py."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError

from gateway.config import Settings
from gateway.errors import BrokerError, ConfigError, StoreError
from gateway.group_clients import MIN_BACKOFF_S, Backoff
from gateway.group_service import GroupService
from gateway.metrics import GuardMetrics

pytestmark = pytest.mark.timeout(10)

A, B = TopicPartition("t", 0), TopicPartition("t", 1)


class FakeConsumer:
    """What the loop asks of an AIOKafkaConsumer, recorded."""

    def __init__(self, owned: set[TopicPartition], highwater: int = 100) -> None:
        self.owned = owned
        self.highwaters = {tp: highwater for tp in owned}
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.commits: list[dict[TopicPartition, int]] = []
        self.commit_error: Exception | None = None
        self.batches: list[dict[TopicPartition, list[Any]]] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.owned)

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.highwaters.get(tp)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.commit_error is not None:
            raise self.commit_error
        self.commits.append(offsets)

    async def getmany(
        self, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, list[Any]]:
        return self.batches.pop(0) if self.batches else {}


class CountedBackoff(Backoff):
    """Records each wait instead of sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    async def wait(self) -> None:
        self.waits.append(self.delay_s)


class Service(GroupService):
    def __init__(self, consumer: FakeConsumer, fault: Exception | None = None) -> None:
        self.metrics = GuardMetrics()
        super().__init__(Settings(), self.metrics, "test")
        self._consumer = consumer
        self.backoff = self._backoff = CountedBackoff()
        self.fault = fault
        self.handled: list[list[tuple[TopicPartition, int]]] = []
        self.revoked: list[set[TopicPartition]] = []
        self.timed_out: list[set[TopicPartition]] = []
        self.wait_s: float | None = None

    @property
    def max_batch_records(self) -> int:
        return 10

    async def process_records(
        self, records: Sequence[tuple[TopicPartition, Any]]
    ) -> None:
        self.handled.append([(tp, r.offset) for tp, r in records])
        if self.fault is not None:
            raise self.fault

    def _revoke_wait_s(self) -> float | None:
        return self.wait_s

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        self.revoked.append(revoked)

    def _on_revoke_timed_out(self, revoked: set[TopicPartition]) -> None:
        self.timed_out.append(revoked)


def _records(*offsets: int) -> list[Any]:
    return [SimpleNamespace(offset=o) for o in offsets]


def _value(service: Service, name: str, **labels: str) -> float | None:
    return service.metrics.registry.get_sample_value(name, labels)


async def test_a_batch_is_committed_past_its_last_offsets_once_handled() -> None:
    consumer = FakeConsumer({A, B}, highwater=50)
    service = Service(consumer)
    service._backoff.delay_s = 4.0  # as after failures: a commit resets it

    await service._handle_batch({A: _records(10, 11, 12), B: _records(40)})

    assert service.handled == [[(A, 10), (A, 11), (A, 12), (B, 40)]]
    assert consumer.commits == [{A: 13, B: 41}]
    assert consumer.seeks == []
    assert service.batches_done == 1 and service._backoff.delay_s == MIN_BACKOFF_S
    lag = "modelgate_consumer_lag"
    assert _value(service, lag, topic="t", partition="0") == 50 - 12 - 1
    assert _value(service, lag, topic="t", partition="1") == 50 - 40 - 1
    assert _value(service, "modelgate_batch_seconds_count") == 1


@pytest.mark.parametrize(
    ("fault", "commit_error", "cause"),
    [
        (StoreError("redis down"), None, "redis"),
        (BrokerError("produce failed"), None, "kafka"),
        (TimeoutError(), None, "timeout"),
        (None, KafkaConnectionError(), "kafka"),
    ],
)
async def test_a_failed_batch_is_rewound_to_its_first_offsets_and_backs_off(
    fault: Exception | None, commit_error: Exception | None, cause: str
) -> None:
    consumer = FakeConsumer({A, B})
    consumer.commit_error = commit_error
    service = Service(consumer, fault)

    for _ in range(2):
        await service._handle_batch({A: _records(10, 11), B: _records(40)})

    # Nothing committed; each failure seeks every owned partition back to the
    # batch's first offset, so the whole batch comes again, and the wait
    # doubles.
    assert consumer.commits == []
    assert consumer.seeks == [(A, 10), (B, 40)] * 2
    assert service.backoff.waits == [MIN_BACKOFF_S, MIN_BACKOFF_S * 2]
    assert service.batches_done == 0
    assert _value(service, "modelgate_batch_rewinds_total", cause=cause) == 2
    assert _value(service, "modelgate_batch_seconds_count") == 2


async def test_a_rewind_leaves_a_partition_revoked_meanwhile_alone() -> None:
    consumer = FakeConsumer({A, B})
    service = Service(consumer, StoreError("redis down"))

    async def revoke_b(records: Sequence[tuple[TopicPartition, Any]]) -> None:
        consumer.owned.discard(B)
        raise StoreError("redis down")

    service.process_records = revoke_b  # type: ignore[method-assign]
    await service._handle_batch({A: _records(10), B: _records(40)})
    assert consumer.seeks == [(A, 10)]


async def test_records_of_a_partition_revoked_before_the_lock_are_left_alone() -> None:
    consumer = FakeConsumer({A})
    consumer.batches = [{A: _records(5, 6), B: _records(7)}]
    service = Service(consumer)
    stop = asyncio.Event()

    async def handled_then_stop(
        records: Sequence[tuple[TopicPartition, Any]],
    ) -> None:
        service.handled.append([(tp, r.offset) for tp, r in records])
        stop.set()

    service.process_records = handled_then_stop  # type: ignore[method-assign]
    await asyncio.wait_for(service.run(stop), 5)
    assert service.handled == [[(A, 5), (A, 6)]]
    assert consumer.commits == [{A: 7}]


async def test_a_revoke_waits_for_the_batch_in_hand() -> None:
    service = Service(FakeConsumer({A}))
    listener = service.rebalance_listener()
    await service._batch_lock.acquire()
    revoke = asyncio.create_task(listener.on_partitions_revoked({A}))
    await asyncio.sleep(0.05)
    assert service.revoked == [] and not revoke.done()

    service._batch_lock.release()
    await asyncio.wait_for(revoke, 5)
    assert service.revoked == [{A}] and service.timed_out == []
    assert not service._batch_lock.locked()


async def test_a_bounded_revoke_goes_on_without_the_hand_over() -> None:
    service = Service(FakeConsumer({A}))
    service.wait_s = 0.05
    listener = service.rebalance_listener()
    await service._batch_lock.acquire()
    try:
        await asyncio.wait_for(listener.on_partitions_revoked({A}), 5)
    finally:
        service._batch_lock.release()
    assert service.revoked == [] and service.timed_out == [{A}]


async def test_an_assignment_marks_the_service_assigned() -> None:
    service = Service(FakeConsumer({A}))
    assert not service.assigned.is_set()
    await service.rebalance_listener().on_partitions_assigned(set())
    assert service.assigned.is_set()


def test_a_taken_guard_metrics_port_is_a_config_error_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        with pytest.raises(ConfigError, match=r"feedback\.metrics_port .* not free"):
            GuardMetrics().serve("127.0.0.1", port)
