from __future__ import annotations

import msgspec
import numpy as np
import pytest

from gateway import protocol


def _signed() -> tuple[protocol.InferRequest, bytes, str]:
    request, value, headers = protocol.build_request(
        key_id="k1",
        secret=b"secret",
        model="digits",
        inputs={"pixels": np.arange(64, dtype=np.float32).reshape(1, 64) / 4},
        reply_to="modelgate.responses",
        correlation_id="c1",
    )
    return request, value, headers[0][1].decode()


def test_round_trip_and_signature() -> None:
    request, value, signature = _signed()
    assert protocol.decode_request(value) == request
    assert protocol.verify(b"secret", value, signature)


def test_signature_covers_every_byte() -> None:
    _, value, signature = _signed()
    tampered = value.replace(b'"model":"digits"', b'"model":"digitz"')
    assert tampered != value
    assert not protocol.verify(b"secret", tampered, signature)
    assert not protocol.verify(b"other", value, signature)


def test_unknown_field_is_a_validation_error() -> None:
    _, value, _ = _signed()
    with pytest.raises(msgspec.ValidationError):
        protocol.decode_request(value[:-1] + b',"extra":1}')


def test_malformed_json_is_a_decode_error_not_validation() -> None:
    with pytest.raises(msgspec.DecodeError) as info:
        protocol.decode_request(b"{not json")
    assert not isinstance(info.value, msgspec.ValidationError)


def test_envelope_reads_reply_fields_from_an_invalid_request() -> None:
    envelope = protocol.decode_envelope(
        b'{"request_id":"r9","reply_to":"modelgate.responses.x","inputs":7}'
    )
    assert envelope is not None
    assert envelope.request_id == "r9"
    assert envelope.reply_to == "modelgate.responses.x"
    assert protocol.decode_envelope(b"[1,2]") is None


@pytest.mark.parametrize(
    "bad_key_id", [b'""', b'"' + b"k" * 10_000 + b'"', b"42", b"[1]"]
)
def test_envelope_keeps_the_request_id_beside_an_invalid_key_id(
    bad_key_id: bytes,
) -> None:
    # A key id that fails its own check (empty, over-long, not a string)
    # failed the whole envelope, and the request got no answer at all.
    envelope = protocol.decode_envelope(
        b'{"request_id":"r7","key_id":'
        + bad_key_id
        + b',"reply_to":"modelgate.responses.x"}'
    )
    assert envelope is not None
    assert envelope.request_id == "r7"
    assert envelope.key_id is None
    assert envelope.reply_to == "modelgate.responses.x"


def test_envelope_of_deeply_nested_json_is_none_or_partial() -> None:
    depth = 1200
    value = b'{"request_id":"deep","zz":' + b"[" * depth + b"]" * depth + b"}"
    envelope = protocol.decode_envelope(value)
    assert envelope is None or envelope.request_id == "deep"


def test_tensor_datatypes_follow_numpy() -> None:
    assert protocol.tensor_from_array("a", np.zeros(2, np.float32)).datatype == "FP32"
    assert protocol.tensor_from_array("a", np.zeros(2, np.float64)).datatype == "FP64"
    assert protocol.tensor_from_array("a", np.zeros(2, np.int64)).datatype == "INT64"
    booleans = protocol.tensor_from_array("a", np.zeros(2, bool))
    assert booleans.datatype == "INT32"
    assert booleans.data == [0, 0]


def test_booleans_are_not_numbers() -> None:
    _, value, _ = _signed()
    with pytest.raises(msgspec.ValidationError):
        protocol.decode_request(value.replace(b'"data":[0.0', b'"data":[true'))
