"""The poisoning guard's per-record steps around the screening: a consumed
record's way to a verdict, and the verdict's way out.

Before the screening: :func:`decode` (size, JSON, schema, version),
:func:`authenticate` (the request path's HMAC check,
``gateway.keys.authenticate``; the record key must be the key's client id,
on its client's partition) and :func:`validate` (the row against the model's
signature, one row, a known label). After it: the accepted or rejected
message of each record (:func:`accepted_message`, :func:`rejected_message`)
and the label values the guard's metrics count it under
(:func:`verdict_labels`). Every step marks a refused record with its stable
code and never raises for a record's sake: a malformed record costs itself
only. The service that runs these steps in order, screens, keeps the
submitters' state and commits is gateway/feedback.py.

Imports aiokafka (for the partition of a record), the gateway's keys,
protocol, validation and backends, and the detector library's verdict; no
Redis client and no producer.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from detectors.poisoning import Verdict
from gateway import protocol
from gateway.backends import ModelBackend
from gateway.config import Settings
from gateway.errors import AuthError, ModelgateError, StoreError, ValidationError
from gateway.feedback_wire import (
    FEEDBACK_CODES,
    SCHEMA_VERSION,
    AcceptedFeedback,
    FeedbackEnvelope,
    FeedbackRecord,
    RejectedFeedback,
    decode_envelope,
    decode_feedback,
    encode,
    kept_value,
    schema_code,
)
from gateway.keys import KeyStore
from gateway.keys import authenticate as authenticate_key
from gateway.validation import validate_request

logger = logging.getLogger(__name__)

_PARTITIONER = DefaultPartitioner()
_MAX_MESSAGE_CHARS = 300


@dataclass
class FeedbackItem:
    """One consumed record on its way to a verdict."""

    tp: TopicPartition
    offset: int
    value: bytes
    record_key: str
    signature: str | None
    record: FeedbackRecord | None = None
    envelope: FeedbackEnvelope | None = None
    client_id: str | None = None
    row: np.ndarray[Any, Any] | None = None
    label_index: int = -1
    error: ModelgateError | None = None
    verdict: Verdict | None = None
    proba: np.ndarray[Any, Any] | None = field(default=None, repr=False)

    def fail(self, error: ModelgateError) -> None:
        if self.error is None:
            self.error = error


def decode(tp: TopicPartition, record: Any, max_bytes: int) -> FeedbackItem:
    """Size, JSON and schema checks of one consumer record; never raises."""
    value: bytes = record.value or b""
    signature, signatures = protocol.read_signature(record.headers)
    item = FeedbackItem(
        tp=tp,
        offset=record.offset,
        value=value,
        record_key=(record.key or b"").decode("utf-8", "replace"),
        signature=signature,
    )
    if len(value) > max_bytes:
        item.fail(
            ValidationError(
                f"message of {len(value)} bytes exceeds the limit of {max_bytes}",
                code="PAYLOAD_TOO_LARGE",
            )
        )
        # Its sender reads the rejected topic by feedback id, as a request's
        # sender waits on its request id (``gateway.batch``): read the ids.
        # The value is already in memory and no larger than a fetch, so the
        # parse is bounded; the record itself is never decoded.
        item.envelope = decode_envelope(value)
        return item
    if signatures > 1:
        # Refused before the key is looked up: which signature counts would
        # be the reader's guess. The value is still decoded, to answer.
        item.fail(
            AuthError(
                protocol.duplicate_signature_message(signatures),
                code="AUTH_BAD_SIGNATURE",
            )
        )
    try:
        item.record = decode_feedback(value)
    except msgspec.ValidationError as exc:
        item.envelope = decode_envelope(value)
        item.fail(ValidationError(clip(f"schema: {exc}"), code=schema_code(exc)))
    except protocol.DECODE_ERRORS as exc:
        item.fail(ValidationError(clip(f"not JSON: {exc}"), code="MALFORMED_JSON"))
    except Exception:
        # Whatever the codec does with hostile bytes costs this record only.
        logger.exception(
            "feedback decoder failed",
            extra={"partition": tp.partition, "offset": record.offset},
        )
        item.fail(ModelgateError("could not decode the message", code="INTERNAL"))
    if item.record is not None and item.record.v != SCHEMA_VERSION:
        item.fail(
            ValidationError(
                f"schema version {item.record.v} is not supported "
                f"(expected {SCHEMA_VERSION})",
                code="UNSUPPORTED_VERSION",
            )
        )
    return item


async def authenticate(
    items: list[FeedbackItem],
    keys: KeyStore,
    consumer: AIOKafkaConsumer,
    settings: Settings,
) -> None:
    """The request path's signature, clock and scope check, and the record
    key must be the key's client id (on its partition).

    Raises
    ------
    StoreError
        Redis is unreachable and a key is not cached: no verdict can be
        given, the batch is retried.
    """
    live = [i for i in items if i.error is None and i.record is not None]
    if not live:
        return
    found, unavailable = await keys.get_many_or_stale(
        {i.record.key_id for i in live if i.record is not None}
    )
    if unavailable:
        # Without the key there is no verdict; retry the batch later.
        raise StoreError("redis unreachable and api keys not cached")
    now_ms = protocol.now_ms()
    skew_ms = int(settings.auth.max_clock_skew_s * 1000)
    for item in live:
        record = item.record
        assert record is not None
        try:
            key = authenticate_key(
                found.get(record.key_id),
                item.value,
                item.signature,
                record.ts_ms,
                record.model,
                now_ms,
                skew_ms,
            )
            _check_placement(item, key.client_id, consumer)
        except AuthError as exc:
            item.fail(exc)
        else:
            item.client_id = key.client_id


def _check_placement(
    item: FeedbackItem, client_id: str, consumer: AIOKafkaConsumer
) -> None:
    """One submitter's records on one partition, keyed by its client id,
    so that one guard sees its whole stream (as ``intake.check_placement``
    for requests)."""
    if item.record_key != client_id:
        raise AuthError(
            "the record key must be the API key's client id",
            code="AUTH_WRONG_PARTITION",
        )
    partitions = consumer.partitions_for_topic(item.tp.topic)
    if partitions:
        ids = sorted(partitions)
        expected = _PARTITIONER(client_id.encode("utf-8"), ids, ids)
        if expected != item.tp.partition:
            raise AuthError(
                f"a record of this client belongs on partition {expected}",
                code="AUTH_WRONG_PARTITION",
            )


def validate(
    items: list[FeedbackItem],
    models: Mapping[str, ModelBackend],
    screened: Collection[str],
) -> None:
    """The row against the model's signature, and the label; ``screened``
    names the models this guard takes feedback for."""
    for item in items:
        record = item.record
        if item.error is not None or record is None:
            continue
        model = models.get(record.model)
        if model is None or record.model not in screened:
            item.fail(
                ValidationError(
                    f"model {record.model!r} takes no feedback here",
                    code="UNKNOWN_MODEL",
                )
            )
            continue
        request = protocol.InferRequest(
            v=protocol.SCHEMA_VERSION,
            request_id=record.feedback_id,
            key_id=record.key_id,
            ts_ms=record.ts_ms,
            model=record.model,
            inputs=record.inputs,
        )
        try:
            rows = validate_request(request, model.signature)
        except ValidationError as exc:
            item.fail(exc)
            continue
        if len(rows) != 1:
            item.fail(
                ValidationError(
                    f"a feedback record holds one row, got {len(rows)}",
                    code="SHAPE_MISMATCH",
                )
            )
            continue
        classes = model.signature.classes
        if record.label not in classes:
            item.fail(
                ValidationError(
                    f"label {record.label} is not a class of {record.model}",
                    code="UNKNOWN_LABEL",
                )
            )
            continue
        item.row = rows[0]
        item.label_index = classes.index(record.label)


def is_accepted(item: FeedbackItem, shadow: bool) -> bool:
    """Whether ``item`` goes to the accepted topic: a valid record the
    checks passed, or (in shadow mode) any valid record they judged."""
    verdict = item.verdict
    return item.error is None and verdict is not None and (verdict.accepted or shadow)


def accepted_message(
    item: FeedbackItem, verdict: Verdict, shadow: bool
) -> tuple[bytes | None, bytes]:
    """The key and value of ``item``'s accepted record."""
    record = item.record
    assert record is not None and item.client_id is not None
    refused = not verdict.accepted
    message = AcceptedFeedback(
        v=SCHEMA_VERSION,
        feedback_id=record.feedback_id,
        client_id=item.client_id,
        key_id=record.key_id,
        model=record.model,
        label=record.label,
        inputs=record.inputs,
        ts_ms=record.ts_ms,
        partition=item.tp.partition,
        offset=item.offset,
        scores=verdict.scores,
        shadow=shadow,
        would_reject=verdict.code if refused else None,
        detector=verdict.detector if refused else None,
        evidence=verdict.evidence if refused else None,
    )
    return item.client_id.encode("utf-8"), encode(message)


def rejected_message(item: FeedbackItem, now_ms: int) -> tuple[bytes | None, bytes]:
    """The key and value of ``item``'s rejected record."""
    record, verdict, error = item.record, item.verdict, item.error
    if error is not None:
        # Clipped: validation messages quote the record (a shape of
        # 400,000 dimensions fits a 1 MiB message and made a 1.2 MB
        # rejection, which the producer refused on every retry).
        code, message, retriable = error.code, clip(error.message), error.retriable
        detector = evidence = None
        scores: dict[str, float] = {}
    else:
        assert verdict is not None and verdict.code is not None
        code, retriable = verdict.code, False
        message = f"refused by the poisoning guard ({verdict.detector})"
        detector, evidence, scores = (
            verdict.detector,
            verdict.evidence,
            verdict.scores,
        )
    authenticated = item.client_id is not None
    rejected = RejectedFeedback(
        v=SCHEMA_VERSION,
        code=code,
        message=message,
        topic=item.tp.topic,
        partition=item.tp.partition,
        offset=item.offset,
        ts_ms=now_ms,
        retriable=retriable,
        feedback_id=record.feedback_id
        if record
        else (item.envelope.feedback_id if item.envelope else None),
        # Only a proven identity is named; a record that failed
        # authentication names the key id it claimed, nothing more.
        client_id=item.client_id,
        key_id=record.key_id
        if record
        else (item.envelope.key_id if item.envelope else None),
        model=record.model if record and authenticated else None,
        label=record.label if record and authenticated else None,
        detector=detector,
        evidence=evidence,
        scores=scores,
        **kept_value(item.value),
    )
    key = item.client_id.encode("utf-8") if item.client_id else None
    return key, encode(rejected)


def verdict_labels(
    item: FeedbackItem, shadow: bool, screened: Collection[str]
) -> tuple[str, str, str, str]:
    """``(model, verdict, code, detector)`` of ``item`` for the guard's
    metrics, each from a bounded set: the model only for an authenticated
    record of a model the guard screens (as the rejected record names it),
    else ``""``; a code outside ``FEEDBACK_CODES`` as ``OTHER`` (none is
    expected)."""
    model = ""
    record = item.record
    if record is not None and item.client_id is not None and record.model in screened:
        model = record.model
    if is_accepted(item, shadow):
        return model, "accepted", "", ""
    verdict = item.verdict
    if item.error is not None:
        code, detector = item.error.code, ""
    else:
        assert verdict is not None
        code, detector = verdict.code or "", verdict.detector or ""
    return model, "rejected", code if code in FEEDBACK_CODES else "OTHER", detector


def log_rejection(item: FeedbackItem) -> None:
    """One INFO line per rejected record, with its code and whose it was."""
    code = (
        item.error.code if item.error else (item.verdict.code if item.verdict else None)
    )
    logger.info(
        "feedback rejected",
        extra={
            "client": item.client_id,
            "request": item.record.feedback_id if item.record else None,
            "code": code,
            "detector": item.verdict.detector if item.verdict else None,
            "partition": item.tp.partition,
            "offset": item.offset,
        },
    )


def clip(message: str) -> str:
    """Codec messages quote the input; keep rejected records small."""
    if len(message) <= _MAX_MESSAGE_CHARS:
        return message
    return message[: _MAX_MESSAGE_CHARS - 1] + "…"
