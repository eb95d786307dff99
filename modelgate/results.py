"""What an inference returns, and tensors between numpy and the wire.

``InferResult`` is the same whichever transport carried the request. Tensors
travel as Open Inference Protocol v2 tensors (``name``, ``shape``,
``datatype``, flat row-major ``data``) on both transports.

This module imports numpy and the standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# OIP v2 datatypes this client reads, and the numpy dtype each becomes.
_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


@dataclass(frozen=True, slots=True)
class RateInfo:
    """The client's binding (tightest) rate-limit window after a request.

    ``limit`` requests fit in ``window_s`` seconds (``None`` when the
    gateway did not say); ``remaining`` are left now; after ``reset_s``
    seconds the full ``limit`` is available again.
    """

    limit: int
    remaining: int
    reset_s: float
    window_s: float | None = None


@dataclass(frozen=True, slots=True)
class InferResult:
    """A successful inference.

    Attributes
    ----------
    request_id
        The id the request was sent (and retried) under.
    model
        The model that answered.
    outputs
        Each output tensor by name, as a numpy array of its declared shape
        (the digits model: ``probabilities`` float32 (n, 10) and ``label``
        int64 (n,)).
    action
        What the gateway's policy did: ``allow``, ``flag``, ``degrade``...
        A degraded answer may carry rounded or perturbed outputs.
    rate
        Rate-limit state after this request, when the gateway reported it.
    model_version
        The model version, when the gateway reported it (HTTP).
    replayed
        True when the gateway answered a retry with the answer it had kept
        from an earlier attempt (both transports).
    degrade
        The degrade level of ``outputs`` (``top_k``, ``rounded``, ``label``)
        when ``action`` is ``degrade``; ``None`` for a full answer, and
        always under a policy that hides its suspicion.
    attempts
        How many sends this result took (1 without retries).
    """

    request_id: str
    model: str | None
    outputs: dict[str, np.ndarray[Any, Any]]
    action: str = "allow"
    rate: RateInfo | None = None
    model_version: str | None = None
    replayed: bool = False
    attempts: int = field(default=1, compare=False)
    degrade: str | None = None

    def __getitem__(self, name: str) -> np.ndarray[Any, Any]:
        return self.outputs[name]

    def output(self, name: str | None = None) -> np.ndarray[Any, Any]:
        """The output called ``name``; by default ``probabilities`` if the
        model has it, else its first output.

        Raises
        ------
        KeyError
            No output of that name (or no output at all).
        """
        if name is not None:
            return self.outputs[name]
        if "probabilities" in self.outputs:
            return self.outputs["probabilities"]
        for array in self.outputs.values():
            return array
        raise KeyError("the answer has no outputs")


def oip_datatype(array: np.ndarray[Any, Any]) -> str:
    """The OIP datatype for a numpy array; refuses what the gateway cannot
    take (objects, strings, complex numbers)."""
    kind = array.dtype.kind
    if kind == "b":
        return "BOOL"
    if kind in "iu":
        return f"{'U' if kind == 'u' else ''}INT{array.dtype.itemsize * 8}"
    if kind == "f" and array.dtype.itemsize in (2, 4, 8):
        return f"FP{array.dtype.itemsize * 8}"
    raise TypeError(f"cannot send an array of dtype {array.dtype}")


def tensor_dict(name: str, array: np.ndarray[Any, Any]) -> dict[str, Any]:
    """An OIP v2 request tensor (JSON-ready) holding ``array``."""
    return {
        "name": name,
        "shape": list(array.shape),
        "datatype": oip_datatype(array),
        "data": array.ravel().tolist(),
    }


def array_from_tensor(tensor: Mapping[str, Any]) -> np.ndarray[Any, Any]:
    """A numpy array from an OIP v2 tensor (a dict or an object with the same
    attributes).

    Raises
    ------
    ValueError
        The shape does not match the data, or the datatype is unknown.
    """
    shape = [int(n) for n in tensor["shape"]]
    datatype = str(tensor["datatype"])
    dtype = _DTYPES.get(datatype)
    if dtype is None:
        raise ValueError(f"unsupported output datatype {datatype!r}")
    return np.asarray(tensor["data"], dtype=dtype).reshape(shape)


def as_inputs(
    inputs: np.ndarray[Any, Any] | Mapping[str, np.ndarray[Any, Any]],
    input_name: str,
) -> tuple[dict[str, np.ndarray[Any, Any]], bool]:
    """Normalise what a caller passed: one array (named ``input_name``) or a
    mapping of names to arrays. A 1-D array is one row and becomes (1, n);
    the second value says so, so that ``predict`` can give one row back.
    Floating arrays are sent as FP32, the datatype served models declare."""
    single_row = False
    if isinstance(inputs, Mapping):
        named = {str(k): np.asarray(v) for k, v in inputs.items()}
    else:
        array = np.asarray(inputs)
        if array.ndim == 1:
            array = array[None, :]
            single_row = True
        named = {input_name: array}
    if not named:
        raise ValueError("no inputs given")
    for name, array in named.items():
        if array.dtype.kind == "f":
            # Served models declare FP32 and the gateway refuses a datatype
            # mismatch; float64 is numpy's default, so convert rather than fail.
            # A value beyond FP32 becomes infinite, which the client then
            # refuses as NON_FINITE: numpy's overflow warning would only
            # repeat that.
            with np.errstate(over="ignore"):
                named[name] = array.astype(np.float32)
    return named, single_row
