"""Validation of decoded requests against a model's declared signature.

Pure functions over numpy; no I/O. Each failure raises ``ValidationError`` with
one of the stable codes listed in ``gateway.errors.ERROR_CODES``.
"""

from __future__ import annotations

import numpy as np

from gateway.errors import ValidationError
from gateway.models import ModelSignature
from gateway.protocol import SCHEMA_VERSION, InferRequest

_MAX_ID_CHARS = 128


def validate_request(request: InferRequest, signature: ModelSignature) -> np.ndarray:
    """Check ``request`` against ``signature`` and return its rows.

    Parameters
    ----------
    request
        A schema-valid request (field types already checked by the codec).
    signature
        The model's declared inputs; only single-input models are served.

    Returns
    -------
    numpy.ndarray
        float32 of shape (n, row_size): one row per query in the request.

    Raises
    ------
    ValidationError
        With code UNSUPPORTED_VERSION, SCHEMA_INVALID, TENSOR_NAME,
        SHAPE_MISMATCH, DTYPE_MISMATCH, NON_FINITE or OUT_OF_RANGE.
    """
    # Envelope fields first: they are cheap and name the request in errors.
    if request.v != SCHEMA_VERSION:
        raise ValidationError(
            f"schema version {request.v} is not supported (expected {SCHEMA_VERSION})",
            code="UNSUPPORTED_VERSION",
        )
    if not 0 < len(request.request_id) <= _MAX_ID_CHARS:
        raise ValidationError(
            f"request_id must be 1..{_MAX_ID_CHARS} characters", code="SCHEMA_INVALID"
        )

    # Exactly the declared tensors, each once.
    spec = signature.inputs[0]
    names = [t.name for t in request.inputs]
    if names != [spec.name]:
        raise ValidationError(
            f"inputs must be exactly [{spec.name!r}], got {names!r}",
            code="TENSOR_NAME",
        )
    tensor = request.inputs[0]
    if tensor.datatype != spec.datatype:
        raise ValidationError(
            f"input {spec.name!r} must be {spec.datatype}, got {tensor.datatype}",
            code="DTYPE_MISMATCH",
        )

    # Shape: the declared rank, the declared trailing dimensions, a batch size
    # within limits, and an element count that matches the shape.
    shape = tensor.shape
    if len(shape) != len(spec.shape) or any(
        want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
    ):
        raise ValidationError(
            f"input {spec.name!r} has shape {shape}, expected {list(spec.shape)}",
            code="SHAPE_MISMATCH",
        )
    rows = shape[0]
    if not 1 <= rows <= signature.max_batch_rows:
        raise ValidationError(
            f"batch dimension must be 1..{signature.max_batch_rows}, got {rows}",
            code="SHAPE_MISMATCH",
        )
    if len(tensor.data) != rows * spec.row_size:
        raise ValidationError(
            f"input {spec.name!r} holds {len(tensor.data)} values, shape {shape} "
            f"needs {rows * spec.row_size}",
            code="SHAPE_MISMATCH",
        )

    # Values: finite and inside the declared range. The codec already refused
    # non-numbers; huge literals such as 1e999 decode to inf and stop here.
    try:
        values = np.asarray(tensor.data, dtype=np.float64)
    except OverflowError as exc:
        # A JSON integer too large for a double (the codec keeps it exact).
        raise ValidationError(
            f"input {spec.name!r} holds a number too large to represent",
            code="NON_FINITE",
        ) from exc
    if not np.isfinite(values).all():
        raise ValidationError(
            f"input {spec.name!r} holds NaN or Infinity", code="NON_FINITE"
        )
    low = spec.min if spec.min is not None else -np.inf
    high = spec.max if spec.max is not None else np.inf
    if values.min() < low or values.max() > high:
        raise ValidationError(
            f"input {spec.name!r} values must lie in [{low}, {high}]",
            code="OUT_OF_RANGE",
        )
    return values.astype(np.float32).reshape(rows, spec.row_size)


def scale_to_unit(rows: np.ndarray, signature: ModelSignature) -> np.ndarray:
    """Map rows onto [0, 1] per feature using the declared range, as float64.

    Detectors see every model's inputs on the same scale, so their distance
    thresholds carry over between models. Inputs without a declared range are
    passed through unchanged.
    """
    spec = signature.inputs[0]
    x = rows.astype(np.float64)
    if spec.min is None or spec.max is None or spec.max <= spec.min:
        return x
    return np.clip((x - spec.min) / (spec.max - spec.min), 0.0, 1.0)
