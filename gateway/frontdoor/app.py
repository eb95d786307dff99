"""The FastAPI application of the HTTP front door: ``create_app(settings)``.

Wires the routers, the body-size guard, and the exception handlers that turn
every failure into the contract's error body with its HTTP status. Imports
FastAPI, starlette and the front door's modules.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.config import Settings
from gateway.errors import ModelgateError
from gateway.frontdoor.errors import HTTP_STATUS, error_response, response_for_error
from gateway.frontdoor.http_server import HeadLimit
from gateway.frontdoor.metrics import FrontDoorMetrics
from gateway.frontdoor.routers import health, infer, models
from gateway.frontdoor.service import FrontDoor
from gateway.http_body import TOO_LARGE, BodyLimit
from gateway.http_metrics import HttpMetricsMiddleware

logger = logging.getLogger(__name__)

_MAX_DETAIL_CHARS = 300


def create_app(settings: Settings, *, server_key: bytes | None = None) -> FastAPI:
    """The front door as an ASGI app; Kafka and Redis connect on startup.

    Startup does not wait for Kafka: the app serves ``/v2/health/live`` at
    once and ``/v2/health/ready`` answers 503 until the producer and reply
    consumer are up.

    Parameters
    ----------
    settings
        All settings; ``frontdoor`` holds the HTTP ones.
    server_key
        The Fernet server key; read from settings when omitted.

    Its metrics are on ``app.state.metrics`` (a ``FrontDoorMetrics``); the
    app never serves them itself: ``modelgate frontdoor serve`` starts their
    own listener on ``frontdoor.metrics_port``.
    """
    metrics = FrontDoorMetrics()
    door = FrontDoor(settings, server_key=server_key, metrics=metrics)
    metrics.watch_door(door)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        door.start_in_background()
        try:
            yield
        finally:
            await door.stop()

    app = FastAPI(
        title="modelgate front door",
        summary="Open Inference Protocol v2 over HTTP, guarded by modelgate.",
        version="1",
        lifespan=lifespan,
    )
    app.state.frontdoor = door
    app.state.metrics = metrics
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(infer.router)
    _add_handlers(app)
    # Outside the routes, so that an oversize body is refused before anything
    # reads it.
    app.add_middleware(
        BodyLimit,
        max_body_bytes=settings.frontdoor.max_body_bytes,
        refuse=_body_refusal,
    )
    # A head h11 parsed whole in one read can be over the limit the server
    # protocol enforces on heads that span reads (http_server.py).
    app.add_middleware(HeadLimit)
    # Outermost, so that the guard's refusals are counted too; it reads no body.
    app.add_middleware(
        HttpMetricsMiddleware,
        metrics=metrics,
        templates=lambda: app.openapi()["paths"],
        codes=HTTP_STATUS,
    )
    return app


def _add_handlers(app: FastAPI) -> None:
    @app.exception_handler(ModelgateError)
    async def modelgate_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ModelgateError)
        logger.debug("refused %s", exc.code, extra={"path": request.url.path})
        door: FrontDoor = request.app.state.frontdoor
        return response_for_error(exc, path=request.url.path, log=door.error_log)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        code = (
            "MALFORMED_JSON"
            if any(e.get("type") == "json_invalid" for e in errors)
            else "SCHEMA_INVALID"
        )
        content_type = request.headers.get("content-type")
        if not _is_json(content_type) and any(
            tuple(e.get("loc", ()))[:1] == ("body",) for e in errors
        ):
            # FastAPI reads a body as JSON only under a JSON content type, so
            # any other type (curl -d sends a form's) fails as "not a
            # dictionary", which names the wrong fault.
            sent = (
                f"Content-Type {content_type[:64]!r}"
                if content_type
                else "no Content-Type"
            )
            return error_response(
                "SCHEMA_INVALID",
                "the body must be JSON sent with the header "
                f"'Content-Type: application/json' (the request had {sent})",
                False,
            )
        # Where and what, never the offending input itself.
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in errors[:3]
        )
        return error_response(code, detail[:_MAX_DETAIL_CHARS], False)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {
            400: "MALFORMED_JSON",
            404: "NOT_FOUND",
            405: "METHOD_NOT_ALLOWED",
            413: "PAYLOAD_TOO_LARGE",
        }.get(exc.status_code, "INTERNAL")
        response = error_response(code, str(exc.detail)[:_MAX_DETAIL_CHARS], False)
        response.status_code = exc.status_code
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected fault answering %s", request.url.path)
        return error_response("INTERNAL", "internal error", False)


def _is_json(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of ``content_type`` as JSON:
    ``application/json`` or ``application/<anything>+json``, any parameters."""
    if not content_type:
        return False
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )


def _body_refusal(status: int, message: str) -> JSONResponse:
    """BodyLimit's refusals in the front door's codes."""
    code = "PAYLOAD_TOO_LARGE" if status == TOO_LARGE else "MALFORMED_JSON"
    return error_response(code, message, False)
