"""Server metadata and health: ``GET /v2``, ``/v2/health/live``, ``/ready``."""

from __future__ import annotations

from importlib import metadata

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from gateway.frontdoor.deps import Door
from gateway.frontdoor.schemas import LiveStatus, ReadyStatus, ServerMetadata

router = APIRouter(prefix="/v2", tags=["server"])

SERVER_NAME = "modelgate"


def _version() -> str:
    try:
        return metadata.version("modelgate")
    except metadata.PackageNotFoundError:
        return "0"


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=_version(), extensions=[])


@router.get("/health/live", response_model=LiveStatus, summary="Liveness")
async def live() -> LiveStatus:
    """200 while the process serves HTTP at all."""
    return LiveStatus(live=True)


@router.get(
    "/health/ready",
    response_model=ReadyStatus,
    responses={503: {"model": ReadyStatus, "description": "Not ready yet."}},
    summary="Readiness",
)
async def ready(door: Door) -> JSONResponse:
    """200 once the Kafka producer and this process's reply consumer are up,
    503 before (and while stopping)."""
    is_ready = door.ready
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)
