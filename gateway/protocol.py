"""Wire formats: the versioned request, response, decision and alert messages.

Requests travel on ``modelgate.requests`` as JSON values; proof of the API key
travels in a Kafka header so that it can cover the exact value bytes without any
canonicalisation step. This module is shared by the worker and by clients, so it
imports only the standard library, numpy and msgspec.

Request (value, JSON, schema version 1)::

    {"v": 1, "request_id": "r-1", "key_id": "k_ab12", "ts_ms": 1764000000000,
     "model": "digits",
     "inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
                 "data": [0.0, 3.0, ...]}],
     "reply_to": "modelgate.responses", "correlation_id": "c-9"}

Headers: ``mg-sig`` = lowercase hex of HMAC-SHA256(secret, b"mg1\\n" + value).
The record key must be the client id the API key belongs to (the worker refuses
other records with AUTH_WRONG_PARTITION), so that one client's stream stays on
one partition; identity itself always comes from the key, never from the record.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import uuid
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import numpy as np

SCHEMA_VERSION = 1
SIGNATURE_HEADER = "mg-sig"
# An API key id; here, not in gateway.keys, so that a client can tell a token
# no key can have without importing the key store.
# 12 hex digits = 48 random bits: ids are public, so they only need to be
# unique, not unguessable (the secret is what proves possession).
KEY_ID_PATTERN = re.compile(r"^mgk_[0-9a-f]{12}$")
_SIGNING_PREFIX = b"mg1\n"

Datatype = Literal["FP32", "FP64", "INT32", "INT64"]

# Every string the gateway may echo back is bounded by the codec itself, so an
# unauthenticated message cannot make answers, decision records or log lines
# large. Kafka topic names are at most 249 characters.
RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
TopicName = Annotated[str, msgspec.Meta(min_length=1, max_length=249)]

# What decoding hostile bytes can raise besides DecodeError: msgspec raises
# UnicodeDecodeError for invalid UTF-8 inside a string and RecursionError for
# very deep nesting.
DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError)


class Tensor(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """An Open Inference Protocol v2 style tensor: row-major flat ``data``."""

    name: Name
    shape: list[int]
    datatype: Datatype
    # Numbers only: JSON true/false are refused by the codec rather than being
    # read as 1.0/0.0 (no served model takes booleans).
    data: list[float | int]


class InferRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One inference request as a client produces it."""

    v: int
    request_id: RequestId
    key_id: Name
    ts_ms: int
    model: Name
    inputs: list[Tensor]
    reply_to: TopicName | None = None
    correlation_id: RequestId | None = None


class RequestEnvelope(msgspec.Struct, frozen=True):
    """The few fields the worker tries to read even from an invalid request,
    so that an error can still reach the sender. Unknown fields are ignored."""

    request_id: RequestId | None = None
    key_id: Name | None = None
    reply_to: TopicName | None = None
    correlation_id: RequestId | None = None
    model: Name | None = None


class ErrorBody(msgspec.Struct, frozen=True):
    code: str
    message: str
    retriable: bool = False


class RateInfo(msgspec.Struct, frozen=True):
    """The client's binding rate-limit window after this request.

    ``limit`` requests fit in a window of ``window_s`` seconds; ``remaining``
    of them are left now; ``reset_ms`` is how long until the window is full
    again (all ``limit`` available). The HTTP front door turns these into
    ``RateLimit``/``RateLimit-Policy`` headers.
    """

    limit: int
    remaining: int
    reset_ms: int
    window_s: float


class InferResponse(msgspec.Struct, frozen=True, omit_defaults=True):
    """The answer to one request, on ``reply_to`` or the responses topic.

    ``status`` is ``ok`` with ``outputs``, or ``error`` with ``error``. ``action``
    is what policy did; a degraded answer is still ``ok``.
    """

    v: int
    request_id: str
    status: Literal["ok", "error"]
    ts_ms: int
    model: str | None = None
    correlation_id: str | None = None
    action: str | None = None
    outputs: list[Tensor] | None = None
    error: ErrorBody | None = None
    retry_after_ms: int | None = None
    # True when this is a kept answer sent again for a retry of a request id
    # already served (gateway/replay.py); the outputs are the first answer's.
    replayed: bool = False
    # The degrade level of ``outputs`` (gateway/shaping.py) when ``action`` is
    # ``degrade``; absent for a full answer.
    degrade: str | None = None
    rate: RateInfo | None = None


class DecisionRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    """Audit record on ``modelgate.decisions``: one per request, errors included."""

    v: int
    request_id: str
    ts_ms: int
    action: str
    client_id: str | None = None
    key_id: str | None = None
    model: str | None = None
    error_code: str | None = None
    risk: float = 0.0
    scores: dict[str, float] = {}
    reasons: list[str] = []
    shadow: bool = False
    partition: int = -1
    offset: int = -1
    worker: str = ""
    # The policy ladder (docs/policy.md): what every rule and detector, shadow
    # included, would do; what the client experienced; the shaping and delay
    # of its answer; and whether the response concealed the action.
    would_be_action: str | None = None
    enforced_action: str | None = None
    degrade: str | None = None
    delay_ms: int = 0
    hidden: bool = False
    # Linked API keys (gateway.groups): the group's id and its largest risk.
    group_id: str | None = None
    group_risk: float = 0.0
    # Fusion (detectors/fusion.py): the detectors contributing most to the
    # client's decayed risk, each "name:contribution" (threshold units).
    top_detectors: list[str] = []


class DeadLetter(msgspec.Struct, frozen=True, omit_defaults=True):
    """A message the gateway could not serve, with the reason and where it was.

    ``value_b64`` holds the original value (base64; its first 64 KiB when it
    is longer, with ``value_bytes`` and ``value_sha256`` describing the whole)
    so the message can be diagnosed and, if wanted, matched against the
    requests topic at ``partition``/``offset``. It may contain a client's
    inputs: the topic needs the same access control as the requests topic.
    """

    v: int
    code: str
    message: str
    topic: str
    partition: int
    offset: int
    ts_ms: int
    request_id: str | None = None
    key_id: str | None = None
    value_b64: str = ""
    value_bytes: int = 0
    value_sha256: str = ""
    worker: str = ""


_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(InferRequest)
_response_decoder = msgspec.json.Decoder(InferResponse)


def encode(message: msgspec.Struct | dict[str, Any]) -> bytes:
    """Serialise any message of this module to compact JSON bytes."""
    return _encoder.encode(message)


def decode_request(value: bytes) -> InferRequest:
    """Decode and schema-check a request value.

    Raises
    ------
    msgspec.DecodeError
        Not JSON (``msgspec.DecodeError`` but not ``ValidationError``).
    msgspec.ValidationError
        JSON of the wrong shape: missing, mistyped or unknown fields.
    """
    return _request_decoder.decode(value)


def decode_envelope(value: bytes) -> RequestEnvelope | None:
    """Best-effort read of the reply fields from a value that failed decoding."""
    return salvage(value, RequestEnvelope)


_raw_fields_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_E = TypeVar("_E", bound=msgspec.Struct)


def salvage(value: bytes, envelope: type[_E]) -> _E | None:
    """The fields of ``envelope`` (all optional) that ``value`` holds valid,
    each judged on its own: one invalid field (an empty or over-long key id)
    must not cost the sender the answer its valid request id would route.
    ``None`` when ``value`` is not a JSON object."""
    try:
        return msgspec.json.decode(value, type=envelope)
    except msgspec.ValidationError:
        pass
    except DECODE_ERRORS:
        # Whatever a hostile value does to the decoder, we just don't learn
        # where to send the error.
        return None
    try:
        raw = _raw_fields_decoder.decode(value)
    except DECODE_ERRORS:
        return None
    kept: dict[str, Any] = {}
    for name in envelope.__struct_fields__:
        if name not in raw:
            continue
        try:
            alone = msgspec.json.decode(
                _encoder.encode({name: raw[name]}), type=envelope
            )
        except DECODE_ERRORS:
            continue
        kept[name] = getattr(alone, name)
    return envelope(**kept)


def decode_response(value: bytes) -> InferResponse:
    return _response_decoder.decode(value)


def sign(secret: bytes, value: bytes) -> str:
    """Hex HMAC-SHA256 of ``value`` under ``secret`` (the ``mg-sig`` header)."""
    return hmac.new(secret, _SIGNING_PREFIX + value, hashlib.sha256).hexdigest()


def verify(secret: bytes, value: bytes, signature: str) -> bool:
    """Constant-time check of an ``mg-sig`` header against the value bytes."""
    return hmac.compare_digest(sign(secret, value), signature)


def read_signature(headers: Any) -> tuple[str | None, int]:
    """The ``mg-sig`` header of a consumer record, and how many it carries.

    Kafka allows a header name more than once. A record with several
    signatures is ambiguous, whichever one a reader picked, so the worker and
    the poisoning guard refuse it (``AUTH_BAD_SIGNATURE``) when the count is
    above one.

    Returns
    -------
    tuple[str | None, int]
        The signature (ASCII, undecodable bytes replaced), ``None`` unless
        exactly one header carries a value; the number of ``mg-sig`` headers,
        null ones included.

    Examples
    --------
    >>> read_signature([("mg-sig", b"ab"), ("other", b"x")])
    ('ab', 1)
    >>> read_signature([("mg-sig", b"ab"), ("mg-sig", b"cd")])
    (None, 2)
    """
    found = [raw for name, raw in headers or () if name == SIGNATURE_HEADER]
    if len(found) != 1 or found[0] is None:
        return None, len(found)
    return found[0].decode("ascii", "replace"), 1


def duplicate_signature_message(count: int) -> str:
    """The error message of a record with ``count`` > 1 signatures."""
    return (
        f"the record carries {count} {SIGNATURE_HEADER} headers; "
        "it must carry exactly one"
    )


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_request_id() -> str:
    return uuid.uuid4().hex


def tensor_from_array(name: str, array: np.ndarray[Any, Any]) -> Tensor:
    """Wrap a numpy array as a tensor, choosing the datatype from its dtype."""
    if array.dtype.kind in "iub":
        datatype: Datatype = "INT64" if array.dtype.itemsize > 4 else "INT32"
        array = array.astype(np.int64)
    else:
        datatype = "FP64" if array.dtype == np.float64 else "FP32"
    return Tensor(
        name=name,
        shape=list(array.shape),
        datatype=datatype,
        data=array.ravel().tolist(),
    )


def build_request(
    *,
    key_id: str,
    secret: bytes,
    model: str,
    inputs: dict[str, np.ndarray[Any, Any]],
    request_id: str | None = None,
    reply_to: str | None = None,
    correlation_id: str | None = None,
    ts_ms: int | None = None,
) -> tuple[InferRequest, bytes, list[tuple[str, bytes]]]:
    """Build a signed request: the struct, its value bytes and its headers.

    Examples
    --------
    >>> req, value, headers = build_request(
    ...     key_id="k1", secret=b"s", model="digits",
    ...     inputs={"pixels": np.zeros((1, 64), dtype=np.float32)})
    >>> headers[0][0]
    'mg-sig'
    """
    request = InferRequest(
        v=SCHEMA_VERSION,
        request_id=request_id or new_request_id(),
        key_id=key_id,
        ts_ms=now_ms() if ts_ms is None else ts_ms,
        model=model,
        inputs=[tensor_from_array(name, arr) for name, arr in inputs.items()],
        reply_to=reply_to,
        correlation_id=correlation_id,
    )
    value = encode(request)
    return request, value, [(SIGNATURE_HEADER, sign(secret, value).encode("ascii"))]
