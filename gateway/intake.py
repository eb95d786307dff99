"""The first steps of a worker batch: decode, authenticate, validate, admit.

Each step refuses the records it must (``BatchItem.fail``) and leaves the rest
for the next; a refused record still gets its answer, decision and, for a bad
message, a dead-letter record when the batch is produced (gateway/answers.py).
Authentication and admission read Redis (through ``KeyStore`` and
``Admitter``); decoding and validation are pure.

The worker (gateway/worker.py) calls these in order; this module holds no state
of its own and imports no Kafka client beyond the consumer it is handed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from gateway import protocol
from gateway.backends import ModelBackend
from gateway.batch import BatchItem, decode_record
from gateway.config import Settings
from gateway.errors import (
    AuthError,
    ModelgateError,
    PolicyError,
    StoreError,
    ValidationError,
)
from gateway.keys import KeyStore, authenticate
from gateway.limits import Admitter
from gateway.metrics import WorkerMetrics
from gateway.store import AdmitItem
from gateway.validation import validate_request

logger = logging.getLogger(__name__)

# The producer's default partitioner (murmur2, as Kafka's Java client), so
# that the partition a client's records must be on is the one they land on.
_PARTITIONER = DefaultPartitioner()


def decode(tp: TopicPartition, record: Any, max_bytes: int) -> BatchItem:
    """Decode one consumer record into a batch item; never raises.

    Parameters
    ----------
    tp
        The record's topic and partition.
    record
        The aiokafka ``ConsumerRecord``.
    max_bytes
        Largest accepted message value, in bytes (``kafka.max_message_bytes``).

    Returns
    -------
    BatchItem
        The decoded item, already failed (``MALFORMED``, ``SCHEMA_*``...) when
        the message is bad, or ``INTERNAL`` when the decoder itself broke.
    """
    try:
        return decode_record(tp.topic, tp.partition, record, max_bytes)
    except Exception:
        # Whatever the codec does with hostile bytes costs this record,
        # never the worker: it is dead-lettered as INTERNAL.
        logger.exception(
            "decoder failed",
            extra={"partition": tp.partition, "offset": record.offset},
        )
        item = BatchItem(
            topic=tp.topic,
            partition=tp.partition,
            offset=record.offset,
            value=record.value or b"",
            record_key="",
            signature=None,
        )
        item.fail(ModelgateError("could not decode the message", code="INTERNAL"))
        return item


async def authenticate_items(
    items: list[BatchItem],
    keys: KeyStore,
    consumer: AIOKafkaConsumer,
    settings: Settings,
    metrics: WorkerMetrics,
) -> None:
    """Check each live item's HMAC signature, clock and placement.

    Sets ``item.key`` on success and fails the item otherwise.

    Raises
    ------
    StoreError
        Redis is unreachable, some key ids are not cached and the limits'
        default fail mode is ``"retry"`` (the batch is then served again).
    """
    live = [i for i in items if i.error is None and i.request is not None]
    if not live:
        return
    # Redis unreachable: keys this worker read recently come from its
    # cache, and admission applies each plan's fail mode. A key not in the
    # cache has no plan to ask, so the limits' default fail mode decides:
    # "retry" retries the batch (StoreError), otherwise its requests are
    # refused STORE_UNAVAILABLE.
    found, unavailable = await keys.get_many_or_stale(
        {i.request.key_id for i in live if i.request}
    )
    if unavailable and settings.limits.fail_mode == "retry":
        raise StoreError("redis unreachable and api keys not cached")
    now_ms = protocol.now_ms()
    max_skew_ms = int(settings.auth.max_clock_skew_s * 1000)
    for item in live:
        request = item.request
        assert request is not None
        if request.key_id in unavailable:
            metrics.decisions_without_store.labels("closed").inc()
            item.fail(StoreError("the key store is unreachable; retry later"))
            continue
        try:
            key = authenticate(
                found.get(request.key_id),
                item.value,
                item.signature,
                request.ts_ms,
                request.model,
                now_ms,
                max_skew_ms,
            )
            check_placement(item, key.client_id, consumer)
        except ModelgateError as exc:
            item.fail(exc)
        else:
            item.key = key


def check_placement(
    item: BatchItem, client_id: str, consumer: AIOKafkaConsumer
) -> None:
    """Refuse a record not keyed, or not partitioned, by its client's id.

    Each worker must see the whole stream of the clients it owns (the
    detectors judge a stream, not a query), so a client may not spread its
    queries over partitions by varying the record key or by choosing a
    partition itself.

    Raises
    ------
    AuthError
        ``AUTH_WRONG_PARTITION``, with the partition the record belongs on
        when the key is right but the partition is not.
    """
    if item.record_key != client_id:
        raise AuthError(
            "the record key must be the API key's client id",
            code="AUTH_WRONG_PARTITION",
        )
    partitions = consumer.partitions_for_topic(item.topic)
    if partitions:
        ids = sorted(partitions)
        expected = _PARTITIONER(client_id.encode("utf-8"), ids, ids)
        if expected != item.partition:
            raise AuthError(
                f"a record of this client belongs on partition {expected}",
                code="AUTH_WRONG_PARTITION",
            )


def validate_items(items: list[BatchItem], models: dict[str, ModelBackend]) -> None:
    """Attach each live item's model and validated input rows, or fail it
    (``UNKNOWN_MODEL`` or the validation error's code)."""
    for item in items:
        if item.error is not None or item.request is None:
            continue
        model = models.get(item.request.model)
        if model is None:
            item.fail(
                ValidationError(
                    f"model {item.request.model!r} is not served",
                    code="UNKNOWN_MODEL",
                )
            )
            continue
        item.model = model
        try:
            item.rows = validate_request(item.request, model.signature)
        except ValidationError as exc:
            item.fail(exc)


def _policy_refusal(
    message: str, code: str, *, retriable: bool = True
) -> Callable[[BatchItem], ModelgateError]:
    def build(_item: BatchItem) -> ModelgateError:
        return PolicyError(message, code=code, retriable=retriable)

    return build


def _duplicate(item: BatchItem) -> ModelgateError:
    return PolicyError(
        f"request id {item.request_id!r} was already used",
        code="DUPLICATE_REQUEST",
    )


def _store_unavailable(_item: BatchItem) -> ModelgateError:
    return StoreError("the counter store is unreachable; retry later")


# Admission outcome -> (the refusal's error, the action recorded); "ok" and
# any outcome not named here leave the item live.
_REFUSALS: dict[str, tuple[Callable[[BatchItem], ModelgateError], str]] = {
    "duplicate": (_duplicate, "reject"),
    "rate_limited": (
        _policy_refusal("rate limit exceeded", "RATE_LIMITED"),
        "throttle",
    ),
    "blocked": (_policy_refusal("client is blocked", "BLOCKED"), "block"),
    "quota_exceeded": (
        _policy_refusal(
            "daily quota used up; it resets at midnight UTC", "QUOTA_EXCEEDED"
        ),
        "throttle",
    ),
    "too_many_in_flight": (
        _policy_refusal("too many requests in flight", "TOO_MANY_IN_FLIGHT"),
        "throttle",
    ),
    "store_unavailable": (_store_unavailable, "reject"),
}


def admit_item(item: BatchItem) -> AdmitItem:
    """What admission (and the throttle, for the plan) sees of an
    authenticated item."""
    if item.key is None or item.request is None:
        raise ValueError("only an authenticated, decoded item can be admitted")
    return AdmitItem(
        client_id=item.key.client_id,
        request_id=item.request.request_id,
        delivery=f"{item.partition}:{item.offset}",
        cost=1,
        plan=item.key.plan,
        overrides=item.key.limit_overrides,
        sent_us=item.arrived_s * 1e6 if item.stamped_by_broker else None,
    )


async def admit_items(items: list[BatchItem], admitter: Admitter) -> None:
    """Count the live items against their plans in one Redis round trip.

    Sets ``item.admission`` and ``item.query_index`` and fails the items the
    admission refused (duplicate id, rate, block, quota, in-flight, store).

    Raises
    ------
    StoreError
        Redis is unreachable and the fail mode is ``"retry"``.
    """
    live = [
        i
        for i in items
        if i.error is None and i.key is not None and i.request is not None
    ]
    if not live:
        return
    admit = [admit_item(i) for i in live]
    # Redis unreachable: each rule's fail mode decides (gateway.limits).
    # In the default mode, "retry", StoreError propagates and the batch is
    # retried. Answering it as refused would be worse: if the script did
    # run before the connection failed, the client's retry under the same
    # request id would then be refused as a duplicate; "closed" accepts
    # that risk for an answer now.
    admissions = await admitter.admit(admit)
    for item, admission in zip(live, admissions, strict=True):
        item.admission = admission
        item.query_index = admission.client_requests
        refusal = _REFUSALS.get(admission.outcome)
        if refusal is not None:
            build, action = refusal
            item.fail(build(item), action=action)
