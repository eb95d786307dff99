"""FastAPI dependencies of the admin API: the shared context, the caller's
source address, and :func:`require_role`, which turns a session token into a
:class:`Principal` or refuses the call.

Imports FastAPI and the admin package's stores; nothing from Kafka.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import NoReturn

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.admin.audit import AuditLog
from gateway.admin.errors import AdminError
from gateway.admin.metrics import AdminMetrics
from gateway.admin.sessions import LoginGuard, SessionStore, source_label
from gateway.admin.users import ROLE_RANK, Role, UserStore
from gateway.clientview import ClientView
from gateway.config import Settings
from gateway.keys import KeyStore
from gateway.store import RedisClient

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="session",
    description="A session token from POST /v1/sessions (password and TOTP code).",
)


@dataclass(frozen=True, slots=True)
class AdminContext:
    """Everything a request handler needs, built once per app start."""

    settings: Settings
    redis: RedisClient
    users: UserStore
    sessions: SessionStore
    guard: LoginGuard
    audit: AuditLog
    keys: KeyStore
    clients: ClientView


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request: a user with a live two-factor session.

    ``role`` is the user's role now, read per call, so a demotion or deletion
    takes effect on existing sessions at their next call.
    """

    user: str
    role: Role
    session_id: str
    source: str


def get_context(request: Request) -> AdminContext:
    context: AdminContext = request.app.state.admin
    return context


def client_source(request: Request) -> str:
    """The caller's address as the audit log and the login limit see it.

    The peer's address, or the address a trusted proxy forwarded: uvicorn
    rewrites the peer from ``X-Forwarded-For`` only for the peers in
    ``admin.trusted_proxies`` (``gateway.admin.cli.uvicorn_proxy_options``).
    """
    return source_label(request.client.host if request.client else None)


def action_name(request: Request) -> str:
    """``METHOD /route/template`` of the request, for the audit log."""
    route = request.scope.get("route")
    path = getattr(route, "path", request.url.path)
    return f"{request.method} {path}"


async def audit(
    context: AdminContext,
    request: Request,
    *,
    actor: str,
    outcome: str,
    target: str = "",
    detail: Mapping[str, str] | None = None,
    action: str | None = None,
) -> None:
    """Record one admin action for ``request`` (and count it in the app's
    ``modelgate_admin_actions``, when the app has metrics)."""
    name = action or action_name(request)
    await context.audit.record(
        actor=actor,
        action=name,
        target=target,
        source=client_source(request),
        outcome=outcome,
        detail=detail,
    )
    metrics = getattr(request.app.state, "metrics", None)
    if isinstance(metrics, AdminMetrics):
        metrics.actions.labels(name, outcome).inc()


async def refuse(
    context: AdminContext,
    request: Request,
    error: AdminError,
    *,
    actor: str,
    reason: str,
    target: str = "",
    outcome: str = "failed",
) -> NoReturn:
    """Record a refused admin action (``detail.reason``), then raise ``error``.

    Parameters
    ----------
    outcome
        ``"failed"`` when the action itself could not be done (no such user,
        the last admin), ``"denied"`` when the caller may not do it.

    Raises
    ------
    AdminError
        Always ``error``, once the audit record is written.
    """
    await audit(
        context,
        request,
        actor=actor,
        outcome=outcome,
        target=target,
        detail={"reason": reason},
    )
    raise error


def require_role(role: Role) -> Callable[..., Awaitable[Principal]]:
    """A dependency admitting callers whose role is at least ``role``.

    Roles are ordered viewer < operator < admin. A missing, malformed,
    expired or revoked session is ``ADMIN_UNAUTHENTICATED`` (401); a role too
    low is ``ADMIN_FORBIDDEN`` (403). Refusals of calls that would change
    state are audited; refused reads are not, so an anonymous caller cannot
    fill the capped audit stream by polling.

    Examples
    --------
    >>> @router.post("/things", dependencies=[Depends(require_role("operator"))])
    ... async def make_thing() -> None: ...  # doctest: +SKIP
    """
    if role not in ROLE_RANK:
        raise ValueError(f"unknown role {role!r}")

    async def dependency(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Security(bearer),  # noqa: B008
        context: AdminContext = Depends(get_context),  # noqa: B008
    ) -> Principal:
        changes_state = request.method not in ("GET", "HEAD", "OPTIONS")
        session = None
        if credentials is not None and credentials.scheme.lower() == "bearer":
            session = await context.sessions.resolve(credentials.credentials)
        user = await context.users.get(session.user) if session is not None else None
        if session is None or user is None:
            error = AdminError(
                "a valid session is required", code="ADMIN_UNAUTHENTICATED"
            )
            if changes_state:
                await refuse(
                    context,
                    request,
                    error,
                    actor="-",
                    outcome="denied",
                    reason="no valid session",
                )
            raise error

        principal = Principal(
            user=user.name,
            role=user.role,
            session_id=session.session_id,
            source=client_source(request),
        )
        if ROLE_RANK[user.role] < ROLE_RANK[role]:
            error = AdminError(
                f"this call needs the {role} role", code="ADMIN_FORBIDDEN"
            )
            if changes_state:
                await refuse(
                    context,
                    request,
                    error,
                    actor=user.name,
                    outcome="denied",
                    target=request.url.path,
                    reason=f"role {user.role} below {role}",
                )
            raise error
        return principal

    return dependency
