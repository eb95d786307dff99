from __future__ import annotations

import numpy as np
import pytest

from gateway.errors import ValidationError
from gateway.models import ModelSignature, TensorSpec
from gateway.protocol import InferRequest, Tensor
from gateway.validation import exact_floats, scale_to_unit, validate_request

SIGNATURE = ModelSignature(
    name="digits",
    version="1",
    inputs=(TensorSpec("pixels", "FP32", (-1, 64), 0.0, 16.0),),
    outputs=(TensorSpec("probabilities", "FP32", (-1, 10)),),
    classes=tuple(range(10)),
    max_batch_rows=4,
)


def _request(**changes: object) -> InferRequest:
    tensor = {
        "name": "pixels",
        "shape": [1, 64],
        "datatype": "FP32",
        "data": [1.0] * 64,
    }
    tensor.update({k: v for k, v in changes.items() if k in tensor})
    fields = {
        "v": 1,
        "request_id": "r1",
        "key_id": "k1",
        "ts_ms": 0,
        "model": "digits",
        "inputs": [Tensor(**tensor)],  # type: ignore[arg-type]
    }
    fields.update({k: v for k, v in changes.items() if k in fields})
    return InferRequest(**fields)  # type: ignore[arg-type]


def test_valid_request_returns_rows() -> None:
    rows = validate_request(_request(shape=[2, 64], data=[3.0] * 128), SIGNATURE)
    assert rows.shape == (2, 64)
    assert rows.dtype == np.float32


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"v": 2}, "UNSUPPORTED_VERSION"),
        ({"request_id": ""}, "SCHEMA_INVALID"),
        ({"request_id": "x" * 129}, "SCHEMA_INVALID"),
        ({"name": "image"}, "TENSOR_NAME"),
        ({"datatype": "INT64"}, "DTYPE_MISMATCH"),
        ({"datatype": "FP64", "data": [3.5e38] + [1.0] * 63}, "NON_FINITE"),
        ({"shape": [1, 63], "data": [1.0] * 63}, "SHAPE_MISMATCH"),
        ({"shape": [64]}, "SHAPE_MISMATCH"),
        ({"shape": [5, 64], "data": [1.0] * 320}, "SHAPE_MISMATCH"),
        ({"shape": [0, 64], "data": []}, "SHAPE_MISMATCH"),
        ({"data": [1.0] * 63}, "SHAPE_MISMATCH"),
        ({"data": [float("nan")] + [1.0] * 63}, "NON_FINITE"),
        ({"data": [float("inf")] + [1.0] * 63}, "NON_FINITE"),
        ({"data": [17.0] + [1.0] * 63}, "OUT_OF_RANGE"),
        ({"data": [-0.5] + [1.0] * 63}, "OUT_OF_RANGE"),
    ],
)
def test_each_bad_request_gets_its_code(changes: dict[str, object], code: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate_request(_request(**changes), SIGNATURE)
    assert info.value.code == code, info.value.message


def test_fp64_for_an_fp32_input_is_rounded_to_fp32() -> None:
    # Kafka clients built on float64 need not cast, as with OIP servers such
    # as MLServer; the rows are the model's FP32.
    rows = validate_request(
        _request(datatype="FP64", data=[0.1] + [1.0] * 63), SIGNATURE
    )
    assert rows.dtype == np.float32
    assert rows[0, 0] == np.float32(0.1)


def test_integers_exact_in_the_float_input_are_accepted() -> None:
    # Requests produced straight to Kafka get the front door's rule.
    rows = validate_request(
        _request(datatype="INT64", data=list(range(16)) * 4), SIGNATURE
    )
    assert rows.dtype == np.float32
    assert rows[0, :16].tolist() == [float(v) for v in range(16)]
    rows32 = validate_request(_request(datatype="INT32", data=[16] * 64), SIGNATURE)
    assert rows32.tolist() == [[16.0] * 64]


UNBOUNDED = ModelSignature(
    name="free",
    version="1",
    inputs=(TensorSpec("pixels", "FP32", (-1, 64)),),
    outputs=SIGNATURE.outputs,
    classes=SIGNATURE.classes,
    max_batch_rows=4,
)


@pytest.mark.parametrize(
    ("datatype", "first"),
    [
        ("INT64", 0.5),  # not an integer
        ("INT32", 2**31),  # beyond INT32
        ("INT64", 2**24 + 1),  # would round to 2**24 in FP32
        ("INT64", 2**63 - 1),  # would round to 2**63, past int64
        ("INT64", True),  # JSON true is not a number
    ],
)
def test_integers_not_exact_in_the_float_input_are_refused(
    datatype: str, first: object
) -> None:
    request = _request(datatype=datatype, data=[first] + [1] * 63)
    with pytest.raises(ValidationError) as info:
        validate_request(request, UNBOUNDED)
    assert info.value.code == "DTYPE_MISMATCH", info.value.message


def test_exact_floats_bounds() -> None:
    assert exact_floats(np.array([2**53], dtype=np.int64), "FP64") is not None
    assert exact_floats(np.array([2**53 + 1], dtype=np.int64), "FP64") is None
    low = exact_floats(np.array([-(2**63)], dtype=np.int64), "FP64")
    assert low is not None and low.tolist() == [-(2.0**63)]


def test_two_tensors_are_refused() -> None:
    request = _request()
    extra = Tensor(name="extra", shape=[1, 1], datatype="FP32", data=[0.0])
    doubled = InferRequest(
        v=1,
        request_id="r",
        key_id="k",
        ts_ms=0,
        model="digits",
        inputs=[*request.inputs, extra],
    )
    with pytest.raises(ValidationError) as info:
        validate_request(doubled, SIGNATURE)
    assert info.value.code == "TENSOR_NAME"


def test_scale_to_unit_uses_declared_range() -> None:
    rows = np.array([[0.0, 8.0, 16.0] + [0.0] * 61], dtype=np.float32)
    scaled = scale_to_unit(rows, SIGNATURE)
    assert scaled[0, :3].tolist() == [0.0, 0.5, 1.0]
