"""Hostile numbers in front-door tensors (pure conversion, no sockets): values
no float type can hold are refused with NON_FINITE, as the workers refuse
them, rather than crashing the handler or reaching Kafka as infinities."""

from __future__ import annotations

import pytest

from gateway.errors import ValidationError
from gateway.frontdoor.schemas import InferInputTensor
from gateway.frontdoor.tensors import to_array
from gateway.models import TensorSpec

PIXELS = TensorSpec("pixels", "FP32", (-1, 64), 0.0, 16.0)


@pytest.mark.parametrize(
    ("datatype", "first"),
    [
        # Regression: a JSON integer too large for a double raised
        # OverflowError, answered 500 INTERNAL.
        ("FP32", 10**400),
        ("FP64", 10**400),
        # Regression: finite as a double, infinite as FP32; converted to inf
        # silently, then encoded as JSON null and refused by the worker as
        # SCHEMA_INVALID (a dead letter for a front door's own record).
        ("FP32", 3.5e38),
        ("FP32", -1e39),
        # FP64 for the FP32 model is narrowed to FP32; beyond FP32 it was
        # passed on as FP64 and refused by the worker as DTYPE_MISMATCH.
        ("FP64", 3.5e38),
    ],
    ids=[
        "fp32-400-digits",
        "fp64-400-digits",
        "fp32-3.5e38",
        "fp32-minus-1e39",
        "fp64-3.5e38-for-fp32",
    ],
)
def test_numbers_no_float_type_holds_are_non_finite(
    datatype: str, first: float | int
) -> None:
    tensor = InferInputTensor(
        name="pixels",
        shape=[1, 64],
        datatype=datatype,  # type: ignore[arg-type]  # a literal from the table
        data=[first] + [0.0] * 63,
    )
    with pytest.raises(ValidationError) as info:
        to_array(tensor, PIXELS)
    assert info.value.code == "NON_FINITE"


def test_largest_fp32_value_is_kept() -> None:
    tensor = InferInputTensor(
        name="pixels", shape=[1, 64], datatype="FP32", data=[3.4e38] + [0.0] * 63
    )
    assert float(to_array(tensor, PIXELS)[0, 0]) == pytest.approx(3.4e38, rel=1e-6)
