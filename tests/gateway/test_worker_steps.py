"""Unit tests of the worker's batch steps that need no broker or Redis:
admission outcomes become their refusal codes (gateway/intake.py), placement
is checked against the client id, and a held-back answer holds the commit
(gateway/held.py). The whole path runs in tests/integration/test_worker.py."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import cast

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from gateway import protocol
from gateway.batch import BatchItem
from gateway.enforce import decided_without_store
from gateway.errors import AuthError
from gateway.held import HeldAnswers
from gateway.intake import admit_items, check_placement
from gateway.keys import ApiKey
from gateway.limits import Admitter
from gateway.metrics import WorkerMetrics
from gateway.store import Admission, AdmitItem


def _item(client: str, offset: int = 0, partition: int = 0) -> BatchItem:
    item = BatchItem(
        topic="t",
        partition=partition,
        offset=offset,
        value=b"",
        record_key=client,
        signature=None,
    )
    item.key = ApiKey(
        key_id=f"k-{client}",
        client_id=client,
        secret=b"s",
        models=(),
        status="active",
        created_ms=0,
    )
    item.request = protocol.InferRequest(
        v=1,
        request_id=f"r-{client}-{offset}",
        key_id=f"k-{client}",
        ts_ms=0,
        model="digits",
        inputs=[],
    )
    return item


class _Outcomes:
    """Stands in for ``Admitter``: answers each item with the next outcome."""

    def __init__(self, outcomes: list[str], *, without_store: bool = False) -> None:
        self._outcomes = outcomes
        self._without_store = without_store
        self.asked: list[AdmitItem] = []

    async def admit(self, items: Sequence[AdmitItem]) -> list[Admission]:
        self.asked = list(items)
        return [
            Admission(
                outcome,  # type: ignore[arg-type]  # the Outcome literals
                retry_after_ms=0,
                client_requests=i + 1,
                without_store=self._without_store,
            )
            for i, outcome in enumerate(self._outcomes)
        ]


# Every refusing outcome, the error code it answers with, the action recorded
# and whether the client may retry.
REFUSALS = [
    ("duplicate", "DUPLICATE_REQUEST", "reject", False),
    ("rate_limited", "RATE_LIMITED", "throttle", True),
    ("blocked", "BLOCKED", "block", True),
    ("quota_exceeded", "QUOTA_EXCEEDED", "throttle", True),
    ("too_many_in_flight", "TOO_MANY_IN_FLIGHT", "throttle", True),
    ("store_unavailable", "STORE_UNAVAILABLE", "reject", True),
]


@pytest.mark.parametrize(("outcome", "code", "action", "retriable"), REFUSALS)
async def test_each_refusing_admission_answers_its_code_and_action(
    outcome: str, code: str, action: str, retriable: bool
) -> None:
    item = _item("c")
    await admit_items([item], cast(Admitter, _Outcomes([outcome])))
    assert item.error is not None, outcome
    assert (item.error.code, item.action) == (code, action)
    assert item.error.retriable is retriable
    assert item.admission is not None and item.query_index == 1


async def test_admitted_and_redelivered_stay_live_and_refused_are_not_asked() -> None:
    items = [_item("a", 0), _item("b", 1), _item("c", 2)]
    items[2].fail(AuthError("bad signature", code="AUTH_BAD_SIGNATURE"))
    admitter = _Outcomes(["ok", "redelivery"])
    await admit_items(items, cast(Admitter, admitter))
    # The failed item is not asked about; the delivery names partition:offset.
    assert [a.delivery for a in admitter.asked] == ["0:0", "0:1"]
    assert items[0].error is None and items[1].error is None
    assert items[0].action == "allow"
    assert not decided_without_store(items)


async def test_a_decision_without_redis_is_seen_as_such() -> None:
    items = [_item("a")]
    await admit_items(items, cast(Admitter, _Outcomes(["ok"], without_store=True)))
    assert decided_without_store(items)


class _Partitions:
    def __init__(self, partitions: set[int]) -> None:
        self._partitions = partitions

    def partitions_for_topic(self, topic: str) -> set[int]:
        return self._partitions


def test_a_record_keyed_by_another_client_is_refused() -> None:
    item = _item("mallory")
    consumer = cast(AIOKafkaConsumer, _Partitions({0}))
    with pytest.raises(AuthError) as caught:
        check_placement(item, "victim", consumer)
    assert caught.value.code == "AUTH_WRONG_PARTITION"


def test_a_record_on_another_partition_than_its_clients_is_refused() -> None:
    consumer = cast(AIOKafkaConsumer, _Partitions({0, 1, 2, 3}))
    placed = [p for p in range(4) if _placed(_item("alice", partition=p), consumer)]
    # Exactly one partition is the client's (murmur2 of its id, as producers do).
    assert len(placed) == 1, placed


def _placed(item: BatchItem, consumer: AIOKafkaConsumer) -> bool:
    try:
        check_placement(item, "alice", consumer)
    except AuthError as exc:
        assert exc.code == "AUTH_WRONG_PARTITION"
        return False
    return True


async def test_a_held_answer_holds_its_partitions_commit_until_sent() -> None:
    held = HeldAnswers(lambda: None, WorkerMetrics(), request_timeout_s=1.0)
    late = _item("slow", offset=7)
    late.delay_s = 30.0
    tp, other = TopicPartition("t", 0), TopicPartition("t", 1)
    held.send_later(late, "replies", None, block_cooldown_ms=0)
    # A retried batch does not hold the same record twice.
    held.send_later(late, "replies", None, block_cooldown_ms=0)
    await asyncio.sleep(0)  # the send task starts its wait
    try:
        assert held.committable({tp: 12, other: 5}) == {tp: 7, other: 5}
        assert held.partitions() == {tp}
    finally:
        tasks = list(held._delayed[tp].values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # Once the answer is gone the partition commits as far as its batches went.
    assert held.committable({tp: 12}) == {tp: 12}


def test_an_oversize_request_is_answered_not_only_dead_lettered() -> None:
    """A request over kafka.max_message_bytes (32 rows of a wide model, say)
    was refused without reading its request id, so its sender got no answer
    and waited out its timeout, retrying; the reply fields are read as for
    any other invalid request."""
    from types import SimpleNamespace

    import numpy as np

    from gateway.batch import response_for
    from gateway.intake import decode

    _, value, headers = protocol.build_request(
        key_id="mgk_000000000001",
        secret=b"s" * 32,
        model="digits",
        inputs={"pixels": np.ones((32, 2000), dtype=np.float32)},
        request_id="r-big",
        reply_to="modelgate.responses.fd-1",
    )
    record = SimpleNamespace(
        value=value, key=b"c", headers=headers, offset=7, timestamp=1
    )
    item = decode(TopicPartition("modelgate.requests", 0), record, 64 * 1024)
    assert item.error is not None and item.error.code == "PAYLOAD_TOO_LARGE"
    assert (item.request_id, item.reply_to) == ("r-big", "modelgate.responses.fd-1")
    answer = response_for(item, 0, 0)
    assert answer.error is not None, answer
    assert (answer.request_id, answer.error.code) == ("r-big", "PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize(
    ("timestamp_type", "judged_when_sent"), [(1, True), (0, False)]
)
def test_only_a_broker_timestamp_dates_a_request_for_its_rate(
    timestamp_type: int, judged_when_sent: bool
) -> None:
    """Admission judges the rate at the record's timestamp only when the
    broker set it (LogAppendTime): a producer's CreateTime is the client's
    own to choose, and a thief could date a burst as a slow trickle."""
    from types import SimpleNamespace

    import numpy as np

    from gateway.intake import admit_item, decode
    from gateway.keys import ApiKey

    _, value, headers = protocol.build_request(
        key_id="mgk_000000000001",
        secret=b"s" * 32,
        model="digits",
        inputs={"pixels": np.ones((1, 64), dtype=np.float32)},
        request_id="r-1",
    )
    record = SimpleNamespace(
        value=value,
        key=b"c",
        headers=headers,
        offset=3,
        timestamp=1_765_000_000_123,
        timestamp_type=timestamp_type,
    )
    item = decode(TopicPartition("modelgate.requests", 0), record, 1 << 20)
    assert item.error is None and item.request is not None
    item.key = cast(
        ApiKey, SimpleNamespace(client_id="carol", plan="default", limit_overrides="")
    )
    sent_us = admit_item(item).sent_us
    assert sent_us == (1_765_000_000_123_000 if judged_when_sent else None)
