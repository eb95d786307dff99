"""One record's journey through a worker batch, and the messages it produces.

``BatchItem`` carries a consumer record from decoding to its answer; the
functions here turn a finished item into its response, decision record,
dead-letter record and alerts. Pure: no Kafka or Redis I/O happens here.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from gateway import protocol
from gateway.alerts import alert_id, build_alert
from gateway.backends import ModelBackend
from gateway.errors import AuthError, ModelgateError, ValidationError
from gateway.keys import ApiKey
from gateway.policy import Verdict
from gateway.store import Admission

# Codes that mean "the message itself is bad": these also go to the dead-letter
# topic. Refusals by policy (throttle, block, duplicate) are answers, not faults.
_DEADLETTER_PREFIXES = ("AUTH_", "MALFORMED", "SCHEMA", "UNSUPPORTED", "PAYLOAD")
_DEADLETTER_CODES = frozenset(
    {
        "UNKNOWN_MODEL",
        "TENSOR_NAME",
        "SHAPE_MISMATCH",
        "DTYPE_MISMATCH",
        "NON_FINITE",
        "OUT_OF_RANGE",
        "INTERNAL",
    }
)


_MAX_MESSAGE_CHARS = 500
# Kafka's timestamp type of a record whose timestamp the broker set.
_LOG_APPEND_TIME = 1
# A dead letter keeps the head of the original value, its length and digest:
# enough to diagnose it, never enough to exceed Kafka's 1 MiB record limit
# (which would stall the partition on the dead-letter produce itself).
DEADLETTER_VALUE_BYTES = 64 * 1024


def goes_to_deadletter(code: str) -> bool:
    return code in _DEADLETTER_CODES or code.startswith(_DEADLETTER_PREFIXES)


@dataclass(slots=True)
class BatchItem:
    """One consumer record on its way through a batch.

    Stages fill the fields in order; the first failure sets ``error`` and later
    stages skip the item, but it is still answered.
    """

    topic: str
    partition: int
    offset: int
    value: bytes
    record_key: str
    signature: str | None
    envelope: protocol.RequestEnvelope | None = None
    request: protocol.InferRequest | None = None
    key: ApiKey | None = None
    model: ModelBackend | None = None
    rows: np.ndarray | None = None
    admission: Admission | None = None
    verdict: Verdict | None = None
    scores: dict[str, float] = field(default_factory=dict)
    probabilities: np.ndarray | None = None
    error: ModelgateError | None = None
    action: str = "allow"
    query_index: int = 0
    # The kept answer when this request is a retry of one already served
    # (gateway/replay.py); such an item skips admission, scoring and the model.
    replay: protocol.InferResponse | None = None
    # Policy's shaping of the answer (None: full), the delay before it is
    # sent, and whether the response conceals the action (hidden suspicion).
    degrade: str | None = None
    delay_s: float = 0.0
    hidden: bool = False
    # Retry-after of a refusal decided outside admission (the throttle bucket).
    throttle_retry_ms: int = 0
    # Set by gateway.groups: the client's group of linked keys and the largest
    # risk of any member (the client's own when it is alone).
    group_id: str | None = None
    group_risk: float = 0.0
    # When the request reached Kafka (the record's timestamp, wall clock,
    # seconds); 0.0 when unknown. The traffic detector reads it.
    arrived_s: float = 0.0
    # True when the broker set that timestamp (a LogAppendTime topic, as
    # gateway.topics creates the request topic): only then may admission
    # judge the rate at it, since a producer's own timestamp is the client's
    # to choose.
    stamped_by_broker: bool = False

    @property
    def client_id(self) -> str | None:
        return self.key.client_id if self.key is not None else None

    @property
    def request_id(self) -> str | None:
        if self.request is not None:
            return self.request.request_id
        return self.envelope.request_id if self.envelope is not None else None

    @property
    def key_id(self) -> str | None:
        if self.request is not None:
            return self.request.key_id
        return self.envelope.key_id if self.envelope is not None else None

    @property
    def reply_to(self) -> str | None:
        if self.request is not None:
            return self.request.reply_to
        return self.envelope.reply_to if self.envelope is not None else None

    @property
    def correlation_id(self) -> str | None:
        if self.request is not None:
            return self.request.correlation_id
        return self.envelope.correlation_id if self.envelope is not None else None

    @property
    def model_name(self) -> str | None:
        if self.model is not None:
            return self.model.name
        return self.request.model if self.request is not None else None

    def fail(self, error: ModelgateError, action: str = "reject") -> None:
        """Record the first failure; later ones would only hide its cause."""
        if self.error is None:
            self.error = error
            self.action = action


def decode_record(topic: str, partition: int, record: Any, max_bytes: int) -> BatchItem:
    """Turn a consumer record into a batch item: size check, then the codec."""
    value: bytes = record.value or b""
    signature, signatures = protocol.read_signature(record.headers)
    item = BatchItem(
        topic=topic,
        partition=partition,
        offset=record.offset,
        value=value,
        record_key=(record.key or b"").decode("utf-8", "replace"),
        signature=signature,
    )
    timestamp_ms = getattr(record, "timestamp", None)
    if isinstance(timestamp_ms, int) and timestamp_ms > 0:
        item.arrived_s = timestamp_ms / 1000.0
        item.stamped_by_broker = (
            getattr(record, "timestamp_type", None) == _LOG_APPEND_TIME
        )
    if len(value) > max_bytes:
        item.fail(
            ValidationError(
                f"message of {len(value)} bytes exceeds the limit of {max_bytes}",
                code="PAYLOAD_TOO_LARGE",
            )
        )
        # Its sender is still waiting: read the reply fields, as for any
        # invalid request. The value is already in memory and no larger than
        # a fetch (the consumer's max_partition_fetch_bytes), so this parse
        # is bounded; the request itself is never decoded.
        item.envelope = protocol.decode_envelope(value)
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
        item.request = protocol.decode_request(value)
    except msgspec.ValidationError as exc:
        item.envelope = protocol.decode_envelope(value)
        item.fail(ValidationError(_clip(f"schema: {exc}"), code=_schema_code(exc)))
    except protocol.DECODE_ERRORS as exc:
        item.fail(ValidationError(_clip(f"not JSON: {exc}"), code="MALFORMED_JSON"))
    return item


def _schema_code(exc: msgspec.ValidationError) -> str:
    """SCHEMA_INVALID, except for a tensor value too large for a number type
    (1e999, a 400-digit integer): an infinity in all but name, so NON_FINITE."""
    text = str(exc)
    if "out of range" in text and "].data[" in text:
        return "NON_FINITE"
    return "SCHEMA_INVALID"


def _clip(message: str) -> str:
    """Error messages quote the offending input; keep them short so that an
    answer can never approach Kafka's record size limit."""
    if len(message) <= _MAX_MESSAGE_CHARS:
        return message
    return message[: _MAX_MESSAGE_CHARS - 1] + "…"


def response_for(
    item: BatchItem, now_ms: int, block_cooldown_ms: int
) -> protocol.InferResponse:
    """The answer the client sees: outputs, or the error with its code."""
    if item.replay is not None:
        return item.replay
    if item.error is not None:
        retry_after = None
        if item.admission is not None and item.error.code in (
            "RATE_LIMITED",
            "BLOCKED",
            "QUOTA_EXCEEDED",
            "TOO_MANY_IN_FLIGHT",
        ):
            retry_after = (
                item.throttle_retry_ms or item.admission.retry_after_ms or None
            )
        if item.error.code == "BLOCKED" and retry_after is None:
            retry_after = block_cooldown_ms
        return protocol.InferResponse(
            v=protocol.SCHEMA_VERSION,
            request_id=item.request_id or "",
            status="error",
            ts_ms=now_ms,
            model=item.model_name,
            correlation_id=item.correlation_id,
            action=item.action,
            error=protocol.ErrorBody(
                item.error.code, _clip(item.error.message), item.error.retriable
            ),
            retry_after_ms=retry_after,
            rate=rate_info(item),
        )
    if item.probabilities is None:
        raise ValueError("an item without error must have probabilities")
    labels = item.probabilities.argmax(axis=1).astype(np.int64)
    # Hidden suspicion: an answer looks like any other (action allow, no
    # degrade level); the decision record keeps the truth.
    return protocol.InferResponse(
        v=protocol.SCHEMA_VERSION,
        request_id=item.request_id or "",
        status="ok",
        ts_ms=now_ms,
        model=item.model_name,
        correlation_id=item.correlation_id,
        action="allow" if item.hidden else item.action,
        degrade=None if item.hidden else item.degrade,
        outputs=[
            protocol.tensor_from_array("probabilities", item.probabilities),
            protocol.tensor_from_array("label", labels),
        ],
        rate=rate_info(item),
    )


def rate_info(item: BatchItem) -> protocol.RateInfo | None:
    """The client's rate window from its admission, if it got that far."""
    admission = item.admission
    if admission is None or admission.limit <= 0:
        return None
    return protocol.RateInfo(
        limit=admission.limit,
        remaining=admission.remaining,
        reset_ms=admission.reset_ms,
        window_s=admission.window_s,
    )


def decision_for(
    item: BatchItem, now_ms: int, worker_id: str
) -> protocol.DecisionRecord:
    """The audit record: what the rules said (even in shadow mode) and why."""
    verdict = item.verdict
    reasons = list(verdict.reasons) if verdict else []
    if item.replay is not None:
        # A retry answered from the replay cache was not scored again.
        reasons = ["replayed"]
    return protocol.DecisionRecord(
        v=protocol.SCHEMA_VERSION,
        request_id=item.request_id or "",
        ts_ms=now_ms,
        action=verdict.action if verdict is not None else item.action,
        client_id=item.client_id,
        key_id=item.key.key_id if item.key else None,
        model=item.model_name,
        error_code=item.error.code if item.error else None,
        risk=verdict.risk if verdict else 0.0,
        scores=item.scores,
        reasons=reasons,
        shadow=verdict.shadow if verdict else False,
        partition=item.partition,
        offset=item.offset,
        worker=worker_id,
        would_be_action=verdict.action if verdict else None,
        enforced_action=item.action,
        degrade=item.degrade,
        delay_ms=round(item.delay_s * 1000),
        hidden=item.hidden,
        group_id=item.group_id,
        group_risk=item.group_risk,
        top_detectors=[f"{n}:{v:.3f}" for n, v in verdict.top] if verdict else [],
    )


def deadletter_for(
    item: BatchItem, now_ms: int, worker_id: str
) -> protocol.DeadLetter | None:
    """The dead-letter record of a bad message, or None if it was not bad."""
    if item.error is None or not goes_to_deadletter(item.error.code):
        return None
    return protocol.DeadLetter(
        v=protocol.SCHEMA_VERSION,
        code=item.error.code,
        message=_clip(item.error.message),
        topic=item.topic,
        partition=item.partition,
        offset=item.offset,
        ts_ms=now_ms,
        request_id=item.request_id,
        key_id=item.key_id,
        value_b64=base64.b64encode(item.value[:DEADLETTER_VALUE_BYTES]).decode("ascii"),
        value_bytes=len(item.value),
        value_sha256=hashlib.sha256(item.value).hexdigest(),
        worker=worker_id,
    )


def _top_text(top: tuple[tuple[str, float], ...]) -> str:
    """The fused risk's top contributors, as a clause for alert evidence."""
    if not top:
        return ""
    return "; top contributors: " + ", ".join(f"{n} {v:.2f}" for n, v in top)


def alerts_for(item: BatchItem, worker_id: str) -> list[dict[str, Any]]:
    """One CloudEvent per detector that flagged this item's query."""
    verdict = item.verdict
    if verdict is None or item.key is None:
        return []
    return [
        build_alert(
            worker_id=worker_id,
            client_id=item.key.client_id,
            key_id=item.key.key_id,
            model=item.model_name or "",
            detector=s.detector,
            score=s.score,
            threshold=s.threshold,
            action=verdict.action,
            evidence=s.evidence + _top_text(verdict.top),
            request_id=item.request_id or "",
            query_index=item.query_index,
            shadow=verdict.shadow,
            event_id=alert_id(
                topic=item.topic,
                partition=item.partition,
                offset=item.offset,
                arrived_ms=round(item.arrived_s * 1000),
                detector=s.detector,
            ),
        )
        for s in verdict.flagged
    ]
