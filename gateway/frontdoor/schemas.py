"""Request and response bodies of the Open Inference Protocol v2 REST API.

Pydantic models, used by FastAPI to parse bodies and to document them in
OpenAPI. This module imports pydantic only; the conversion of tensors to numpy
arrays lives in ``tensors.py``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

# The datatypes this front door reads; OIP also names BOOL, FP16 and BYTES,
# which no modelgate model takes, so they are refused at the schema.
OipDatatype = Literal[
    "FP32",
    "FP64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
]
# Same bounds as the Kafka wire format (gateway.protocol), so anything the
# schema accepts also fits a request record.
Name = Annotated[str, Field(min_length=1, max_length=128)]
RequestId = Annotated[str, Field(min_length=1, max_length=128)]
# A dimension; -1 only appears in metadata (a variable batch size).
Dim = Annotated[int, Field(ge=0, le=1_000_000)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ErrorResponse(_Body):
    """Every error answer: OIP's ``error`` plus a stable ``code``."""

    error: str = Field(description="What went wrong, for a person.")
    code: str = Field(description="Stable machine-readable code; match on this.")
    retriable: bool = Field(
        description="Whether the same request may succeed later (same id)."
    )


class ServerMetadata(_Body):
    name: str
    version: str
    extensions: list[str]


class LiveStatus(_Body):
    live: bool


class ReadyStatus(_Body):
    ready: bool


class MetadataTensor(_Body):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a variable dimension.")


class ModelMetadata(_Body):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


# Nested data: a number, or a list of (lists of) numbers matching ``shape``.
# The element types are checked when the tensor is converted, because a
# recursive schema would let a client nest arbitrarily deep inside pydantic.
TensorData = list[StrictInt | StrictFloat | list[Any]]


class InferInputTensor(_Body):
    name: Name
    shape: list[Dim] = Field(min_length=1, max_length=8)
    datatype: OipDatatype
    parameters: dict[str, Any] | None = Field(
        None, description="Accepted and ignored (no modelgate model takes any)."
    )
    data: TensorData = Field(
        description="Row-major flat, or nested to match shape.", min_length=1
    )


class RequestedOutput(_Body):
    name: Name
    parameters: dict[str, Any] | None = None


class InferRequestBody(_Body):
    id: RequestId | None = Field(
        None,
        description="Becomes the modelgate request id (made up when absent); "
        "reuse it to retry the same request.",
    )
    parameters: dict[str, Any] | None = Field(
        None, description="Accepted (size-bounded) and not forwarded."
    )
    inputs: list[InferInputTensor] = Field(min_length=1, max_length=16)
    outputs: list[RequestedOutput] | None = Field(
        None, description="Names of the outputs wanted; all when absent."
    )


class InferOutputTensor(_Body):
    name: str
    shape: list[int]
    datatype: str
    data: list[float | int]


class ResponseParameters(_Body):
    action: str = Field(
        description="What policy did: allow, flag, degrade, ... A degraded "
        "answer carries rounded or perturbed scores."
    )
    replayed: bool | None = Field(
        None,
        description="True when this answers a retry of a request id already "
        "served: the answer kept from the first attempt, sent again.",
    )
    degrade: str | None = Field(
        None,
        description="The degrade level of the outputs (top_k, rounded, label) "
        "when action is degrade; absent otherwise, and under a policy that "
        "hides its suspicion.",
    )


class InferResponseBody(_Body):
    id: str
    model_name: str
    model_version: str | None = None
    outputs: list[InferOutputTensor]
    parameters: ResponseParameters
