"""Wire formats of labelled feedback and of the poisoning guard's verdicts.

Feedback travels on ``kafka.topics.feedback`` as JSON values signed exactly as
requests are (``gateway.protocol``: the ``mg-sig`` header holds the
HMAC-SHA256 of ``b"mg1\\n" + value`` under the API key's secret), keyed by the
submitter's client id::

    {"v": 1, "feedback_id": "f-1", "key_id": "mgk_0123456789ab",
     "ts_ms": 1764000000000, "model": "digits",
     "inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
                 "data": [0.0, 3.0, ...]}],
     "label": 7}

One record is one row and its label (a class value of the model's
signature). Unknown fields are refused, so a signed inference request (which
has ``request_id``, no ``label``) can never pass as feedback, nor the reverse.

The guard writes each record to ``feedback_accepted`` (:class:`AcceptedFeedback`)
or ``feedback_rejected`` (:class:`RejectedFeedback`, with a code from
:data:`FEEDBACK_CODES`). Imports the standard library, numpy, msgspec and the
gateway's protocol, errors and the poisoning codes only.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import msgspec
import numpy as np

from detectors.poisoning import CODES as POISON_CODES
from gateway import protocol
from gateway.errors import ERROR_CODES
from gateway.protocol import Name, RequestId, Tensor

SCHEMA_VERSION = 1

# Original values are kept in a rejected record up to this many bytes (the
# dead-letter records' limit), with the whole value's size and hash.
_KEEP_VALUE_BYTES = 65_536


class FeedbackRecord(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One labelled row as a submitter produces it."""

    v: int
    feedback_id: RequestId
    key_id: Name
    ts_ms: int
    model: Name
    inputs: list[Tensor]
    label: int


class FeedbackEnvelope(msgspec.Struct, frozen=True):
    """The ids read, best effort, from a record that failed its schema, so
    that its rejection still names it. Unknown fields are ignored."""

    feedback_id: RequestId | None = None
    key_id: Name | None = None


class AcceptedFeedback(msgspec.Struct, frozen=True, omit_defaults=True):
    """A record the guard let through, for whatever learns from feedback.

    ``scores`` holds every check's value (``detectors.poisoning.Verdict``). In
    shadow mode a record the guard would have refused is here too, with
    ``would_reject``, ``detector`` and ``evidence`` set.
    """

    v: int
    feedback_id: str
    client_id: str
    key_id: str
    model: str
    label: int
    inputs: list[Tensor]
    ts_ms: int
    partition: int
    offset: int
    scores: dict[str, float] = {}
    shadow: bool = False
    would_reject: str | None = None
    detector: str | None = None
    evidence: str | None = None


class RejectedFeedback(msgspec.Struct, frozen=True, omit_defaults=True):
    """A record the guard refused, why, and where it was.

    ``value_b64`` holds the original value (its first 64 KiB), so the record
    can be inspected or sent again; the topic needs the same access control
    as the feedback topic.
    """

    v: int
    code: str
    message: str
    topic: str
    partition: int
    offset: int
    ts_ms: int
    retriable: bool = False
    feedback_id: str | None = None
    client_id: str | None = None
    key_id: str | None = None
    model: str | None = None
    label: int | None = None
    detector: str | None = None
    evidence: str | None = None
    scores: dict[str, float] = {}
    value_b64: str = ""
    value_bytes: int = 0
    value_sha256: str = ""


_GENERAL = (
    "MALFORMED_JSON",
    "SCHEMA_INVALID",
    "UNSUPPORTED_VERSION",
    "PAYLOAD_TOO_LARGE",
    "UNKNOWN_MODEL",
    "TENSOR_NAME",
    "SHAPE_MISMATCH",
    "DTYPE_MISMATCH",
    "NON_FINITE",
    "OUT_OF_RANGE",
    "AUTH_MISSING",
    "AUTH_UNKNOWN_KEY",
    "AUTH_REVOKED",
    "AUTH_EXPIRED",
    "AUTH_BAD_SIGNATURE",
    "AUTH_STALE",
    "AUTH_MODEL_FORBIDDEN",
    "AUTH_WRONG_PARTITION",
    "STORE_UNAVAILABLE",
    "BACKEND_ERROR",
    "INTERNAL",
)

FEEDBACK_CODES: dict[str, str] = {
    **{code: ERROR_CODES[code] for code in _GENERAL},
    "UNKNOWN_LABEL": "the label is not a class of the model's signature",
    **POISON_CODES,
}
"""Every code a rejected feedback record can carry, with its meaning. The
general ones mean what they mean for a request (``gateway.errors``); a
feedback record is one row (``SHAPE_MISMATCH`` otherwise)."""

_encoder = msgspec.json.Encoder()
_feedback_decoder = msgspec.json.Decoder(FeedbackRecord)
_rejected_decoder = msgspec.json.Decoder(RejectedFeedback)
_accepted_decoder = msgspec.json.Decoder(AcceptedFeedback)


def decode_feedback(value: bytes) -> FeedbackRecord:
    """Decode and schema-check a feedback value.

    Raises
    ------
    msgspec.ValidationError
        JSON of the wrong shape (missing, mistyped or unknown fields).
    msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError
        Not JSON (``protocol.DECODE_ERRORS``).
    """
    return _feedback_decoder.decode(value)


def decode_envelope(value: bytes) -> FeedbackEnvelope | None:
    """Best-effort ids of a value that failed decoding; ``None`` if even
    they cannot be read."""
    return protocol.salvage(value, FeedbackEnvelope)


def schema_code(exc: msgspec.ValidationError) -> str:
    """``SCHEMA_INVALID``, except for a tensor value too large for a number
    (1e999): an infinity in all but name, so ``NON_FINITE`` (as for requests,
    ``gateway.batch``)."""
    text = str(exc)
    if "out of range" in text and "].data[" in text:
        return "NON_FINITE"
    return "SCHEMA_INVALID"


def decode_rejected(value: bytes) -> RejectedFeedback:
    return _rejected_decoder.decode(value)


def decode_accepted(value: bytes) -> AcceptedFeedback:
    return _accepted_decoder.decode(value)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def kept_value(value: bytes) -> dict[str, Any]:
    """The ``value_*`` fields of a rejected record for ``value``."""
    return {
        "value_b64": base64.b64encode(value[:_KEEP_VALUE_BYTES]).decode("ascii"),
        "value_bytes": len(value),
        "value_sha256": hashlib.sha256(value).hexdigest(),
    }


def build_feedback(
    *,
    key_id: str,
    secret: bytes,
    model: str,
    input_name: str,
    row: np.ndarray[Any, Any],
    label: int,
    feedback_id: str | None = None,
    ts_ms: int | None = None,
) -> tuple[FeedbackRecord, bytes, list[tuple[str, bytes]]]:
    """A signed feedback record: the struct, its value bytes and its headers.

    ``row`` is one row of features (any shape of ``row_size`` elements); it is
    sent as shape ``[1, row_size]``.

    Examples
    --------
    >>> rec, value, headers = build_feedback(
    ...     key_id="k1", secret=b"s", model="digits", input_name="pixels",
    ...     row=np.zeros(64, dtype=np.float32), label=3)
    >>> rec.label, headers[0][0]
    (3, 'mg-sig')
    """
    flat = np.asarray(row).reshape(1, -1)
    record = FeedbackRecord(
        v=SCHEMA_VERSION,
        feedback_id=feedback_id or protocol.new_request_id(),
        key_id=key_id,
        ts_ms=protocol.now_ms() if ts_ms is None else ts_ms,
        model=model,
        inputs=[protocol.tensor_from_array(input_name, flat)],
        label=int(label),
    )
    value = _encoder.encode(record)
    signature = protocol.sign(secret, value).encode("ascii")
    return record, value, [(protocol.SIGNATURE_HEADER, signature)]
