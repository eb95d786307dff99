"""Inference: ``POST /v2/models/{name}[/versions/{v}]/infer``.

The route checks, in this order: the body size (the app's middleware), that
the model is served (public, as its metadata is), the API key, and only then
the body and the request's own consistency. It hands the request to the
``FrontDoor`` (Kafka round trip) and turns the workers' answer into an OIP
response, or an error with its HTTP status and rate-limit headers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from gateway.errors import ValidationError
from gateway.frontdoor.deps import Door, Token, error_responses, token_of
from gateway.frontdoor.errors import error_response, public_message, rate_headers
from gateway.frontdoor.schemas import (
    InferRequestBody,
    InferResponseBody,
    ResponseParameters,
)
from gateway.frontdoor.service import CheckedKey, FrontDoor
from gateway.frontdoor.tensors import to_array, to_output

logger = logging.getLogger(__name__)


class _KeyFirstRoute(APIRoute):
    """An inference route that checks the API key before FastAPI reads the
    body: FastAPI parses and validates the body before any dependency runs,
    so a dependency alone would answer an anonymous caller's bad body with
    ``SCHEMA_INVALID`` and tell it about the request schema."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def key_first(request: Request) -> Response:
            door: FrontDoor = request.app.state.frontdoor
            model = str(request.path_params["model_name"])
            version = request.path_params.get("model_version")
            door.signature(model, None if version is None else str(version))
            request.state.checked_key = await door.check_key(
                token_of(request.headers), model
            )
            return await handler(request)

        return key_first


def _checked_key(request: Request, token: Token) -> CheckedKey:
    """The key ``_KeyFirstRoute`` checked; ``token`` is declared so that the
    OpenAPI document shows the two ways to send it."""
    checked: CheckedKey = request.state.checked_key
    return checked


Checked = Annotated[CheckedKey, Depends(_checked_key)]

router = APIRouter(prefix="/v2/models", tags=["inference"], route_class=_KeyFirstRoute)

_ERRORS = error_responses(400, 401, 403, 404, 409, 413, 429, 500, 502, 503, 504)
_RATE_HEADERS = {
    "RateLimit-Policy": {
        "description": 'The binding rate window, e.g. `"burst";q=100;w=2` '
        "(draft-ietf-httpapi-ratelimit-headers-10).",
        "schema": {"type": "string"},
    },
    "RateLimit": {
        "description": 'What is left of it, e.g. `"burst";r=99;t=1`.',
        "schema": {"type": "string"},
    },
}
_ERRORS[429] = {
    **_ERRORS[429],
    "headers": {
        "Retry-After": {
            "description": "Seconds to wait before retrying (same request id).",
            "schema": {"type": "integer"},
        },
        **_RATE_HEADERS,
    },
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"headers": _RATE_HEADERS},
    **_ERRORS,
}


@router.post(
    "/{model_name}/infer",
    response_model=InferResponseBody,
    responses=_RESPONSES,
    summary="Inference",
)
async def infer(
    model_name: str, body: InferRequestBody, door: Door, key: Checked
) -> JSONResponse:
    """Run the model on ``inputs`` through the gateway's workers.

    The API key goes in `Authorization: Bearer <token>` (or `X-API-Key`).
    `id` becomes the request id; send the same id to retry a request that
    timed out or was throttled.
    """
    return await _infer(door, key, model_name, None, body)


@router.post(
    "/{model_name}/versions/{model_version}/infer",
    response_model=InferResponseBody,
    responses=_RESPONSES,
    summary="Inference (one version)",
)
async def infer_version(
    model_name: str,
    model_version: str,
    body: InferRequestBody,
    door: Door,
    key: Checked,
) -> JSONResponse:
    """As `/v2/models/{model_name}/infer`, refusing any other version."""
    return await _infer(door, key, model_name, model_version, body)


async def _infer(
    door: FrontDoor,
    key: CheckedKey,
    model: str,
    version: str | None,
    body: InferRequestBody,
) -> JSONResponse:
    # Step: the body's own consistency (the key was checked before it was read).
    signature = door.signature(model, version)
    _check_parameters(door, body)
    declared = {spec.name: spec for spec in signature.inputs}
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for tensor in body.inputs:
        if tensor.name in inputs:
            raise ValidationError(
                f"input {tensor.name!r} appears twice", code="TENSOR_NAME"
            )
        inputs[tensor.name] = to_array(tensor, declared.get(tensor.name))
    wanted = _wanted_outputs(body, {spec.name for spec in signature.outputs})

    # Step: the round trip.
    answer = await door.infer(None, model, inputs, body.id, checked=key)

    # Step: the workers' answer as HTTP.
    headers = rate_headers(answer.rate) if answer.rate is not None else {}
    if answer.status != "ok" or answer.error is not None:
        error = answer.error
        code = error.code if error is not None else "INTERNAL"
        message = error.message if error is not None else "error answer without a body"
        return error_response(
            code,
            public_message(
                code,
                message,
                path=f"/v2/models/{model}/infer",
                source="worker",
                log=door.error_log,
            ),
            error.retriable if error is not None else False,
            retry_after_ms=answer.retry_after_ms,
            rate=answer.rate,
        )
    outputs = [
        to_output(t) for t in answer.outputs or () if wanted is None or t.name in wanted
    ]
    response = InferResponseBody(
        id=answer.request_id,
        model_name=model,
        model_version=signature.version,
        outputs=outputs,
        # The worker leaves ``degrade`` out when policy hides its suspicion,
        # so passing it on reveals nothing the worker would not.
        parameters=ResponseParameters(
            action=answer.action or "allow",
            replayed=True if answer.replayed else None,
            degrade=answer.degrade,
        ),
    )
    return JSONResponse(response.model_dump(exclude_none=True), headers=headers)


def _check_parameters(door: FrontDoor, body: InferRequestBody) -> None:
    """Request ``parameters`` are accepted but not forwarded: no modelgate
    model takes any, and passing arbitrary client data to the workers would
    widen what an unauthenticated body can carry. Only their size is bounded."""
    limit = door.settings.frontdoor.max_parameters_bytes
    blobs = [body.parameters] + [t.parameters for t in body.inputs]
    size = sum(len(json.dumps(b)) for b in blobs if b)
    if size > limit:
        raise ValidationError(
            f"parameters take {size} bytes; the limit is {limit}",
            code="SCHEMA_INVALID",
        )


def _wanted_outputs(body: InferRequestBody, known: set[str]) -> set[str] | None:
    if body.outputs is None:
        return None
    names = {o.name for o in body.outputs}
    unknown = sorted(names - known)
    if unknown:
        raise ValidationError(
            f"unknown output {unknown[0][:64]!r}; the model has {sorted(known)}",
            code="TENSOR_NAME",
        )
    return names
