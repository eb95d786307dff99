"""The benchmark's baseline codec: ``protocol.decode_request`` rebuilt on the
standard library's ``json``, with the same checks msgspec makes while decoding,
so that ``modelgate bench`` compares like with like. Not used to serve."""

from __future__ import annotations

import json
from typing import Any

from gateway import protocol

# Field name -> exact type, as msgspec checks them (``type(x) is``: a JSON
# ``true`` is not an int). ``None`` marks an optional string.
_REQUEST_SCHEMA: dict[str, type | None] = dict(
    v=int, request_id=str, key_id=str, ts_ms=int, model=str, inputs=list
) | {"reply_to": None, "correlation_id": None}
_TENSOR_SCHEMA: dict[str, type | None] = dict(
    name=str, shape=list, datatype=str, data=list
)
_DATATYPES = frozenset({"FP32", "FP64", "INT32", "INT64"})
_NUMBER_TYPES = frozenset({float, int})


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _checked(raw: object, schema: dict[str, type | None]) -> dict[str, Any]:
    if type(raw) is not dict:
        raise ValueError("expected a JSON object")
    if raw.keys() - schema.keys():
        raise ValueError(f"unknown fields {sorted(raw.keys() - schema.keys())}")
    for name, kind in schema.items():
        value = raw.get(name)
        if kind is None and value is not None and type(value) is not str:
            raise ValueError(f"{name} is not a string")
        if kind is not None and type(value) is not kind:
            raise ValueError(f"{name} missing or not {kind.__name__}")
    return raw


def stdlib_decode_request(value: bytes) -> protocol.InferRequest:
    """``protocol.decode_request`` on stdlib ``json``, the baseline: the checks
    msgspec makes while decoding (no NaN literals, exact types, no unknown or
    missing fields, known datatype, integer shape, numeric data), by hand.

    Raises
    ------
    ValueError
        On any failed check (``json.JSONDecodeError`` is one).
    """
    raw = _checked(json.loads(value, parse_constant=_refuse_constant), _REQUEST_SCHEMA)
    tensors = []
    for item in raw["inputs"]:
        tensor = _checked(item, _TENSOR_SCHEMA)
        if tensor["datatype"] not in _DATATYPES:
            raise ValueError("unknown datatype")
        if not all(type(d) is int for d in tensor["shape"]):
            raise ValueError("shape holds a non-integer")
        if not all(type(x) in _NUMBER_TYPES for x in tensor["data"]):
            raise ValueError("data holds a non-number")
        tensors.append(protocol.Tensor(**tensor))
    return protocol.InferRequest(**(raw | {"inputs": tensors}))
