"""Model metadata and readiness: ``GET /v2/models/{name}[/versions/{v}][/ready]``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from gateway.frontdoor.deps import Door, error_responses
from gateway.frontdoor.schemas import MetadataTensor, ModelMetadata, ReadyStatus
from gateway.models import ModelSignature, TensorSpec

router = APIRouter(prefix="/v2/models", tags=["models"])

# Models are served in-process by the workers from skops files.
PLATFORM = "sklearn_skops"


def _tensor(spec: TensorSpec) -> MetadataTensor:
    return MetadataTensor(
        name=spec.name, datatype=spec.datatype, shape=list(spec.shape)
    )


def _metadata(signature: ModelSignature) -> ModelMetadata:
    return ModelMetadata(
        name=signature.name,
        versions=[signature.version],
        platform=PLATFORM,
        inputs=[_tensor(s) for s in signature.inputs],
        outputs=[_tensor(s) for s in signature.outputs],
    )


def _ready(door: Door) -> JSONResponse:
    is_ready = door.ready
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


_READY_RESPONSES = {
    503: {"model": ReadyStatus, "description": "The front door is not ready."},
    **error_responses(404),
}


@router.get(
    "/{model_name}",
    response_model=ModelMetadata,
    responses=error_responses(404),
    summary="Model metadata",
)
async def model_metadata(model_name: str, door: Door) -> ModelMetadata:
    return _metadata(door.signature(model_name))


@router.get(
    "/{model_name}/versions/{model_version}",
    response_model=ModelMetadata,
    responses=error_responses(404),
    summary="Model metadata (one version)",
)
async def model_version_metadata(
    model_name: str, model_version: str, door: Door
) -> ModelMetadata:
    return _metadata(door.signature(model_name, model_version))


@router.get(
    "/{model_name}/ready",
    response_model=ReadyStatus,
    responses=_READY_RESPONSES,
    summary="Model readiness",
)
async def model_ready(model_name: str, door: Door) -> JSONResponse:
    """Ready when the model is served and the front door can reach the
    workers through Kafka."""
    door.signature(model_name)
    return _ready(door)


@router.get(
    "/{model_name}/versions/{model_version}/ready",
    response_model=ReadyStatus,
    responses=_READY_RESPONSES,
    summary="Model readiness (one version)",
)
async def model_version_ready(
    model_name: str, model_version: str, door: Door
) -> JSONResponse:
    door.signature(model_name, model_version)
    return _ready(door)
