"""Server metadata and health: ``GET /v2``, ``/v2/health/live``, ``/ready``."""

from __future__ import annotations

from importlib import metadata

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

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


def _headers_only(response: JSONResponse) -> Response:
    """``response`` without its body, for HEAD: the same status and headers
    (Content-Length included, as GET would send), as RFC 9110 asks."""
    return Response(status_code=response.status_code, headers=dict(response.headers))


# Load balancers and uptime checkers often probe with HEAD; FastAPI routes a
# GET only, so without these HEAD was a 405. Kept out of the schema: the GET
# operations document them.
@router.head("/health/live", include_in_schema=False)
async def live_head() -> Response:
    return _headers_only(JSONResponse(LiveStatus(live=True).model_dump()))


@router.get(
    "/health/ready",
    response_model=ReadyStatus,
    responses={503: {"model": ReadyStatus, "description": "Not ready yet."}},
    summary="Readiness",
)
async def ready(door: Door) -> JSONResponse:
    """200 once the Kafka producer and this process's reply consumer are up,
    503 before (and while stopping)."""
    return _ready_response(door.ready)


@router.head("/health/ready", include_in_schema=False)
async def ready_head(door: Door) -> Response:
    return _headers_only(_ready_response(door.ready))


def _ready_response(is_ready: bool) -> JSONResponse:
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)
