"""The admin API application: ``create_app(settings)``.

Routers per resource live in ``gateway.admin.routers``; the live
configuration's ``/config`` routes come from ``gateway.admin.live``; other
features mount their own routers through ``extra_routers`` behind the
operator role. Every refusal has the body ``{"error", "code", "retriable"}``
with a code from ``gateway.admin.errors.ADMIN_ERROR_CODES``.

Imports FastAPI, Redis and the admin package; Kafka only through the live
configuration's service and the audit topic's producer, which the lifespan
starts in the background.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from gateway.admin.audit import AuditLog
from gateway.admin.audit_chain import key_id
from gateway.admin.audit_forward import AuditForwarder
from gateway.admin.audit_topic import AuditTopic
from gateway.admin.deps import AdminContext, require_role
from gateway.admin.errors import ADMIN_ERROR_CODES, AdminError
from gateway.admin.http_server import head_refusal
from gateway.admin.live import LiveConfigHandle, config_router
from gateway.admin.metrics import AdminMetrics
from gateway.admin.routers import audit, clients, keys, sessions, users
from gateway.admin.schemas import ERROR_RESPONSES
from gateway.admin.sessions import LoginGuard, SessionStore
from gateway.admin.users import UserStore
from gateway.clientview import ClientView
from gateway.config import Settings
from gateway.errors import StoreError
from gateway.frontdoor.http_server import HeadLimit
from gateway.http_body import TOO_LARGE, BodyLimit
from gateway.http_metrics import HttpMetricsMiddleware
from gateway.keys import KeyStore, load_server_key
from gateway.store import RedisClient, redis_from_settings

logger = logging.getLogger(__name__)

_DESCRIPTION = """The modelgate admin plane.

Log in with `POST /v1/sessions` (user, password and TOTP code in one step) and
send the returned token as `Authorization: Bearer <token>`. Sessions last
`admin.session_ttl_s` (15 min by default) and can be revoked. Roles: viewer <
operator < admin; every call that changes state needs a session with the
right role and is audited.

Error codes: """ + "; ".join(
    f"`{code}` ({status}): {meaning}"
    for code, (status, meaning) in ADMIN_ERROR_CODES.items()
)


_HTTP_CODES = {400: "MALFORMED_REQUEST", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}


def _error(status: int, code: str, message: str, retriable: bool) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": message, "code": code, "retriable": retriable},
    )


def create_app(
    settings: Settings,
    *,
    extra_routers: Sequence[APIRouter] = (),
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """Build the admin API.

    Parameters
    ----------
    settings
        Redis, server key, ``auth`` and ``admin`` sections.
    extra_routers
        Routers of other features (e.g. live configuration), mounted as they
        are behind ``require_role("operator")``; give them their own
        ``prefix`` and audit their changes with ``gateway.admin.deps.audit``.
    clock
        Seconds since the epoch for TOTP checks; tests pass a stepping one.

    Returns
    -------
    FastAPI
        Its lifespan opens the Redis client, loads the server key and starts
        connecting the live configuration service and the audit topic's
        producer (``app.state.audit_topic``) in the background; the
        stores live on ``app.state.admin`` and the service on
        ``app.state.live_config`` while it runs. Its metrics are on
        ``app.state.metrics`` (an ``AdminMetrics``); ``modelgate admin serve``
        serves them on ``admin.metrics_port``, never on the API's port.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server_key = await asyncio.to_thread(load_server_key, settings)
        if settings.admin.audit_key is None:
            logger.warning(
                "admin.audit_key is unset: audit entries are hash-chained but "
                "not signed, so whoever can write the stream can rewrite them "
                "undetected (docs/admin.md, Tamper evidence)"
            )
        else:
            # The id, never the key: what an operator matches against the
            # entries' kid when rotating.
            logger.info(
                "audit entries signed under key id %s",
                key_id(settings.admin.audit_key.get_secret_value().encode()),
            )
        redis = redis_from_settings(settings)
        # Connects in the background: Kafka being down must not keep the
        # admin API from starting (its entries then miss the topic, logged).
        audit_topic = AuditTopic(settings, metrics)
        audit_topic.start_soon()
        app.state.audit_topic = audit_topic
        # Re-sends what missed the topic; only the lease holder among the
        # admin replicas works (gateway/admin/audit_forward.py).
        forwarder = AuditForwarder(redis, settings, audit_topic, metrics)
        forwarder.start()
        app.state.audit_forwarder = forwarder
        app.state.admin = AdminContext(
            settings=settings,
            redis=redis,
            users=UserStore(redis, settings, server_key, clock=clock),
            sessions=SessionStore(redis, settings),
            guard=LoginGuard(redis, settings),
            audit=AuditLog(redis, settings, audit_topic),
            keys=KeyStore(redis, settings, server_key=server_key),
            clients=ClientView(redis, settings),
        )
        live_config = LiveConfigHandle(settings)
        app.state.live_config = live_config
        live_config.start_soon()
        logger.info("admin api started")
        try:
            yield
        finally:
            try:
                await live_config.close()
            finally:
                try:
                    await forwarder.close()
                    await audit_topic.close()
                finally:
                    await redis.aclose()

    app = FastAPI(
        title="modelgate admin",
        version="1",
        description=_DESCRIPTION,
        lifespan=lifespan,
    )
    metrics = AdminMetrics()
    app.state.metrics = metrics
    state = app.state

    def admin_redis() -> RedisClient | None:
        context: AdminContext | None = getattr(state, "admin", None)
        return context.redis if context is not None else None

    def live_config_redis() -> RedisClient | None:
        handle: LiveConfigHandle | None = getattr(state, "live_config", None)
        return handle.service.redis if handle is not None else None

    metrics.watch_redis({"admin": admin_redis, "live_config": live_config_redis})
    for module in (sessions, users, keys, clients, audit):
        app.include_router(module.router)
    # 401/403 of the role checks and 400 join the router's own error entries.
    app.include_router(config_router(), responses=ERROR_RESPONSES)
    for router in extra_routers:
        app.include_router(router, dependencies=[Depends(require_role("operator"))])

    @app.exception_handler(AdminError)
    async def _admin_error(request: Request, exc: AdminError) -> JSONResponse:
        response = _error(exc.status, exc.code, exc.message, exc.retriable)
        if exc.retry_after_s is not None:
            response.headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's own refusals (unparsable body, unknown path or method)
        # get the same body shape as ours.
        code = _HTTP_CODES.get(exc.status_code, "INTERNAL")
        return _error(exc.status_code, code, str(exc.detail)[:500], False)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI reports a body that is not JSON at all as a validation
        # error of type json_invalid; it is a malformed request (400), not
        # JSON of the wrong shape (422), as docs/admin.md and the front door
        # tell them apart.
        if any(err.get("type") == "json_invalid" for err in exc.errors()):
            return _error(
                400, "MALFORMED_REQUEST", "the request body is not valid JSON", False
            )
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in exc.errors()[:10]
        )
        return _error(422, "SCHEMA_INVALID", problems[:1000], False)

    @app.exception_handler(StoreError)
    async def _store(request: Request, exc: StoreError) -> JSONResponse:
        logger.warning("admin call failed on Redis: %s", exc.message)
        return _error(503, "STORE_UNAVAILABLE", "the store is unavailable", True)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("admin call failed", extra={"path": request.url.path})
        return _error(500, "INTERNAL", "internal error", False)

    # Outside the routes, so that an oversize body is refused before anything
    # reads it: the login route takes bodies from anyone. A head parsed whole
    # in one read can be over the limit the server protocol enforces on heads
    # that span reads (http_server.py), hence the ASGI head check too.
    app.add_middleware(
        BodyLimit,
        max_body_bytes=settings.admin.max_body_bytes,
        refuse=_body_refusal,
    )
    app.add_middleware(HeadLimit, refusal=head_refusal)
    # Outermost, so that the limits' refusals are counted too.
    app.add_middleware(
        HttpMetricsMiddleware,
        metrics=metrics,
        templates=lambda: app.openapi()["paths"],
        codes=ADMIN_ERROR_CODES,
    )
    return app


def _body_refusal(status: int, message: str) -> JSONResponse:
    """BodyLimit's refusals in the admin API's codes."""
    if status == TOO_LARGE:
        return _error(status, "PAYLOAD_TOO_LARGE", message, False)
    return _error(status, "MALFORMED_REQUEST", message, False)
