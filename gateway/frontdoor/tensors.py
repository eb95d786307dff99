"""OIP tensors to numpy arrays and back, with shape and datatype checks.

Only the request's own consistency is checked here (data matches shape, values
match datatype); whether the tensors suit the model is the workers' call, so
the front door holds no validation or detection logic of its own. Imports
numpy and the gateway's protocol and errors.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gateway.errors import ValidationError
from gateway.frontdoor.schemas import InferInputTensor, InferOutputTensor
from gateway.models import TensorSpec
from gateway.protocol import Tensor
from gateway.validation import FLOAT_DTYPES, exact_floats, integer_values

# Deeper nesting than any OIP shape we accept (schema: at most 8 dimensions).
_MAX_DEPTH = 8


def _flatten(data: list[Any], shape: list[int], name: str) -> list[Any]:
    """Row-major leaves of ``data``, flat or nested to match ``shape``."""
    if not any(isinstance(v, list) for v in data):
        return data
    out: list[Any] = []

    def walk(node: Any, depth: int) -> None:
        if depth == len(shape) or depth > _MAX_DEPTH:
            if isinstance(node, list):
                raise ValidationError(
                    f"input {name!r}: data nests deeper than its shape",
                    code="SHAPE_MISMATCH",
                )
            out.append(node)
            return
        if not isinstance(node, list) or len(node) != shape[depth]:
            raise ValidationError(
                f"input {name!r}: nested data does not match shape {shape}",
                code="SHAPE_MISMATCH",
            )
        for child in node:
            walk(child, depth + 1)

    walk(data, 0)
    return out


def to_array(
    tensor: InferInputTensor, declared: TensorSpec | None
) -> np.ndarray[Any, Any]:
    """The tensor's values as an array of its shape.

    Integer data for a model input declared as floating point is converted
    when every value is exact in that type (a digit image sent as INT32, say);
    FP64 data for an input declared FP32 is rounded to FP32 when every value
    is within FP32's range. Otherwise the client's datatype is kept and the
    worker judges it.

    Raises
    ------
    ValidationError
        ``SHAPE_MISMATCH`` (element count or nesting disagrees with shape),
        ``DTYPE_MISMATCH`` (a value that is not of the datatype),
        ``NON_FINITE`` (NaN, infinity, or a value the datatype, or the FP32
        it is narrowed to, cannot hold).
    """
    name = tensor.name
    flat = _flatten(tensor.data, tensor.shape, name)
    count = math.prod(tensor.shape)
    if len(flat) != count:
        raise ValidationError(
            f"input {name!r}: {len(flat)} values for shape {tensor.shape}",
            code="SHAPE_MISMATCH",
        )
    # bool is an int subclass; JSON true/false are not numbers here.
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in flat):
        raise ValidationError(
            f"input {name!r}: values must be numbers", code="DTYPE_MISMATCH"
        )

    if tensor.datatype in FLOAT_DTYPES:
        try:
            array = np.asarray(flat, dtype=np.float64)
        except OverflowError as exc:
            # A JSON integer beyond any double (the parser keeps it exact):
            # an infinity in all but name, as the workers judge it.
            raise ValidationError(
                f"input {name!r}: a number too large to represent", code="NON_FINITE"
            ) from exc
        if not np.isfinite(array).all():
            raise ValidationError(f"input {name!r}: NaN or infinity", code="NON_FINITE")
        # FP64 data for an input the model declares FP32 is narrowed here, as
        # OIP servers such as MLServer do: clients built on float64 (numpy's
        # default, Python floats) need not cast, and the rounding is the
        # model's own precision. A value beyond FP32 is refused below.
        target_name = tensor.datatype
        if declared is not None and declared.datatype == "FP32":
            target_name = "FP32"
        target = FLOAT_DTYPES[target_name]
        # Finite as a double but not in FP32 (over about 3.4e38): the cast
        # would make it infinite, which JSON encodes as null.
        if np.abs(array).max() > np.finfo(target).max:
            raise ValidationError(
                f"input {name!r}: a value too large for {target_name}",
                code="NON_FINITE",
            )
        return array.astype(target).reshape(tensor.shape)

    ints = integer_values(flat, tensor.datatype, name).reshape(tensor.shape)
    if declared is not None and declared.datatype in FLOAT_DTYPES:
        # The workers' rule too (gateway.validation.validate_request), so a
        # request produced straight to Kafka is judged alike.
        as_float = exact_floats(ints, declared.datatype)
        if as_float is not None:
            return as_float
    return ints


def to_output(tensor: Tensor) -> InferOutputTensor:
    """A worker's output tensor as an OIP output, unchanged."""
    return InferOutputTensor(
        name=tensor.name,
        shape=list(tensor.shape),
        datatype=tensor.datatype,
        data=list(tensor.data),
    )
