"""Validation of decoded requests against a model's declared signature.

Pure functions over numpy; no I/O. Each failure raises ``ValidationError`` with
one of the stable codes listed in ``gateway.errors.ERROR_CODES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.errors import ValidationError
from gateway.models import ModelSignature
from gateway.protocol import SCHEMA_VERSION, InferRequest

_MAX_ID_CHARS = 128

FLOAT_DTYPES: dict[str, type[np.floating[Any]]] = {
    "FP32": np.float32,
    "FP64": np.float64,
}
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    # The wire format carries integers as INT64.
    "UINT64": (0, 2**63 - 1),
}
# int64's range as doubles: a float at or past 2**63 has no int64 to compare.
_INT64_LOW, _INT64_END = -(2.0**63), 2.0**63


def exact_floats(
    ints: npt.NDArray[np.int64], datatype: str
) -> npt.NDArray[np.floating[Any]] | None:
    """``ints`` in the floating-point ``datatype`` (FP32 or FP64) if every
    value converts exactly, else None.

    The one rule for integer data sent to an input declared floating point,
    applied by the HTTP front door (``gateway.frontdoor.tensors``) and by
    :func:`validate_request` for requests produced straight to Kafka: a digit
    image sent as INT32 is accepted, 16777217 for an FP32 input (which would
    become 16777216) is not.

    Examples
    --------
    >>> exact_floats(np.array([0, 16, -3]), "FP32").tolist()
    [0.0, 16.0, -3.0]
    >>> exact_floats(np.array([2**24 + 1]), "FP32") is None
    True
    """
    as_float = ints.astype(FLOAT_DTYPES[datatype])
    # Compared as float64, exact for FP32 too; a value rounded up to 2**63
    # would overflow the cast back to int64, and is not exact anyway.
    wide = as_float.astype(np.float64)
    if not ((wide >= _INT64_LOW) & (wide < _INT64_END)).all():
        return None
    return as_float if np.array_equal(wide.astype(np.int64), ints) else None


def integer_values(data: Sequence[object], datatype: str, name: str) -> np.ndarray:
    """``data`` as int64 when every value is an integer within the integer
    ``datatype``'s bounds.

    Raises
    ------
    ValidationError
        ``DTYPE_MISMATCH`` naming the tensor ``name``.
    """
    low, high = INT_BOUNDS[datatype]
    # bool is an int subclass; JSON true/false are not numbers here.
    if any(
        isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high
        for v in data
    ):
        raise ValidationError(
            f"input {name!r}: values are not {datatype}", code="DTYPE_MISMATCH"
        )
    return np.asarray(data, dtype=np.int64)


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
    # FP64 for an FP32 input is accepted and rounded, as OIP servers such as
    # MLServer do; a value beyond FP32's range is refused as NON_FINITE below.
    # Integers for a floating-point input are accepted when exact in it
    # (exact_floats), as the HTTP front door converts them.
    ints_as_floats = tensor.datatype in INT_BOUNDS and spec.datatype in FLOAT_DTYPES
    if (
        tensor.datatype != spec.datatype
        and (tensor.datatype, spec.datatype) != ("FP64", "FP32")
        and not ints_as_floats
    ):
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
        if ints_as_floats:
            converted = exact_floats(
                integer_values(tensor.data, tensor.datatype, spec.name),
                spec.datatype,
            )
            if converted is None:
                raise ValidationError(
                    f"input {spec.name!r}: {tensor.datatype} values not exact "
                    f"in {spec.datatype}",
                    code="DTYPE_MISMATCH",
                )
            values = converted.astype(np.float64)
        else:
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
    # The rows are float32: a value finite as a double but over about 3.4e38
    # would become infinite there (only a model declaring no range lets one
    # through the range check below).
    if np.abs(values).max() > np.finfo(np.float32).max:
        raise ValidationError(
            f"input {spec.name!r} holds a value too large for FP32",
            code="NON_FINITE",
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
    """Map rows onto [0, 1] using the declared range, as float64.

    The detectors' scale when the declared range describes the features; the
    worker decides per model with :func:`feature_scale`. Inputs without a
    declared range are passed through unchanged.
    """
    spec = signature.inputs[0]
    x = rows.astype(np.float64)
    if spec.min is None or spec.max is None or spec.max <= spec.min:
        return x
    return np.clip((x - spec.min) / (spec.max - spec.min), 0.0, 1.0)


# When the reference sample's typical feature spans at least this share of the
# declared range, the declared range describes the features and is kept as the
# detectors' scale. Digits fill 0..16 (median span 16 of 16), phishing 0..1 of
# 1.05: both keep the declared scale, so their calibrated detectors see exactly
# what they saw before. Breast cancer's median span is 0.3 of 4466.7: one range
# covers features 0.02 and 4000 wide, and per-feature scales are needed.
DECLARED_RANGE_SHARE = 0.5

# Margin added on each side of a feature's reference span, as a share of the
# span (the zoo declares its ranges with the same 5%), so held-out honest
# values rarely clip to 0 or 1.
FEATURE_MARGIN = 0.05


@dataclass(frozen=True)
class FeatureScale:
    """Where the detectors put each feature on [0, 1]: ``(x - low) / span``,
    clipped.

    Attributes
    ----------
    low, span
        Per-feature location and scale (float64, length = row size); every
        span is positive. Empty for inputs passed through unchanged.
    source
        ``"declared"`` (the signature's single range), ``"reference"``
        (per-feature from the reference sample) or ``"none"`` (no range
        declared: rows passed through).
    """

    low: npt.NDArray[np.float64]
    span: npt.NDArray[np.float64]
    source: str

    def apply(self, rows: np.ndarray) -> npt.NDArray[np.float64]:
        """``rows`` on the detectors' [0, 1] scale, as float64."""
        x = rows.astype(np.float64)
        if self.source == "none":
            return x
        out: npt.NDArray[np.float64] = np.clip((x - self.low) / self.span, 0.0, 1.0)
        return out


def feature_scale(
    signature: ModelSignature, reference: np.ndarray | None
) -> FeatureScale:
    """The detectors' per-feature scale for one model.

    Why from the reference sample and not per-feature ranges in the signature:
    the signature's range is a contract for validation (what a client may
    send), while the detectors need where honest data lies; the reference
    sample is already shipped with every model, so no signature format
    changes and every existing model file keeps working. Validation still
    uses only the declared range (``validate_request``).

    Rule: when the median feature's reference span (min to max) covers at
    least ``DECLARED_RANGE_SHARE`` of the declared range, the declared range
    is used for every feature (it describes them). Otherwise each feature
    gets its reference min to max widened by ``FEATURE_MARGIN`` of its span
    each side; a feature constant in the reference (span 0) falls back to the
    declared span, since the sample says nothing about its spread and a tiny
    scale would turn any change of it into a full-range jump. Min and max
    rather than quantiles: quantiles would clip held-out honest values to the
    ends, where clipped rows look alike, which is what similarity counts.
    """
    spec = signature.inputs[0]
    empty = np.zeros(0, dtype=np.float64)
    if spec.min is None or spec.max is None or spec.max <= spec.min:
        return FeatureScale(empty, empty, "none")
    declared = float(spec.max - spec.min)
    width = spec.row_size
    declared_scale = FeatureScale(
        np.full(width, float(spec.min)), np.full(width, declared), "declared"
    )
    if reference is None or reference.ndim != 2 or reference.shape[0] < 2:
        return declared_scale
    ref = reference.astype(np.float64).reshape(len(reference), -1)
    if ref.shape[1] != width or not np.isfinite(ref).all():
        return declared_scale
    low, high = ref.min(axis=0), ref.max(axis=0)
    spans = high - low
    if float(np.median(spans)) >= DECLARED_RANGE_SHARE * declared:
        return declared_scale
    constant = spans <= 0.0
    margin = FEATURE_MARGIN * spans
    return FeatureScale(
        np.where(constant, low, low - margin),
        np.where(constant, declared, spans + 2.0 * margin),
        "reference",
    )
