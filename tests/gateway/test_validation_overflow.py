"""Values finite as a double but not as the model's FP32 input, for a model
that declares no range (a remote model's metadata may not): refused as
NON_FINITE rather than reaching the detectors and the model as infinity."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.errors import ValidationError
from gateway.models import ModelSignature, TensorSpec
from gateway.protocol import InferRequest, Tensor
from gateway.validation import validate_request

UNBOUNDED = ModelSignature(
    name="open",
    version="1",
    inputs=(TensorSpec("x", "FP32", (-1, 4)),),
    outputs=(TensorSpec("probabilities", "FP32", (-1, 2)),),
    classes=(0, 1),
)


def _request(first: float) -> InferRequest:
    return InferRequest(
        v=1,
        request_id="r1",
        key_id="k1",
        ts_ms=0,
        model="open",
        inputs=[Tensor(name="x", shape=[1, 4], datatype="FP32", data=[first, 0, 0, 0])],
    )


@pytest.mark.parametrize("first", [3.5e38, -1e300])
def test_value_beyond_fp32_is_non_finite(first: float) -> None:
    """Regression test: cast to float32 after the finiteness check, so the
    rows held an infinity."""
    with pytest.raises(ValidationError) as info:
        validate_request(_request(first), UNBOUNDED)
    assert info.value.code == "NON_FINITE"


def test_large_fp32_value_is_served() -> None:
    rows = validate_request(_request(3.0e38), UNBOUNDED)
    assert np.isfinite(rows).all()
